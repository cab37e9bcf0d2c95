#!/usr/bin/env python3
"""Chaos soak of vipd: three hosts, five VIPs (3 IPv4, 2 IPv6), random faults for --duration seconds.

    .venv/bin/python bench/chaos.py --duration 600 [--seed N] [--kinds hang,sigkill]

Faults: planned handover (vipd release / SIGTERM + restart), daemon SIGKILL + restart, daemon hang
(SIGSTOP 0.5-5 s), link cut + restore, etcd restart, host<->etcd and host<->hosts partitions
(nftables), one-way loss between two hosts and 5-20 % random loss on every port (nftables in the
switch), and with --etcd-members 3 etcd member faults (leader kill / cut / pause, follower kill). One at a time; after each, every VIP must have exactly one holder again within
--recovery-timeout. An AddressMonitor samples every host every 10 ms; client probes watch one IPv4 and
one IPv6 VIP. Prints tables and writes bench/out/chaos-<ts>.json (logs in bench/out/chaos-<ts>/).
Exit 0 when there was no dual ownership, no leak and no failed recovery; 1 otherwise; 130 interrupted.
A run is replayed (same sequence of fault kinds, VIPs and durations) with --seed.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vipd.lab.chaos import KINDS, Chaos, ChaosConfig  # noqa: E402


def _ms(v: Any) -> str:
    return "-" if v is None else f"{v:.0f}"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(cells[0]), fmt(["-" * w for w in widths])] + [fmt(r) for r in cells[1:]])


def render(res: dict[str, Any]) -> str:
    rep = res.get("report", {})
    out = []
    rows = [[k, v["count"], v["failed"], _ms(v["recovery_ms"]["median"]), _ms(v["recovery_ms"]["max"]),
             _ms(v["worst_no_holder_ms"]["median"]), _ms(v["worst_no_holder_ms"]["max"])]
            for k, v in rep.get("by_kind", {}).items()]
    out.append(table(["fault", "count", "failed", "recover med ms", "recover max ms",
                      "no-holder med ms", "no-holder max ms"], rows))
    rows = []
    for name, v in rep.get("per_vip", {}).items():
        nh, po = v["no_holder_ms"], v.get("probe_outage_ms")
        rows.append([name, v["address"], v["transitions"], f"{v['dual_ms']:.1f}", nh["n"], _ms(nh["median"]),
                     _ms(nh["p90"]), _ms(nh["max"]), f"{v['availability'] * 100:.2f}%" if v["availability"] else "-",
                     po["n"] if po else "-", _ms(po["median"]) if po else "-", _ms(po["p90"]) if po else "-",
                     _ms(po["max"]) if po else "-"])
    out.append("")
    out.append(table(["vip", "address", "transitions", "dual ms", "no-holder n", "med ms", "p90 ms", "max ms",
                      "held", "probe outages", "med ms", "p90 ms", "max ms"], rows))
    leaks = res.get("leaks", {})
    out += ["",
            f"seed {res['seed']}   faults {res['faults_total']} {res['faults_by_kind']}   "
            f"elapsed {rep.get('elapsed', 0):.0f} s{'   INTERRUPTED' if res['interrupted'] else ''}",
            f"ownership transitions {res['transitions_total']}   dual ownership {res['dual_ownership_ms']:.1f} ms   "
            f"every VIP one holder at the end: {res['final_ok']}",
            f"clean stop: exit codes {res.get('exit_codes')} in {res.get('stop_seconds', 0):.2f} s",
            f"leaks {res['leaks_total']}: VIPs {leaks.get('vips')}, etcd keys {leaks.get('etcd_keys')}, "
            f"namespaces {leaks.get('namespaces')}, processes {leaks.get('processes')}"]
    for host, counts in rep.get("log_warnings", {}).items():
        out.append(f"{host} log warnings/errors: {counts or 'none'}")
    if "monitor" in rep:
        m = rep["monitor"]
        out.append(f"monitor: {m['samples']} samples, mean gap {m['mean_gap'] * 1e3:.1f} ms, "
                   f"max gap {m['max_gap'] * 1e3:.1f} ms")
    for f in res["failures"]:
        out.append(f"FAILURE: {f}")
    out.append(f"logs: {res['workdir']}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of faults (default %(default)s)")
    ap.add_argument("--seed", type=int, default=None, help="replay a run (default: random, printed)")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated fault kinds (default: all)")
    ap.add_argument("--recovery-timeout", type=float, default=20.0)
    ap.add_argument("--etcd-members", type=int, choices=(1, 3), default=1,
                    help="1: one etcd (etcd_restart faults); 3: a real 3-member cluster (etcd_member faults: "
                         "leader kill / cut / pause, follower kill)")
    ap.add_argument("--lease-ttl", type=int, default=None,
                    help="vipd's lease TTL (default: the lab's 3 s with one etcd; vipd's shipped 10 s with 3 members, "
                         "whose leader changes a 3 s lease cannot ride out and whose 3 endpoints x 0.5 s must fit)")
    ap.add_argument("--prefix", default="vtx", help="lab namespace prefix (default %(default)s)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = ap.parse_args(argv)

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = ChaosConfig(prefix=args.prefix, workdir=args.out / f"chaos-{stamp}", duration=args.duration,
                      seed=args.seed, kinds=tuple(k for k in args.kinds.split(",") if k),
                      recovery_timeout=args.recovery_timeout, etcd_members=args.etcd_members,
                      lease_ttl=args.lease_ttl or (10 if args.etcd_members == 3 else 3),
                      echo=lambda s: print(s, flush=True))
    try:
        res = Chaos(cfg).run()
    except FileExistsError as e:
        print(f"chaos: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("chaos: interrupted during setup or teardown; everything was removed", file=sys.stderr)
        return 130
    path = args.out / f"chaos-{stamp}.json"
    path.write_text(json.dumps(res, indent=2, default=str) + "\n")
    print()
    print(render(res))
    print(f"json: {path}")
    if res["interrupted"]:
        return 130
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Outage of a health-triggered move: the owner's VIP check starts failing (its service died while
the host stays up); how long does the client lose the VIP? Prints a table and writes JSON.

    .venv/bin/python bench/health.py [--runs 5] [--interval 0.2] [--fall 2] [--json PATH]

The check is a command check that passes while a flag file exists; removing the owner's flag file
is the fault. The outage is the longest gap in client answers (probe every 10 ms) spanning it.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import describe, fmt_ms, table, wait_until  # noqa: E402
from vipd.lab.cluster import Cluster, VipDef  # noqa: E402
from vipd.lab.etcd import EtcdServer  # noqa: E402
from vipd.lab.monitor import AddressMonitor  # noqa: E402
from vipd.lab.probe import Probe  # noqa: E402
from vipd.lab.topology import Lab  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--interval", type=float, default=0.2, help="check interval (s)")
    ap.add_argument("--fall", type=int, default=2, help="failures in a row that mark it unhealthy")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vipd-bench-health-"))
    runs = []
    with Lab("vthb") as lab:
        etcd = EtcdServer(work / "etcd", host=str(lab.etcd_ip), client_port=2379, peer_port=2380, netns=lab.etcd_ns)
        etcd.start()
        try:
            flags = {h.name: work / f"{h.name}.ok" for h in lab.hosts}
            for f in flags.values():
                f.touch()
            vip = lab.vip4(0)
            c = Cluster(lab, work / "hosts", [VipDef("api", str(vip))], endpoints=[etcd.endpoint])
            for h in lab.hosts:
                check = {"type": "command", "command": ["/usr/bin/test", "-e", str(flags[h.name])],
                         "interval": args.interval, "timeout": args.interval, "rise": 2, "fall": args.fall}
                c.vips = [VipDef("api", str(vip), extra={"check": [check]})]
                c.start(h)
            with AddressMonitor(lab, [vip.ip]) as mon, Probe(lab, vip.ip) as probe:
                for i in range(args.runs):
                    owner = wait_until(lambda: (lambda hs: hs[0] if len(hs) == 1 else None)(lab.holders(vip.ip)), 15)
                    assert owner, "no owner"
                    time.sleep(1.0 + random.uniform(0, args.interval))  # random phase against the check timer
                    t0 = time.monotonic()
                    flags[owner].unlink()
                    new = wait_until(lambda: (lambda hs: hs[0] if len(hs) == 1 and hs[0] != owner else None)(
                        lab.holders(vip.ip)), 15)
                    time.sleep(0.5)
                    gaps = [o for o in probe.outages(since=t0 - 0.05)]
                    outage = max((o.ms for o in gaps), default=0.0)
                    runs.append({"run": i, "old": owner, "new": new, "outage_ms": outage,
                                 "detect_and_move_ms": (time.monotonic() - t0 - 0.5) * 1000})
                    print(f"run {i}: {owner} -> {new}, client outage {outage:.0f} ms", flush=True)
                    flags[owner].touch()
                    time.sleep(args.interval * 3)
                dual = sum(mon.dual_ownership().values())
            c.stop_all()
        finally:
            etcd.stop()
    d = describe([r["outage_ms"] for r in runs])
    print()
    print(f"health-triggered move: command check every {args.interval} s, fall {args.fall}; lease TTL 3 s")
    print(table(["fault", "runs", "outage ms min/med/max", "dual ms"],
                [["check fails on owner", len(runs), f"{fmt_ms(d['min'])} / {fmt_ms(d['median'])} / {fmt_ms(d['max'])}",
                  f"{dual * 1000:.1f}"]], right=(1, 2, 3)))
    path = args.json or out / f"health-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "runs": runs, "summary": d,
                                "dual_ms": dual * 1000}, indent=2, default=str))
    print(f"json: {path}")
    return 0 if dual == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""What an etcd member fault costs vipd: 3 vipd hosts on a real 3-member etcd cluster; the leader is
killed, cut off (then rejoins), paused for 3 s, or a follower is killed. Prints a table, writes JSON.

    .venv/bin/python bench/etcd_faults.py [--runs 3] [--faults leader-kill,leader-cut,...]
        [--etcd default|fast|default+prevote|fast+prevote ...] [--vipd defaults|ttl3 ...]
        [--matrix] [--json PATH] [--vipd-src worktree|REV]

Per run: the client's outage (a probe every 20 ms from the client namespace; sum of gaps after the
fault), VIP moves (holder changes seen by the address monitor), fences (owner -> fenced in the logs),
the keepalive gap (longest time, over hosts, a lease went unrenewed: `etcd_restored unrenewed=`)
and the least lease time left when renewal resumed (`left=`; the owner fences at fence_margin).
Dual ownership is measured over the whole bench.
etcd profiles: default = heartbeat 100 ms / election 1000 ms (etcd's defaults), fast = 50 / 500;
"+prevote" adds --pre-vote. vipd profiles: defaults = vipd's shipped timing; ttl3 = the former
defaults (lease 3 s, fence margin 1.5 s, 6 keepalives per TTL, request timeout 0.3 s).
--matrix runs every etcd profile x vipd profile.
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench._common as C  # noqa: E402
from vipd.config import EtcdConfig, TimingConfig  # noqa: E402
from vipd.lab.cluster import Cluster, VipDef  # noqa: E402
from vipd.lab.etcd_cluster import FAULTS, EtcdCluster  # noqa: E402
from vipd.lab.monitor import AddressMonitor  # noqa: E402
from vipd.lab.probe import Probe  # noqa: E402
from vipd.lab.topology import Lab  # noqa: E402

ETCD_PROFILES: dict[str, dict[str, Any]] = {
    "default": {}, "fast": {"heartbeat_ms": 50, "election_ms": 500},
    "default+prevote": {"pre_vote": True}, "fast+prevote": {"heartbeat_ms": 50, "election_ms": 500, "pre_vote": True},
}
_E, _T = EtcdConfig(), TimingConfig()
VIPD_PROFILES: dict[str, dict[str, Any]] = {
    "defaults": {"lease_ttl": _E.lease_ttl, "request_timeout": _E.request_timeout, "fence_margin": _T.fence_margin,
                 "keepalives_per_ttl": _T.keepalives_per_ttl},
    "ttl3": {"lease_ttl": 3, "request_timeout": 0.3, "fence_margin": 1.5, "keepalives_per_ttl": 6},
}
PROBE_INTERVAL = 0.02
HOLD = 3.0


def validity(c: Cluster) -> dict[str, float]:
    out = {}
    for h in c.lab.hosts:
        line = next((ln for ln in c.metrics(h).splitlines() if ln.startswith("vipd_lease_validity_seconds ")), "")
        out[h.name] = float(line.split()[1]) if line else 0.0
    return out


def settle(c: Cluster, ip: Any, ttl: int, timeout: float = 40.0) -> str | None:
    """Until there is one owner and every host renewed its lease within the last ~2 s; the owner."""
    def ok() -> str | None:
        holders = c.lab.holders(ip)
        if len(holders) != 1:
            return None
        v = validity(c)
        return holders[0] if min(v.values()) >= min(ttl - 2, ttl * 0.5) else None
    return C.wait_until(ok, timeout, interval=0.2)


def keepalive_gap(logs: dict[str, C.KeyValueLog], since: float) -> tuple[float, float | None]:
    """(longest time a host's lease went unrenewed, least lease time left at the renewal that ended
    it), over hosts, from the `etcd_restored` lines after `since`; (0, None) if no keepalive failed."""
    gaps = [(float(ln.fields.get("unrenewed", 0)), float(ln.fields.get("left", 0)))
            for log in logs.values() for ln in log.select(["etcd_restored"], since=since)]
    if not gaps:
        return 0.0, None
    return max(g for g, _ in gaps), min(left for _, left in gaps)


def run_combo(etcd_name: str, vipd_name: str, faults: list[str], runs: int, work: Path) -> dict[str, Any]:
    vp = VIPD_PROFILES[vipd_name]
    clock = C.Clock()
    results: list[dict[str, Any]] = []
    with Lab("vt" + "%04x" % random.randrange(0x10000)) as lab:
        ec = EtcdCluster(lab, work / f"etcd-{etcd_name}-{vipd_name}", **ETCD_PROFILES[etcd_name]).start()
        try:
            vip = VipDef("api", str(lab.vip4(0)))
            ip = ipaddress.ip_interface(vip.address).ip
            c = Cluster(lab, work / f"hosts-{etcd_name}-{vipd_name}", [vip], endpoints=ec.endpoints(),
                        lease_ttl=vp["lease_ttl"], etcd_extra={"request_timeout": vp["request_timeout"]},
                        timing={"fence_margin": vp["fence_margin"], "keepalives_per_ttl": vp["keepalives_per_ttl"]})
            c.start_all()
            logs = {h.name: C.KeyValueLog(c.log_path(h), clock) for h in lab.hosts}
            with AddressMonitor(lab, [ip]) as mon, Probe(lab, ip, PROBE_INTERVAL, max_duration=7200) as probe:
                for i in range(runs):
                    for fault in faults:
                        owner = settle(c, ip, vp["lease_ttl"])
                        if owner is None:
                            raise RuntimeError(f"no settled owner before {fault}\n{c.log_tail()}")
                        time.sleep(random.uniform(0, 1))  # random phase against the keepalive timer
                        t0 = time.monotonic()
                        hit = ec.inject(fault, hold=HOLD)
                        ec.wait_for_leader(30)
                        new = settle(c, ip, vp["lease_ttl"])
                        time.sleep(0.3)
                        outages = probe.outages(since=t0)
                        moves = [ch for ch in mon.owner_changes(ip) if ch[0] >= t0]
                        gap, left = keepalive_gap(logs, t0)
                        fences = sum(1 for log in logs.values()
                                     for ln in log.select(["transition"], since=t0) if ln.fields.get("to") == "fenced")
                        r = {"etcd": etcd_name, "vipd": vipd_name, "fault": fault, "run": i, "member": hit.name,
                             "owner_before": owner, "owner_after": new,
                             "outage_ms": round(sum(o.ms for o in outages), 1), "outages": len(outages),
                             "vip_moves": sum(1 for _, _, after in moves if after and after != frozenset({owner})),
                             "holder_changes": len(moves), "fences": fences,
                             "keepalive_gap_s": gap, "lease_left_min_s": left}
                        results.append(r)
                        print(f"{etcd_name:16} {vipd_name:9} {fault:14} run {i}: outage {r['outage_ms']:.0f} ms, "
                              f"moves {r['vip_moves']}, fences {fences}, unrenewed {gap:.2f} s, lease left {left} s",
                              flush=True)
                dual_ms = sum(mon.dual_ownership().values()) * 1000
            c.stop_all()
        finally:
            ec.close()
    return {"etcd": etcd_name, "vipd": vipd_name, "vipd_settings": vp, "etcd_flags": ETCD_PROFILES[etcd_name],
            "runs": results, "dual_ms": dual_ms}


def summarize(combos: list[dict[str, Any]], faults: list[str]) -> tuple[str, list[dict[str, Any]]]:
    rows, summary = [], []
    for combo in combos:
        for fault in faults:
            rs = [r for r in combo["runs"] if r["fault"] == fault]
            out = C.describe([r["outage_ms"] for r in rs])
            gap = C.describe([r["keepalive_gap_s"] for r in rs])
            lefts = [r["lease_left_min_s"] for r in rs if r["lease_left_min_s"] is not None]
            s = {"etcd": combo["etcd"], "vipd": combo["vipd"], "fault": fault, "runs": len(rs),
                 "outage_ms": out, "runs_with_outage": sum(1 for r in rs if r["outage_ms"] > 0),
                 "vip_moves": sum(r["vip_moves"] for r in rs), "fences": sum(r["fences"] for r in rs),
                 "keepalive_gap_s": gap, "lease_left_min_s": min(lefts, default=None), "dual_ms": combo["dual_ms"]}
            summary.append(s)
            rows.append([combo["etcd"], combo["vipd"], fault, len(rs), f"{s['runs_with_outage']}/{len(rs)}",
                         f"{C.fmt_ms(out['median'])} / {C.fmt_ms(out['max'])}", s["vip_moves"], s["fences"],
                         f"{C.fmt_ms(gap['median'], 2)} / {C.fmt_ms(gap['max'], 2)}",
                         C.fmt_ms(s["lease_left_min_s"], 2), f"{combo['dual_ms']:.0f}"])
    text = C.table(["etcd", "vipd", "fault", "runs", "with outage", "outage ms med/max", "VIP moves", "fences",
                    "unrenewed s med/max", "lease left min s", "dual ms"], rows, right=(3, 4, 5, 6, 7, 8, 9, 10))
    return text, summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, of {', '.join(FAULTS)}")
    ap.add_argument("--etcd", nargs="+", default=["default"], choices=sorted(ETCD_PROFILES))
    ap.add_argument("--vipd", nargs="+", default=["defaults"], choices=sorted(VIPD_PROFILES))
    ap.add_argument("--matrix", action="store_true", help="every etcd profile x vipd profile")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--seed", type=int, default=random.randrange(1 << 30))
    ap.add_argument("--vipd-src", default="worktree",
                    help="the vipd to run: the working tree (default) or a git revision, snapshotted first")
    args = ap.parse_args()
    C.reexec_with_snapshot(args.vipd_src, args.seed, __file__)
    random.seed(args.seed)
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    bad = [f for f in faults if f not in FAULTS]
    if bad:
        ap.error(f"unknown fault(s) {bad}; choose from {FAULTS}")
    combos_wanted = [(e, v) for e in (sorted(ETCD_PROFILES) if args.matrix else args.etcd)
                     for v in (sorted(VIPD_PROFILES) if args.matrix else args.vipd)]
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vipd-bench-etcd-"))
    C.install_signal_handlers()
    combos = [run_combo(e, v, faults, args.runs, work) for e, v in combos_wanted]
    text, summary = summarize(combos, faults)
    print()
    print(f"etcd member faults, 3 members, 3 vipd hosts; fault held {HOLD:g} s; probe every "
          f"{PROBE_INTERVAL * 1000:.0f} ms; seed {args.seed}")
    print(text)
    path = args.json or out / f"etcd-faults-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                "environment": C.environment(), "vipd_profiles": VIPD_PROFILES,
                                "etcd_profiles": ETCD_PROFILES, "summary": summary, "combos": combos},
                               indent=2, default=str))
    print(f"json: {path}")
    return 0 if all(c["dual_ms"] == 0 for c in combos) else 1


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""How often a reload that adds a VIP on an interface the token table does not hook yet blinks the
VIPs already running (README "Reload"; tests/lab/test_reload.py asserts they never move, not that
they never blink).

Each run: a fresh 3-host lab, one etcd, vipd on each host (the lab's Cluster defaults, fast
takeover on) with one VIP `keep`; once `keep` has an owner and a successor, every host reloads a
config that adds `late` on `vtlate0` (absent). Counted from the reload until 2 s after it: the gaps
in which no host served `keep` (the address monitor, token gates included) and their lengths, and
any other host holding it (a move: never expected).

    sudo .venv/bin/python bench/reload_gaps.py --runs 40

Runs as root, in namespaces named vtg* (removed on exit). Output: a table and
bench/out/reload-gaps-<ts>.json.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import _common as C

from vipd.lab.cluster import Cluster, VipDef
from vipd.lab.etcd import EtcdServer
from vipd.lab.monitor import AddressMonitor
from vipd.lab.topology import Lab, purge

PREFIX = "vtg"


def one(work: Path, run: int) -> dict[str, Any]:
    with Lab(PREFIX, n_hosts=3) as lab:
        etcd = EtcdServer(work / f"etcd-{run}", host=str(lab.etcd_ip), client_port=2379, peer_port=2380,
                          netns=lab.etcd_ns, name=f"{PREFIX}etcd")
        etcd.start(timeout=15.0)
        keep = VipDef("keep", str(lab.vip4(0)))
        ip = ipaddress.ip_interface(keep.address).ip
        monitor = AddressMonitor(lab, [ip]).start()
        cluster = Cluster(lab, work / f"run-{run}", [keep], endpoints=[etcd.endpoint])
        try:
            cluster.start_all()
            owner = cluster.wait_owner(ip, timeout=20)

            def successor() -> bool:
                out = cluster.run_cli(cluster.host(owner), "status", "--json")
                rows = json.loads(out.stdout)["vips"] if out.returncode == 0 else []
                return any(r["vip"] == "keep" and r.get("successor") for r in rows)
            if not C.wait_until(successor, 20, interval=0.3):
                raise RuntimeError("no successor named for keep")
            cluster.vips = [keep, VipDef("late", str(lab.vip4(6)), interface="vtlate0")]
            t0 = time.monotonic()
            for h in lab.hosts:
                cluster.write_config(h)
                cluster.signal(h, signal.SIGHUP)
            time.sleep(2.0)
            timeline = [(t, hs) for t, hs in monitor.holders_timeline(ip) if t >= t0]  # type: ignore[union-attr]
        finally:
            cluster.stop_all()
            monitor.stop(raise_error=False)
            etcd.stop()
        gaps, start = [], None
        for t, hs in timeline:
            if not hs and start is None:
                start = t
            elif hs and start is not None:
                gaps.append(round((t - start) * 1000, 1))
                start = None
        moved = sorted({h for _, hs in timeline for h in hs} - {owner})
        return {"run": run, "owner": owner, "gaps_ms": gaps, "moved_to": moved}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=20)
    args = p.parse_args()
    ts = time.strftime("%Y%m%d-%H%M%S")
    work = C.ROOT / "bench" / "out" / f"reload-gaps-{ts}"
    work.mkdir(parents=True, exist_ok=True)
    purge(PREFIX)
    runs = []
    for run in range(args.runs):
        runs.append(one(work, run))
        print(runs[-1], flush=True)
    blinked = [r for r in runs if r["gaps_ms"]]
    moved = [r for r in runs if r["moved_to"]]
    longest = max((g for r in runs for g in r["gaps_ms"]), default=None)
    print(C.table(["measure", "value"], [
        ["runs", len(runs)],
        ["runs where keep had no holder for a while", len(blinked)],
        ["longest gap (ms)", longest if longest is not None else "-"],
        ["runs where another host held keep", len(moved)]], right=[1]))
    out = work.with_suffix(".json")
    out.write_text(json.dumps({"environment": C.environment(), "args": vars(args), "runs": runs}, indent=1))
    print(f"JSON: {out}")
    return 1 if moved else 0


if __name__ == "__main__":
    sys.exit(main())

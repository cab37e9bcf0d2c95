#!/usr/bin/env python3
"""What one placement costs (vipd/election/hosts.py `placements`): every host computes it after
each change of a host key, for every unit. Timed for 1,000 and 10,000 one-VIP units over 3
healthy hosts: computed afresh, and answered from the memo (a host key changed only in what
placement does not read: its heartbeat address, a health reason). Pure CPU, no lab.

    .venv/bin/python bench/placement.py [--runs 7]

Output: a table (median / max ms over the runs) and bench/out/placement-<ts>.json.
"""

from __future__ import annotations

import argparse
import ipaddress
import statistics
import time
from dataclasses import replace

import _common as C

from vipd.election.hosts import HostInfo, PlacementMemo, placements
from vipd.model import Unit, VipSpec


def units(n: int) -> list[Unit]:
    base = ipaddress.ip_address("10.0.0.0")
    return [Unit(f"v{i}", (VipSpec(f"v{i}", ipaddress.ip_interface(f"{base + i}/32"), "eth0"),)) for i in range(n)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=7)
    args = p.parse_args()
    rows, out = [], []
    for n in (1000, 10000):
        us = units(n)
        hosts = {h: HostInfo(h) for h in ("h1", "h2", "h3")}
        fresh, memo_hit = [], []
        for run in range(args.runs):
            memo = PlacementMemo()
            t = time.perf_counter()
            placements(us, hosts, memo)
            fresh.append((time.perf_counter() - t) * 1000)
            cosmetic = dict(hosts, h2=replace(hosts["h2"], peer=f"10.0.0.2:{9000 + run}", reasons=("x",)))
            t = time.perf_counter()
            placements(us, cosmetic, memo)
            memo_hit.append((time.perf_counter() - t) * 1000)
        for mode, times in (("computed", fresh), ("from the memo", memo_hit)):
            rows.append([f"{n} units, 3 hosts: {mode}", f"{statistics.median(times):.2f}", f"{max(times):.2f}"])
            out.append({"units": n, "mode": mode, "median_ms": statistics.median(times), "max_ms": max(times)})
    print(C.table(["placement", "median ms", "max ms"], rows, right=[1, 2]))
    C.write_json("placement", {"runs": args.runs, "rows": out})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

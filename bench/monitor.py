#!/usr/bin/env python3
"""The lab's address monitor: what it costs, reading the address only or the nftables token fence too.
Prints a table and writes JSON.

    .venv/bin/python bench/monitor.py [--seconds 3] [--interval 0.01] [--json PATH]

Each scenario builds a vt* lab, puts the VIPs in place (addresses, and for fenced hosts vipd's
fence table via NftFence with 60 s tokens, so nothing changes while measuring), then runs one
AddressMonitor for `--seconds` while the main thread sleeps. Reported: the monitor's own figures
(samples, mean and max gap between samples, wall time per wake-up and its share of the run,
token set dumps per sample) and the process's CPU time over the run (the monitor thread is the
only thing running). The monitor shares the machine with anything else running on it.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trio  # noqa: E402

from bench._common import environment, table  # noqa: E402
from vipd.config import VipSpec  # noqa: E402
from vipd.dataplane.fence_nft import NftFence  # noqa: E402
from vipd.dataplane.netlink import Netlink  # noqa: E402
from vipd.lab.monitor import AddressMonitor  # noqa: E402
from vipd.lab.topology import Host, Lab  # noqa: E402

# name, hosts, VIPs, fenced, extra token elements on each fenced host, lapsed: h1 keeps the VIP with no token
SCENARIOS = [
    ("3 hosts, 2 VIPs, no fence", 3, 2, False, 0, False),
    ("3 hosts, 2 VIPs, fenced owner", 3, 2, True, 0, False),
    ("3 hosts, 2 VIPs, fenced owner + lapsed h1", 3, 2, True, 0, True),
    ("5 hosts, 20 VIPs, all fenced", 5, 20, True, 0, False),
    ("3 hosts, 2 VIPs, owner's sets hold 1,000 tokens", 3, 2, True, 1000, False),
]


def vips_for(lab: Lab, n: int) -> list[VipSpec]:
    """n VIPs, IPv4 and IPv6 alternating."""
    return [VipSpec(f"v{i}", lab.vip4(i // 2 + 1) if i % 2 == 0 else lab.vip6(i // 2 + 1), lab.nic) for i in range(n)]


async def fence(host: Host, vips: list[VipSpec]) -> None:
    async with Netlink(host.ns) as nl, NftFence(nl) as f:
        await f.ensure(vips)
        if vips:
            await f.arm_many([((v,), trio.current_time() + 60) for v in vips])


async def lapse(host: Host, vips: list[VipSpec]) -> None:
    async with Netlink(host.ns) as nl, NftFence(nl) as f:
        await f.ensure(vips)  # managed, never armed


def place(lab: Lab, n_vips: int, fenced: bool, extra: int, lapsed: bool) -> list[VipSpec]:
    vips = vips_for(lab, n_vips)
    hosts = lab.hosts if n_vips > 2 else lab.hosts[1:2]  # 2 VIPs: all on h2; 20: spread over every host
    mine: dict[str, list[VipSpec]] = {h.name: [] for h in lab.hosts}
    for i, v in enumerate(vips):
        h = hosts[i % len(hosts)]
        mine[h.name].append(v)
        lab.ip(h, "addr", "add", str(v.address), "dev", lab.nic, *(("nodad",) if v.ip.version == 6 else ()))
    if lapsed:
        h1 = lab.hosts[0]
        for v in vips:
            lab.ip(h1, "addr", "add", str(v.address), "dev", lab.nic, *(("nodad",) if v.ip.version == 6 else ()))
        trio.run(lapse, h1, vips)
    if fenced:
        for h in lab.hosts:
            if mine[h.name]:
                more = [VipSpec(f"x{i}", ipaddress.ip_interface(f"10.214.{i // 250}.{i % 250 + 1}/32"), lab.nic)
                        for i in range(extra)]
                trio.run(fence, h, mine[h.name] + more)
    return vips


def run(name: str, n_hosts: int, n_vips: int, fenced: bool, extra: int, lapsed: bool, *, address_only: bool,
        seconds: float, interval: float) -> dict[str, Any]:
    with Lab("vt" + secrets.token_hex(2), n_hosts=n_hosts) as lab:
        vips = place(lab, n_vips, fenced, extra, lapsed)
        mon = AddressMonitor(lab, [v.ip for v in vips], interval, address_only=address_only).start()
        cpu0, t0 = time.process_time(), time.monotonic()
        time.sleep(seconds)
        cpu, wall = time.process_time() - cpu0, time.monotonic() - t0
        mon.stop()
        mon.assert_never_dual()
        s = mon.stats()
    return {"scenario": name, "mode": "address only" if address_only else "fence aware", **s,
            "cpu_fraction": cpu / wall, "cpu_per_sample_ms": cpu / max(1, s["samples"]) * 1e3,
            "token_reads_per_sample": s["token_reads"] / max(1, s["samples"])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--interval", type=float, default=0.01)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    for name, n_hosts, n_vips, fenced, extra, lapsed in SCENARIOS:
        for address_only in ((True, False) if not lapsed and extra == 0 else (False,)):
            rows.append(run(name, n_hosts, n_vips, fenced, extra, lapsed, address_only=address_only,
                            seconds=args.seconds, interval=args.interval))
            r = rows[-1]
            print(f"{name} / {r['mode']}: {r['cpu_fraction'] * 100:.1f} % cpu", file=sys.stderr)
    print()
    print(f"address monitor, interval {args.interval * 1e3:.0f} ms, {args.seconds:g} s per run")
    print(table(["scenario", "mode", "cpu %", "cpu/sample ms", "busy/wake-up ms", "mean gap ms", "max gap ms",
                 "token dumps/sample"],
                [[r["scenario"], r["mode"], f"{r['cpu_fraction'] * 100:.1f}", f"{r['cpu_per_sample_ms']:.3f}",
                  f"{r['busy_per_wakeup_ms']:.3f}", f"{r['mean_gap'] * 1e3:.1f}", f"{r['max_gap'] * 1e3:.1f}",
                  f"{r['token_reads_per_sample']:.1f}"] for r in rows], right=(2, 3, 4, 5, 6, 7)))
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    path = args.json or out / f"monitor-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"settings": vars(args), "environment": environment(), "runs": rows},
                               indent=2, default=str))
    print(f"json: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

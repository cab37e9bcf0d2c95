#!/usr/bin/env python3
"""What the kernel charges for refreshing an address lifetime (`ip addr replace`, the message
vipd's lifetime refresh sends), per address, with N addresses of the family on one device: IPv4
/32 against IPv6 /128 (with `nodad`, as vipd adds them), and IPv6 with `noprefixroute` too. An
IPv6 RTM_NEWADDR walks every IPv6 address of the namespace (addrconf_verify_rtnl), so its cost
grows with N; IPv4's does not. Runs `ip -batch` in a throwaway namespace vtar<hex> (a veth pair,
no traffic), N adds then `--runs` timed batches of N replaces; median seconds per batch.

    sudo .venv/bin/python bench/addr_replace.py [--n 1000] [--runs 3]

Output: a table (median ms per batch, us per address) and bench/out/addr_replace-<ts>.json.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import _common as C

NS = "vtar" + secrets.token_hex(2)


def ip(*args: str) -> None:
    subprocess.run(["ip", "-n", NS, *args], check=True, capture_output=True, text=True)


def batch(lines: list[str]) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".ip", delete=False) as f:
        f.write("\n".join(lines) + "\n")
        path = f.name
    try:
        t = time.perf_counter()
        subprocess.run(["ip", "-n", NS, "-batch", path], check=True, capture_output=True, text=True)
        return time.perf_counter() - t
    finally:
        Path(path).unlink()


def case(n: int, runs: int, family: int, flags: str) -> list[float]:
    ip("addr", "flush", "dev", "vtara", "scope", "global")
    if family == 4:
        addrs = [f"10.77.{i // 250}.{1 + i % 250}/32" for i in range(n)]
    else:
        addrs = [f"fd00:77::{i // 256:x}:{i % 256:x}/128" for i in range(n)]
    add = [f"addr add {a} dev vtara {flags} valid_lft 60 preferred_lft 60".replace("  ", " ") for a in addrs]
    batch(add)
    return [batch([line.replace("addr add", "addr replace", 1) for line in add]) for _ in range(runs)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000, help="addresses of the family on the device")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    rows, out = [], []
    subprocess.run(["ip", "netns", "add", NS], check=True)
    try:
        ip("link", "add", "vtara", "type", "veth", "peer", "name", "vtarb")
        ip("link", "set", "vtara", "up")
        ip("link", "set", "vtarb", "up")
        for name, family, flags in (("IPv4 /32", 4, ""), ("IPv6 /128 nodad", 6, "nodad"),
                                    ("IPv6 /128 nodad noprefixroute", 6, "nodad noprefixroute")):
            times = case(args.n, args.runs, family, flags)
            med = statistics.median(times)
            rows.append([name, f"{med * 1000:.1f}", f"{med / args.n * 1e6:.1f}"])
            out.append({"case": name, "n": args.n, "seconds": times, "median_s": med,
                        "us_per_address": med / args.n * 1e6})
    finally:
        subprocess.run(["ip", "netns", "del", NS], check=False)
    print(C.table([f"{args.n} addresses replaced", "median ms", "us per address"], rows, right=[1, 2]))
    C.write_json("addr_replace", {"runs": args.runs, "rows": out})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

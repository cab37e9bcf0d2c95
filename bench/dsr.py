"""DSR benchmark: a download workload (backend -> client) through a director, three ways on the same lab:

    direct  the client downloads from the backends' own addresses (no director: the baseline)
    dsr     vipd's tc eBPF director on h1 (Maglev, MAC rewrite); replies go straight to the client
    dnat    an nftables DNAT director on h1 (numgen over the backends); replies come back through h1

Per run: the client downloads --size MB --count times; we record its throughput and the CPU seconds
the whole machine spent (/proc/stat busy jiffies: user+nice+system+irq+softirq+steal) per GB. Client
and backends do the same work in every mode, so "director CPU s/GB" = mode - direct. The machine is
shared (other jobs add noise): medians of --runs runs. Also the program's own cost per packet
(BPF_PROG_TEST_RUN, --repeat repetitions, median of 5) for a directed frame and two pass-throughs.

    sudo .venv/bin/python bench/dsr.py [--runs 5] [--size 64] [--count 4] [--publish]

Writes bench/out/dsr-<ts>.json and .png (--publish: also bench/dsr.png). Everything it creates is
named vtd<hex> (namespaces, links) and removed at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import environment, table  # noqa: E402  (bench/ is not a package)

from vipd.lab.dsr import PORT, Node, app_argv, config_toml, start_servers  # noqa: E402
from vipd.lab.topology import Lab  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
MODES = ("direct", "dsr", "dnat")


def busy_seconds() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = v[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def download(lab: Lab, target: str, size: int, count: int) -> tuple[float, int]:
    out = lab.run(lab.client, app_argv("get", target, str(PORT), str(size), str(count)), timeout=600).stdout
    r = json.loads(out.strip().splitlines()[-1])
    return float(r["seconds"]), int(r["bytes"])


def setup_dnat(lab: Lab, work: Path) -> None:
    h1, backends = lab.hosts[0], lab.hosts[1:]
    vip = lab.vip4(0)
    lab.ip(h1, "addr", "add", str(vip), "dev", lab.nic)
    lab.run(h1, ["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0",
                 f"net.ipv4.conf.{lab.nic}.send_redirects=0"])
    targets = ", ".join(f"{i} : {b.ip.ip}" for i, b in enumerate(backends))
    rules = work / "dnat.nft"
    rules.parent.mkdir(parents=True, exist_ok=True)
    rules.write_text(f"table ip vtdnat {{\n chain pre {{\n  type nat hook prerouting priority dstnat;\n"
                     f"  ip daddr {vip.ip} tcp dport {PORT} dnat to numgen random mod {len(backends)} map {{ {targets} }}\n"
                     " }\n}\n")
    lab.run(h1, ["nft", "-f", str(rules)])
    for b in backends:  # replies must come back through the director to be un-NATed
        lab.ip(b, "route", "add", f"{lab.client.ip.ip}/32", "via", str(h1.ip.ip))
        lab.run(b, ["sysctl", "-qw", "net.ipv4.conf.all.accept_redirects=0", f"net.ipv4.conf.{lab.nic}.accept_redirects=0"])


def run_mode(mode: str, args: argparse.Namespace, work: Path) -> list[dict[str, float]]:
    size, count = args.size * 1_000_000, args.count
    with Lab("vtd" + secrets.token_hex(2), n_hosts=4) as lab:
        backends = lab.hosts[1:]
        vip = lab.vip4(0)
        if mode == "dsr":
            nodes = [Node(lab, h, work / mode, config_toml(h.name, str(vip), lab.nic, backends)) for h in lab.hosts]
            for n in nodes:
                n.cmd("hosts " + ",".join(h.name for h in lab.hosts))
            nodes[0].cmd("own 60")
        elif mode == "dnat":
            setup_dnat(lab, work / mode)
        start_servers(lab, backends, work / mode)
        download(lab, str(backends[0].ip.ip) if mode == "direct" else str(vip.ip), size, 1)  # warm up
        runs = []
        for _ in range(args.runs):
            # direct: the same downloads, from the backends in turn (one client process in every mode)
            target = ",".join(str(b.ip.ip) for b in backends) if mode == "direct" else str(vip.ip)
            cpu0 = busy_seconds()
            took, got = download(lab, target, size, count)
            cpu = busy_seconds() - cpu0
            runs.append({"seconds": took, "bytes": got, "gbit_s": got * 8 / took / 1e9, "cpu_s_per_gb": cpu / (got / 1e9)})
            print(f"  {mode}: {runs[-1]['gbit_s']:.2f} Gbit/s, {runs[-1]['cpu_s_per_gb']:.2f} CPU s/GB", flush=True)
        return runs


def prog_cost(repeat: int) -> dict[str, float]:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import ARP, Ether

    from vipd.dsr.bpf import BpfObject, find_object
    from vipd.dsr.maps import BackendSlot, DirectorMaps

    vip = ipaddress.ip_address("10.213.0.100")
    frames = {
        "directed (TCP to VIP:port)": bytes(Ether(dst="02:00:00:00:00:01") / IP(src="10.213.0.3", dst=str(vip)) / TCP(dport=PORT)),
        "pass (TCP to another port)": bytes(Ether(dst="02:00:00:00:00:01") / IP(src="10.213.0.3", dst=str(vip)) / TCP(dport=22)),
        "pass (ARP)": bytes(Ether(dst="ff:ff:ff:ff:ff:ff") / ARP(pdst=str(vip))),
    }
    out = {}
    with BpfObject(find_object()) as obj:
        maps = DirectorMaps(obj)
        maps.set_iface(1, "02:00:00:00:00:01")
        maps.set_service(vip, "tcp", PORT, [BackendSlot(f"b{i}", f"02:00:00:00:01:{i:02x}", False) for i in range(3)])
        maps.set_deadline(vip, time.clock_gettime_ns(time.CLOCK_MONOTONIC) + 3600 * 10**9)
        for name, f in frames.items():
            out[name] = statistics.median(obj.test_run("vipd_dsr", f, repeat=repeat).duration_ns for _ in range(5))
    return out


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if m in results["modes"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    a.bar(modes, [results["modes"][m]["gbit_s_median"] for m in modes], color=["#999", "#2a7", "#c63"][:len(modes)])
    a.set_title("client download throughput (Gbit/s)")
    b.bar(modes, [results["modes"][m]["cpu_s_per_gb_median"] for m in modes], color=["#999", "#2a7", "#c63"][:len(modes)])
    b.set_title("machine CPU s per GB served")
    fig.suptitle(f"DSR vs nftables DNAT director (veth lab, medians of {results['runs']} runs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--size", type=int, default=64, help="MB per download")
    p.add_argument("--count", type=int, default=4, help="downloads per run")
    p.add_argument("--repeat", type=int, default=100_000, help="BPF_PROG_TEST_RUN repetitions")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--publish", action="store_true")
    p.add_argument("--no-chart", action="store_true")
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/dsr.py needs root (network namespaces, BPF)")
    OUT.mkdir(exist_ok=True)
    ts = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    work = Path(tempfile.mkdtemp(prefix="vtd-bench-"))
    results: dict[str, Any] = {"runs": args.runs, "size_mb": args.size, "count": args.count, "modes": {},
                               "environment": environment()}
    try:
        for mode in args.modes.split(","):
            print(f"{mode} ...", flush=True)
            runs = run_mode(mode, args, work)
            results["modes"][mode] = {"runs": runs,
                                      "gbit_s_median": statistics.median(r["gbit_s"] for r in runs),
                                      "cpu_s_per_gb_median": statistics.median(r["cpu_s_per_gb"] for r in runs)}
        results["prog_ns"] = prog_cost(args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = results["modes"].get("direct", {}).get("cpu_s_per_gb_median")
    rows = []
    for m, r in results["modes"].items():
        director = None if base is None or m == "direct" else r["cpu_s_per_gb_median"] - base
        r["director_cpu_s_per_gb"] = director
        rows.append([m, f"{r['gbit_s_median']:.2f}", f"{r['cpu_s_per_gb_median']:.2f}",
                     "-" if director is None else f"{director:.2f}"])
    print()
    print(table(["mode", "client Gbit/s", "machine CPU s/GB", "director CPU s/GB (mode - direct)"], rows, right=[1, 2, 3]))
    print()
    print(table(["frame", "ns per run (BPF_PROG_TEST_RUN)"], [[k, f"{v:.0f}"] for k, v in results["prog_ns"].items()], right=[1]))
    jpath = OUT / f"dsr-{ts}.json"
    jpath.write_text(json.dumps(results, indent=2))
    print(f"\n{jpath}")
    if not args.no_chart:
        png = jpath.with_suffix(".png")
        chart(results, png)
        print(png)
        if args.publish:
            shutil.copy(png, Path(__file__).resolve().parent / "dsr.png")


if __name__ == "__main__":
    main()

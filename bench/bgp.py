#!/usr/bin/env python3
"""BGP failover bench: how long after the owner's vipd fails does the router route a routed VIP to the
new owner? Real BIRD 2 on a router namespace and on every host (the shipped conf/bird2-vipd.conf and
conf/router-bird2.conf), vipd holding the VIP on lo and each host's fixed BGP source address. Runs on
demand as root, never as a test:

    .venv/bin/python bench/bgp.py [--runs 5] [--faults sigterm,sigkill] [--timing lab|defaults]
                                  [--json PATH] [--seed N] [--vipd-src worktree|REV]

One lab (prefix `vtgb`: bridge, etcd, client, hosts h1..h3, router `vtgbr`), one VIP 198.18.0.10/32
(`interface = "lo"`). Each run: wait until the router's BIRD has exactly one route to the VIP, via
the host that holds it, steady for 0.3 s; sleep a uniform random 0..TTL (faults land in every phase of
the keepalive cycle); signal the owner's vipd; poll the router's table through BIRD's control socket
(~0.1 ms a read, every 2 ms) until it routes the VIP to exactly one other host; restart the faulted
vipd and wait until it is ready. Output: a table, the JSON (every run's route states with their
times), and bench/out/bgp-<timestamp>/ with every daemon's log and config.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (also puts the vipd under test on sys.path)

from vipd.lab import topology  # noqa: E402
from vipd.lab.bgp import BgpLab, kernel_nexthops, watch_routes  # noqa: E402
from vipd.lab.cluster import Cluster, VipDef  # noqa: E402
from vipd.lab.etcd import EtcdServer  # noqa: E402
from vipd.lab.topology import Lab  # noqa: E402

PREFIX = "vtgb"  # every namespace and link the bench creates starts with this
FAULTS = {"sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL}
VIP = "198.18.0.10/32"
STEADY = 0.3  # s the router must show the owner's route, unchanged, before a fault
CONVERGE_TIMEOUT = 20.0


class RunError(Exception):
    pass


class Bench:
    def __init__(self, args: argparse.Namespace, lab: Lab, cluster: Cluster, bgp: BgpLab) -> None:
        self.args = args
        self.lab = lab
        self.c = cluster
        self.bgp = bgp
        self.rng = random.Random(args.seed)
        self.vip = ipaddress.ip_interface(VIP).ip
        self.anomalies: list[str] = []

    def ensure_birds(self) -> None:
        """A BIRD that is gone (it never should be: vipd's faults do not touch BIRD) is noted and
        started again, so one stray signal costs one run, not the bench."""
        dead = [b for b in self.bgp.birds() if not b.running]
        for b in dead:
            note = f"BIRD on {b.node.name} was not running; restarted. Its log: {b.log_tail(5)!r}"
            self.anomalies.append(note)
            print(f"\n  {note}", flush=True)
            b.start()
        if dead:
            self.bgp.router_bird.wait_established(self.bgp.sources, 20)

    def steady_owner(self, timeout: float = 20.0) -> str:
        """The host that holds the VIP, once the router has routed it there (only) for STEADY s."""
        deadline = time.monotonic() + timeout
        since, last = time.monotonic(), None
        while time.monotonic() < deadline:
            routes = tuple(self.bgp.router_bird.routes(VIP, fast=True))
            holders = self.lab.holders(self.vip)
            state = (routes, tuple(holders))
            if state != last:
                since, last = time.monotonic(), state
            elif (len(holders) == 1 and routes == (self.bgp.sources[holders[0]],)
                  and time.monotonic() - since >= STEADY):
                return holders[0]
            time.sleep(0.01)
        raise RunError(f"no steady owner in {timeout}s: router routes {last and last[0]}, holders {last and last[1]}")

    def wait_ready(self, host: str, log_offset: int, timeout: float = 20.0) -> None:
        path = self.c.log_path(self.c.host(host))
        if not C.wait_until(lambda: " event=ready" in path.read_text(errors="replace")[log_offset:], timeout):
            raise RunError(f"{host}: vipd not ready {timeout}s after its restart")

    def run(self, fault: str, i: int) -> dict[str, Any]:
        rec: dict[str, Any] = {"fault": fault, "run": i}
        self.ensure_birds()
        try:
            owner = self.steady_owner()
        except OSError as e:  # the control socket went away with its BIRD
            raise RunError(f"reading the router's BIRD: {e}") from None
        phase = self.rng.uniform(0, self.args.ttl)
        rec.update(owner=owner, phase_s=round(phase, 3))
        time.sleep(phase)
        host = self.c.host(owner)
        t0 = time.monotonic()
        self.c.signal(host, FAULTS[fault])
        old = self.bgp.sources[owner]
        states = watch_routes(self.bgp.router_bird, VIP, lambda hops: len(hops) == 1 and hops[0] != old,
                              CONVERGE_TIMEOUT)
        names = [[self.bgp.host_of(h) for h in s.nexthops] for s in states]
        withdrawn = next((s.t for s in states if old not in s.nexthops), None)
        empty = [(s.t, nxt.t) for s, nxt in zip(states, states[1:]) if not s.nexthops]
        rec.update(new_owner=names[-1][0],
                   converge_ms=round((states[-1].t - t0) * 1000, 1),
                   withdraw_ms=None if withdrawn is None else round((withdrawn - t0) * 1000, 1),
                   no_route_ms=round(sum(b - a for a, b in empty) * 1000, 1),
                   max_routes=max(len(s.nexthops) for s in states),
                   states=[{"t_ms": round((s.t - t0) * 1000, 1), "hosts": n} for s, n in zip(states, names)],
                   kernel=[self.bgp.host_of(h) for h in kernel_nexthops(self.lab, self.bgp.router, VIP)])
        proc = self.c.procs[owner]
        try:
            rec["exit_code"] = proc.wait(10)
        except Exception:  # noqa: BLE001 - recorded, then killed
            rec["exit_code"] = None
            self.c.kill(host)
        log = self.c.log_path(host)
        offset = len(log.read_text(errors="replace")) if log.exists() else 0
        self.c.start(host)
        self.wait_ready(owner, offset)
        time.sleep(0.5)
        return rec


def summarize(runs: list[dict[str, Any]], faults: list[str]) -> list[dict[str, Any]]:
    out = []
    for f in faults:
        ok = [r for r in runs if r["fault"] == f and "error" not in r]
        conv = C.describe([r["converge_ms"] for r in ok])
        withdraw = C.describe([r["withdraw_ms"] for r in ok if r["withdraw_ms"] is not None])
        out.append({"fault": f, "runs": sum(1 for r in runs if r["fault"] == f), "ok": len(ok),
                    "converge_ms": conv,
                    "withdraw_ms_median": withdraw["median"],
                    "no_route_ms_median": C.describe([r["no_route_ms"] for r in ok])["median"],
                    "runs_with_two_routes": sum(1 for r in ok if r["max_routes"] > 1)})
    return out


def print_table(summary: list[dict[str, Any]]) -> None:
    rows = []
    for s in summary:
        c = s["converge_ms"]
        rows.append([s["fault"], s["runs"], s["ok"],
                     f"{C.fmt_ms(c['min'])} / {C.fmt_ms(c['median'])} / {C.fmt_ms(c['max'])}",
                     C.fmt_ms(s["withdraw_ms_median"]), C.fmt_ms(s["no_route_ms_median"]), s["runs_with_two_routes"]])
    print(C.table(["fault", "runs", "ok", "converge ms min/med/max", "withdraw ms (med)", "no route ms (med)",
                   "2 routes"], rows, right=range(1, 7)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="runs per fault (default 5)")
    p.add_argument("--faults", default="sigterm,sigkill", help="comma-separated: sigterm,sigkill")
    p.add_argument("--timing", choices=("lab", "defaults"), default="defaults",
                   help="vipd [timing]: the shipped defaults, or the lab tests' (vipd.lab.cluster.Cluster)")
    p.add_argument("--ttl", type=int, default=3, help="lease TTL asked of etcd (default 3)")
    p.add_argument("--json", type=Path, help="default bench/out/bgp-<timestamp>.json")
    p.add_argument("--seed", type=int, help="seed of the fault moments (default random, recorded)")
    p.add_argument("--vipd-src", default="worktree",
                   help="the vipd to run: the working tree (default) or a git revision, snapshotted first")
    a = p.parse_args(argv)
    a.fault_list = [f.strip() for f in a.faults.split(",") if f.strip()]
    if not a.fault_list or any(f not in FAULTS for f in a.fault_list):
        p.error(f"--faults: choose from {', '.join(FAULTS)}")
    if not 1 <= a.runs <= 100:
        p.error("--runs must be 1..100")
    if a.seed is None:
        a.seed = secrets.randbits(32)
    return a



def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/bgp.py needs root (network namespaces)", file=sys.stderr)
        return 2
    missing = [t for t in ("bird", "birdc", "etcd") if not shutil.which(t)]
    if missing:
        print(f"missing: {missing} (apt-get install bird2; etcd as for the lab tests)", file=sys.stderr)
        return 2
    C.reexec_with_snapshot(args.vipd_src, args.seed, __file__)
    C.install_signal_handlers()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = C.ROOT / "bench" / "out"
    workdir = out_dir / f"bgp-{stamp}"
    json_path = args.json or out_dir / f"bgp-{stamp}.json"
    res: dict[str, Any] = {"bench": "bgp", "args": {k: v for k, v in vars(args).items() if k != "json"},
                           "environment": C.environment(), "bird": C.tool_version(["bird", "--version"]),
                           "vip": VIP, "runs": [], "completed": False}
    t_start = time.monotonic()
    left = topology.purge(PREFIX)
    if left:
        print(f"removed leftovers of an earlier bench: {left}")
    try:
        with Lab(PREFIX, n_hosts=3) as lab:
            bgp = BgpLab(lab, workdir / "bird", conf_dir=C.ROOT / "conf")
            etcd = EtcdServer(workdir / "etcd", host=str(lab.etcd_ip), client_port=2379, peer_port=2380,
                              netns=lab.etcd_ns, name=f"{PREFIX}etcd")
            etcd.start(timeout=15.0)
            c = Cluster(lab, workdir / "hosts", [VipDef("rt", VIP, interface="lo")], endpoints=[etcd.endpoint],
                        lease_ttl=args.ttl, prefix=f"/vipd/{PREFIX}/")
            if args.timing == "defaults":
                c.timing = {}
            res["timing"] = c.timing or "vipd defaults"
            bgp.configure(c)
            try:
                c.start_all()
                bgp.start(timeout=20)
                b = Bench(args, lab, c, bgp)
                res["anomalies"] = b.anomalies
                for fault in args.fault_list:
                    for i in range(args.runs):
                        print(f"[{fault} {i + 1}/{args.runs}] ", end="", flush=True)
                        try:
                            rec = b.run(fault, i)
                            print(f"{rec['owner']} -> {rec['new_owner']}: {rec['converge_ms']:.0f} ms "
                                  f"(withdrawn at {C.fmt_ms(rec['withdraw_ms'])} ms)", flush=True)
                        except (RunError, AssertionError, OSError) as e:
                            rec = {"fault": fault, "run": i, "error": str(e)}
                            print(f"error: {e}", flush=True)
                            for h in lab.hosts:  # every vipd running again before the next run
                                if c.procs[h.name].poll() is not None:
                                    c.start(h)
                        res["runs"].append(rec)
                res["completed"] = True
            finally:
                c.stop_all()
                bgp.stop()
                etcd.stop()
    except KeyboardInterrupt:
        print("\ninterrupted; partial results are in the JSON", file=sys.stderr)
    except Exception:  # noqa: BLE001 - the JSON keeps what was measured
        res["error"] = traceback.format_exc()
        print(res["error"], file=sys.stderr)
    res["duration_s"] = round(time.monotonic() - t_start, 1)
    res["summary"] = summarize(res["runs"], args.fault_list)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(res, indent=2, default=str) + "\n")
    print()
    print_table(res["summary"])
    print(f"\nJSON: {json_path}\nlogs: {workdir}")
    return 0 if res["completed"] and all(s["ok"] == s["runs"] for s in res["summary"]) else 1


if __name__ == "__main__":
    sys.exit(main())

"""vipd: how long one host takes to claim and announce N VIPs (bench/failover.py --claim 1,100,1000).

One host, one etcd, nothing else in the cluster: `vipd run -c FILE` with N VIPs (IPv4, 10.214.x.y/16
on the host's NIC, announce_count 1 so that the announcement part is one GARP per VIP), timed from
the moment the bench starts the process:
- ready: the `event=ready` log line (lease granted, controllers started);
- first / all addresses: the first and the Nth VIP present on the NIC (netlink dumps every 10 ms);
- all announced: the Nth `event=announced` log line (vipd logs it after sending a VIP's GARPs);
then SIGTERM and the time until every address is gone (a planned release of N VIPs).
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import time
from pathlib import Path
from typing import Any

import _common as C
from _drivers import LEASE_TTL

from vipd.lab import netns, topology
from vipd.lab.cluster import Cluster, VipDef
from vipd.lab.etcd import EtcdServer
from vipd.lab.topology import Lab

PREFIX = "vtf"


def claim_address(i: int) -> str:
    return f"10.214.{1 + i // 250}.{1 + i % 250}/16"


def claim_times(args: argparse.Namespace, workdir: Path, clock: C.Clock, out: dict[str, Any]) -> None:
    from dataclasses import asdict

    from vipd.config import TimingConfig

    timing = asdict(TimingConfig()) if args.timing == "defaults" else None
    out.update({"host": "h1", "announce_count": 1, "addresses": "10.214.x.y/16 on the host's NIC",
                "lease_ttls": args.claim_ttls, "timing": timing or "lab", "runs": []})
    left = topology.purge(PREFIX)
    if left:
        print(f"removed leftovers of an earlier bench: {left}")
    with Lab(PREFIX, n_hosts=1) as lab:
        etcd = EtcdServer(workdir / "etcd", host=str(lab.etcd_ip), client_port=2379, peer_port=2380,
                          netns=lab.etcd_ns, name=f"{PREFIX}etcd")
        etcd.start(timeout=15.0)
        try:
            for ttl, n in [(t, n) for t in args.claim_ttls for n in args.claim_counts]:
                print(f"[claim] {n} VIPs, lease TTL {ttl} s ...", flush=True)
                try:
                    r = claim_one(lab, etcd, n, workdir / f"n{n}-ttl{ttl}", clock, timing, ttl)
                except RuntimeError as e:
                    r = {"vips": n, "lease_ttl": ttl, "error": str(e)}
                out["runs"].append(r)
                print(f"[claim] {n} VIPs, TTL {ttl} s: " + (f"error {r['error']}" if "error" in r else
                      f"ready {C.fmt_ms(r.get('ready_ms'))} ms, all addresses {C.fmt_ms(r.get('all_addresses_ms'))} ms, "
                      f"all announced {C.fmt_ms(r.get('all_announced_ms'))} ms, released {C.fmt_ms(r.get('released_ms'))} ms"),
                      flush=True)
        finally:
            etcd.stop()


def claim_one(lab: Lab, etcd: EtcdServer, n: int, workdir: Path, clock: C.Clock,
              timing: dict[str, Any] | None, lease_ttl: int = LEASE_TTL) -> dict[str, Any]:
    host = lab.hosts[0]
    vips = [VipDef(f"v{i}", claim_address(i), extra={"announce_count": 1}) for i in range(n)]
    want = {ipaddress.ip_interface(v.address).ip for v in vips}
    cluster = Cluster(lab, workdir, vips, endpoints=[etcd.endpoint], lease_ttl=lease_ttl,
                      prefix=f"/vipd/{PREFIX}-claim-{n}-{lease_ttl}/", timing=timing)
    log = C.KeyValueLog(cluster.log_path(host), clock)
    limit = 20.0 + 0.04 * n  # generous: a daemon that works needs a fraction of this
    rec: dict[str, Any] = {"vips": n, "lease_ttl": lease_ttl, "limit_s": limit, "config": str(cluster.config_path(host))}

    def present() -> int:
        return sum(1 for a in netns.addresses(host.ns) if a.ip in want)

    t0 = time.monotonic()
    proc = cluster.start(host)
    try:
        first = full = None
        most = 0
        while time.monotonic() - t0 < limit and proc.poll() is None:
            k = present()
            now = time.monotonic()
            most = max(most, k)
            if k and first is None:
                first = now
            if k == n:
                full = now
                break
            time.sleep(0.01)
        rec["first_address_ms"] = None if first is None else round((first - t0) * 1e3, 1)
        rec["all_addresses_ms"] = None if full is None else round((full - t0) * 1e3, 1)
        rec["most_present"] = n if full is not None else most
        def nth_distinct() -> float | None:
            """When the Nth distinct VIP got its first `announced` line (re-announcements after a
            re-add do not count twice)."""
            seen: set[str] = set()
            for ln in log.select(["announced"]):
                seen.add(ln.fields.get("vip", ""))
                if len(seen) >= n:
                    return ln.t
            return None

        ok = C.wait_until(nth_distinct, max(0.0, t0 + limit - time.monotonic()) if full is not None else 0.0, 0.05)
        ann = log.select(["announced"])
        t_all = nth_distinct()
        rec["announced_lines"] = len(ann)
        rec["announced_vips"] = len({ln.fields.get("vip") for ln in ann})
        rec["all_announced_ms"] = round((t_all - t0) * 1e3, 1) if t_all is not None else None
        rec["first_announced_ms"] = round((ann[0].t - t0) * 1e3, 1) if ann else None
        ready = log.select(["ready"])
        rec["ready_ms"] = round((ready[0].t - t0) * 1e3, 1) if ready else None
        if proc.poll() is None:
            pid = C.main_pid(proc.pid)
            rec["cpu_seconds_until_now"] = round(C.proc_cpu_seconds(pid), 3)
            rec["vmrss_kib"] = C.proc_status(pid).get("VmRSS")
        # churn: addresses that went missing while owned (the kernel lifetime ran out, ...), failed claims
        rec["log_events"] = {e: len(log.select([e])) for e in ("address_missing", "address_claim_failed",
                                                              "owner_key_delete_failed", "watch_failed",
                                                              "keepalive_failed", "lease_lost")}
        if full is None:
            rec["error"] = (f"never all {n} addresses within {limit:.0f} s: at most {most} at once, {present()} at "
                            f"the end; {rec['log_events']['address_missing']} address_missing log lines"
                            + ("" if proc.poll() is None else f" (vipd exited {proc.returncode})"))
        if not ok and "error" not in rec:
            rec["error"] = f"{rec['announced_vips']}/{n} VIPs announced after {limit:.0f} s"
        # planned release of all N
        t1 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        gone = C.wait_until(lambda: present() == 0, 30.0, 0.01)
        rec["released_ms"] = round((time.monotonic() - t1) * 1e3, 1) if gone else None
        try:
            rec["exit_code"] = proc.wait(15)
        except Exception:
            rec["exit_code"] = None
        return rec
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(15)
            except Exception:
                proc.kill()
                proc.wait(5)
        # whatever the daemon left (e.g. after an error): the next count starts from a clean NIC
        leftover = [a for a in netns.addresses(host.ns) if a.ip in want]
        if leftover:
            netns.ip_batch((f"addr del {a.ip}/{a.prefixlen} dev {host.ifname}" for a in leftover), ns=host.ns,
                           force=True)

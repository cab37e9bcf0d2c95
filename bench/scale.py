"""vipd at scale (issue 13): many VIPs on one host, and a 3-host cluster with many more.

Single host (`--host-vips N`, default 1000): N VIPs on the host's NIC (IPv4 /32 and IPv6 /128
alternating) plus N on `lo`, one etcd, vipd with its shipped timing (lease TTL 10 s, a keepalive
a second; `--timing ttl3`: lease TTL 3 s, a keepalive every 0.3 s), started as systemd starts it. Measured from the `lease_granted` log line: when 10/50/90/100 % of the 2N addresses are
present (raw rtnetlink dumps every ~50 ms), when the last NIC VIP was announced, where the claims
spent their time (the start probe's round, the first and last campaign won); then, for
`--steady S` seconds: CPU (share of one core; and the share spent collecting garbage,
vipd_gc_pause_seconds) and RSS of vipd, etcd requests per second (etcd's own
gRPC counters, which the JSON gateway goes through), and every expiry / re-add / fence / failed etcd
request in vipd's log; then etcd frozen for `--stall S` seconds (the fewest addresses present, and
the trouble it cost). Then SIGTERM: time until every address is gone and how many were left when
the process exited. Also the footprint at 10 VIPs: idle RSS, start to ready (and how much of it
is importing vipd.app), and `vipd cleanup` start to first removal.

Cluster (`--cluster-vips M`, default 10000, 0 skips it): three hosts with the same M VIPs on their
NIC (`--cluster-on lo`: on lo, routed VIPs, which have no token fence and so fail over by the lease
on a crash), vipd's default placement (preemption on: each VIP is handed to the host placement
assigns once that host has been up `preempt_delay`; `--placement lab`: the lab's, without
preemption, where the first host up keeps what it took), fast takeover on (`[peers]` on the hosts'
lab addresses; `--no-peers`: lease takeover only). Settled = every VIP held by
exactly one host; placed (default placement) = every VIP held by exactly the host placement
assigns it, a third each; then CPU per host (and its garbage collection share), etcd requests per second
and successor renames (churn: a live successor is kept) at steady state; then a planned
stop (SIGTERM) of the host holding the most VIPs: per VIP, when another host holds it
(p10/p50/p90/all, polled every ~50 ms), when it was announced there (the `announced` line,
after its last burst) and how many announcements failed, when the stopping host had marked its
first and last key released (`keys_marked_s`) and when it revoked its lease, the CPU seconds it
used from the signal to its exit (`stopping_host_cpu_s`) and the takers until all were held
(`cpu_s`), the successor renames and handovers to the preferred host the others logged in the
10 s after the signal (`after`: the stop's own renames, churn between the two left, and
preemption moving back what the less preferred one took), and how many of
the other hosts' VIPs their own token fence dropped meanwhile (a successor's grant with no
live element darkens its whole group: read every 20 ms by bench/_fence_sample.py, and for 2 s
at rest before the signal, `dark_at_rest`, as a check);
then (`--no-crash` skips it) the busier of the other two is SIGKILLed and the same for the last
taking its VIPs; and how many
successor renames (`successor_named`) each host logged; a cluster that does not settle in
`--settle-timeout` reports how many VIPs each host held and its suspicions, failed keepalives,
lost leases, renames and re-added addresses (`unsettled_events`). All three vipd
and etcd share this machine's cores: a stop's work on every host competes for them.

Runs as root, in namespaces named vts* (removed on exit; a killed run's leftovers are removed by the
next). Output: a table on stdout and bench/out/scale-<ts>.json, with every log in bench/out/scale-<ts>/.

    sudo .venv/bin/python bench/scale.py                       # everything
    sudo .venv/bin/python bench/scale.py --cluster-vips 0      # single host only
    sudo .venv/bin/python bench/scale.py --host-vips 100 --steady 30 --cluster-vips 3000 --runs 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import _common as C
from _fence_sample import FenceSampler

from vipd.config import EtcdConfig, TimingConfig
from vipd.lab import topology
from vipd.lab.cluster import Cluster, vipd_argv
from vipd.lab.etcd import EtcdServer
from vipd.lab.scale import log_events, loop_stalls, loop_tasks, scale_vips, tagged_addresses, trouble, vip_ips
from vipd.lab.topology import Lab
from vipd.election.hosts import HostInfo, rankings
from vipd.model import Unit, VipSpec

PREFIX = "vts"
# log events counted per host when a cluster does not settle
UNSETTLED = ("peer_suspected", "keepalive_failed", "lease_lost", "successor_named", "address_missing")


def profile(name: str) -> dict[str, Any]:
    """Cluster keyword arguments: vipd's shipped defaults (lease TTL 10 s, a keepalive a second), or
    "ttl3": the lab's lease TTL 3 s with the shipped keepalives per TTL (one every 0.3 s) and the lab's
    etcd request timeout 0.5 s (what this bench measured before it had this option)."""
    if name == "ttl3":
        return {"timing": asdict(TimingConfig())}
    return {"lease_ttl": EtcdConfig().lease_ttl, "timing": asdict(TimingConfig()),
            "etcd_extra": {"request_timeout": EtcdConfig().request_timeout}}
_TS_RE = re.compile(r"^(\S+)Z \w+ event=(\w+)")


def log_time(path: Path, event: str, nth: int = 1) -> float | None:
    """time.time() of the nth line with this event."""
    seen = 0
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        m = _TS_RE.match(line)
        if m and m.group(2) == event:
            seen += 1
            if seen == nth:
                return dt.datetime.fromisoformat(m.group(1)).replace(tzinfo=dt.timezone.utc).timestamp()
    return None


_MARKED_RE = re.compile(r"^(\S+)Z \w+ event=transition .*from=releasing to=stopped")


def keys_marked(path: Path, since: float) -> dict[str, Any]:
    """The stopping host's part of a planned stop: seconds from `since` (time.time()) to its first
    and last key marked released (a unit's RELEASING -> STOPPED, logged once its mark landed)."""
    times = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        m = _MARKED_RE.match(line)
        if m:
            t = dt.datetime.fromisoformat(m.group(1)).replace(tzinfo=dt.timezone.utc).timestamp() - since
            if t >= 0:
                times.append(t)
    return {"first_s": round(min(times), 3) if times else None, "last_s": round(max(times), 3) if times else None,
            "count": len(times)}


_AFTER_RE = re.compile(r"^(\S+)Z \w+ event=(successor_named|handover_to_preferred) ")
AFTER_WINDOW = 10.0  # s after a planned stop's signal in which the survivors' renames and handovers are counted


def after_stop(paths: list[Path], since: float) -> dict[str, int]:
    """What the other hosts logged in the AFTER_WINDOW seconds after `since` (time.time()):
    successor renames, all and those to nobody (the stop's own, for the units it succeeded, and
    any churn between the survivors), and handovers to the preferred host (preemption moving
    back what a host other than the preferred one took over)."""
    out = {"renames": 0, "renames_to_nobody": 0, "handovers": 0}
    for path in paths:
        for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
            m = _AFTER_RE.match(line)
            if m and 0 <= dt.datetime.fromisoformat(m.group(1)).replace(
                    tzinfo=dt.timezone.utc).timestamp() - since < AFTER_WINDOW:
                if m.group(2) == "handover_to_preferred":
                    out["handovers"] += 1
                else:
                    out["renames"] += 1
                    out["renames_to_nobody"] += " successor=- " in line
    return out


_WON_RE = re.compile(r'^(\S+)Z \w+ event=transition .*to=acquiring reason="campaign won"')
_PROBE_RE = re.compile(r"^\S+Z \w+ event=start_probe .*took=([0-9.]+)")


def claim_phases(path: Path, granted: float) -> dict[str, Any]:
    """Where a start's claims spend their time, from the daemon's log: its start probe's round
    (`start_probe ... took=`, seconds) and, after the lease grant (`granted`, time.time()), its
    first and last campaign won (the units' BACKUP -> ACQUIRING)."""
    won, took = [], None
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        m = _WON_RE.match(line)
        if m:
            won.append(dt.datetime.fromisoformat(m.group(1)).replace(tzinfo=dt.timezone.utc).timestamp() - granted)
        elif took is None and (p := _PROBE_RE.match(line)):
            took = float(p.group(1))
    return {"start_probe_took_s": took, "campaigns_won_first_s": round(min(won), 3) if won else None,
            "campaigns_won_last_s": round(max(won), 3) if won else None, "campaigns_won": len(won)}


_TRANSITION_RE = re.compile(r"^(\S+)Z \w+ event=transition vip=(\S+) .*?from=(\w+) to=(\w+)")


def _transitions(path: Path, since: float, moves: set[tuple[str, str]]) -> dict[tuple[str, str], dict[str, float]]:
    """(from, to) -> {unit: seconds from `since` (time.time()) to its first such transition after it}."""
    out: dict[tuple[str, str], dict[str, float]] = {m: {} for m in moves}
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        m = _TRANSITION_RE.match(line)
        if m and (m.group(3), m.group(4)) in moves:
            t = dt.datetime.fromisoformat(m.group(1)).replace(tzinfo=dt.timezone.utc).timestamp() - since
            if t >= 0:
                out[(m.group(3), m.group(4))].setdefault(m.group(2), t)
    return out


def stop_phases(stopping: Path, takers: list[Path], since: float) -> dict[str, Any]:
    """Where a planned stop's time goes, per unit the stopping host owned, from the logs: from its
    SIGTERM (`since`, time.time()) to its OWNER -> RELEASING (the stop reached the unit); from there
    to its RELEASING -> STOPPED (its addresses removed, then its key's mark landed); from that
    mark to a taker's BACKUP -> ACQUIRING (its watch saw the mark, the unit campaigned and won);
    from there to that taker's ACQUIRING -> OWNER (its address added). p50 / p90 / max of each."""
    mine = _transitions(stopping, since, {("owner", "releasing"), ("releasing", "stopped")})
    reached, marked = mine[("owner", "releasing")], mine[("releasing", "stopped")]
    campaign: dict[str, float] = {}
    owned: dict[str, float] = {}
    for path in takers:
        theirs = _transitions(path, since, {("backup", "acquiring"), ("acquiring", "owner")})
        for unit, t in theirs[("backup", "acquiring")].items():
            if unit in marked and t < campaign.get(unit, math.inf):
                campaign[unit] = t
                owned.pop(unit, None)
                if unit in theirs[("acquiring", "owner")]:
                    owned[unit] = theirs[("acquiring", "owner")][unit]

    def spread(values: list[float]) -> dict[str, Any]:
        v = sorted(values)
        pick = lambda q: round(v[min(len(v) - 1, int(q * len(v)))], 3) if v else None  # noqa: E731
        return {"p50_s": pick(0.5), "p90_s": pick(0.9), "max_s": round(v[-1], 3) if v else None, "n": len(v)}

    return {"reached": spread(list(reached.values())),
            "marked_after_reached": spread([marked[u] - reached[u] for u in marked if u in reached]),
            "campaign_after_mark": spread([campaign[u] - marked[u] for u in campaign]),
            "owned_after_campaign": spread([owned[u] - campaign[u] for u in owned])}


_ANNOUNCED_RE = re.compile(r"^(\S+)Z \w+ event=(announced|announce_failed) vip=\S+ address=([^/\s]+)")


def announced(paths: list[Path], ips: set[Any], since: float, held: dict[Any, float]) -> dict[str, Any]:
    """Seconds from `since` (time.time()) to each of `ips` being announced by one of these logs
    (`announced`, logged once its last burst went out: count - 1 intervals after its first), the
    distribution, per VIP the lag from when it was first seen held there (`held`, seconds after
    the same instant: `lag_*`), and how many announcements failed (every frame refused)."""
    want = {str(ip) for ip in ips}
    first: dict[str, float] = {}
    failed = 0
    for path in paths:
        for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
            m = _ANNOUNCED_RE.match(line)
            if not m or m.group(3) not in want:
                continue
            t = dt.datetime.fromisoformat(m.group(1)).replace(tzinfo=dt.timezone.utc).timestamp() - since
            if t < 0:
                continue
            if m.group(2) == "announce_failed":
                failed += 1
            elif t < first.get(m.group(3), math.inf):
                first[m.group(3)] = t
    times = sorted(first.values())
    lags = sorted(t - held[ip] for ip, t in ((ipaddress.ip_address(a), t) for a, t in first.items()) if ip in held)

    def pct(xs: list[float], q: float) -> float | None:
        return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3) if xs else None

    return {"p50_s": pct(times, 0.5), "p90_s": pct(times, 0.9),
            "all_s": round(times[-1], 3) if len(times) == len(want) else None,
            "lag_p50_s": pct(lags, 0.5), "lag_p90_s": pct(lags, 0.9),
            "not_announced": len(want) - len(times), "failed": failed}


def metric_sum(text: str, series: str) -> float:
    """The sum of every sample of `series` (its name and the label brace) in a Prometheus text page."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series + "{"))


def etcd_requests(lab: Lab, etcd: EtcdServer) -> float:
    """etcd's total of gRPC request messages received, unary and streamed (keepalives, watches):
    the JSON gateway's requests go through gRPC."""
    out = lab.run(lab.etcd_ns, [sys.executable, "-c", "import urllib.request;print(urllib.request.urlopen("
                                f"'{etcd.endpoint}/metrics',timeout=3).read().decode())"], check=False).stdout
    return metric_sum(out, "grpc_server_msg_received_total")


def cpu_rss(pid: int) -> tuple[float, int]:
    return C.proc_cpu_seconds(pid), C.proc_status(pid).get("VmRSS", 0)


def gc_seconds(cluster: Cluster) -> list[float]:
    """Per host, the seconds vipd spent in garbage collection so far (vipd_gc_pause_seconds)."""
    return [metric_sum(cluster.metrics(h), "vipd_gc_pause_seconds_sum") for h in cluster.lab.hosts]


def steady(lab: Lab, etcd: EtcdServer, pids: list[int], seconds: float, cluster: Cluster) -> dict[str, Any]:
    cpu0 = [C.proc_cpu_seconds(p) for p in pids]
    split0 = [C.proc_cpu_split(p) for p in pids]
    wake0 = [C.proc_wakeups(p) for p in pids]
    gc0 = gc_seconds(cluster)
    ops0, t0 = etcd_requests(lab, etcd), time.monotonic()
    rss_max = [0] * len(pids)
    while time.monotonic() - t0 < seconds:
        time.sleep(min(1.0, seconds))
        rss_max = [max(m, C.proc_status(p).get("VmRSS", 0)) for m, p in zip(rss_max, pids)]
    elapsed = time.monotonic() - t0
    return {"seconds": round(elapsed, 1),
            "cpu_percent": [round(100 * (C.proc_cpu_seconds(p) - c) / elapsed, 2) for p, c in zip(pids, cpu0)],
            "cpu_user_sys_percent": [[round(100 * (now - then) / elapsed, 1) for now, then in zip(C.proc_cpu_split(p), s0)]
                                     for p, s0 in zip(pids, split0)],
            "rss_mib_max": [round(r / 1024, 1) for r in rss_max],
            "loop_wakeups_per_s": [round((C.proc_wakeups(p) - w) / elapsed, 1) for p, w in zip(pids, wake0)],
            "gc_percent": [round(100 * (now - then) / elapsed, 2) for now, then in zip(gc_seconds(cluster), gc0)],
            "etcd_requests_per_s": round((etcd_requests(lab, etcd) - ops0) / elapsed, 2)}


def single_host(args: argparse.Namespace, work: Path, n: int, run: int) -> dict[str, Any]:
    vips = scale_vips(n, n)
    wanted = vip_ips(vips)
    with Lab(PREFIX, n_hosts=1) as lab:
        etcd = EtcdServer(work / f"etcd-{n}-{run}", host=str(lab.etcd_ip), client_port=2379, peer_port=2380,
                          netns=lab.etcd_ns, name=f"{PREFIX}etcd")
        etcd.start(timeout=15.0)
        try:
            cluster = Cluster(lab, work / f"host-{n}-{run}", vips, endpoints=[etcd.endpoint],
                              **profile(args.timing))
            h = lab.hosts[0]
            started = time.time()
            proc = cluster.start(h)
            pid = C.main_pid(proc.pid)
            marks: dict[int, float] = {}
            deadline = time.monotonic() + args.settle_timeout
            while time.monotonic() < deadline and 100 not in marks:
                count = len(tagged_addresses(h.ns) & wanted)
                for pct in (10, 50, 90, 100):
                    if pct not in marks and count >= pct * len(wanted) / 100:
                        marks[pct] = time.time()
                time.sleep(0.05)
            log = cluster.log_path(h)
            granted = log_time(log, "lease_granted") or started
            ready = log_time(log, "ready")
            nic = sum(1 for v in vips if v.interface is None)
            announced = C.wait_until(lambda: log_time(log, "announced", nth=nic), 10) if nic else None
            before = log_events(log)
            result: dict[str, Any] = {
                "nic_vips": nic, "lo_vips": len(vips) - nic,
                "start_to_ready_s": round(ready - started, 3) if ready else None,
                "claimed_s_after_lease": {f"{p}%": round(marks[p] - granted, 3) if p in marks else None
                                          for p in (10, 50, 90, 100)},
                "announced_all_s_after_lease": round(announced - granted, 3) if announced else None,
                "claim_phases": claim_phases(log, granted),
                "trouble_while_settling": trouble(before)}
            if 100 in marks and args.steady > 0:
                result["steady"] = steady(lab, etcd, [pid], args.steady, cluster)
                after = log_events(log)
                result["trouble_while_steady"] = {k: v - before.get(k, 0) for k, v in trouble(after).items()
                                                  if v - before.get(k, 0)}
                result["present_after_steady"] = len(tagged_addresses(h.ns) & wanted)
            if 100 in marks and args.stall > 0:
                result["etcd_stall"] = etcd_stall(args.stall, etcd, log, lambda: len(tagged_addresses(h.ns) & wanted))
            t0 = time.monotonic()
            cluster.signal(h, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            result["stop_exit_s"] = round(time.monotonic() - t0, 3)
            result["left_after_exit"] = len(tagged_addresses(h.ns) & wanted)
            return result
        finally:
            etcd.stop()


def etcd_stall(seconds: float, etcd: EtcdServer, log: Path, present: Any) -> dict[str, Any]:
    """etcd frozen (SIGSTOP) for `seconds`, as a leader election leaves keepalives unanswered: the
    fewest addresses present while frozen and 2 s after, and the trouble lines it cost (a failed
    keepalive is the fault itself, not counted)."""
    before = log_events(log)
    fewest = present()
    etcd.pause()
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            fewest = min(fewest, present())
            time.sleep(0.1)
    finally:
        etcd.resume()
    end = time.monotonic() + 2
    while time.monotonic() < end:
        fewest = min(fewest, present())
        time.sleep(0.1)
    after = log_events(log)
    return {"seconds": seconds, "fewest_present": fewest,
            "trouble": {k: v - before.get(k, 0) for k, v in trouble(after).items()  # (the freeze is the fault)
                        if v - before.get(k, 0) and k != "keepalive_failed"},
            "catch_ups": after.get("lifetimes_caught_up", 0) - before.get("lifetimes_caught_up", 0)}


def byte_compile() -> None:
    """Compile vipd's sources as the Debian package does at install (postinst: compileall), so
    start figures are the shipped ones even where PYTHONDONTWRITEBYTECODE is set (each start would
    otherwise compile every module again: ~0.1 s here)."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(C.ROOT / "vipd")], check=True,
                   stdout=subprocess.DEVNULL)


def import_seconds(runs: int = 3) -> float:
    """The fastest of `runs` fresh interpreters importing the daemon (vipd.app): the part of start
    to ready that is Python loading trio, pyroute2, httpx and prometheus-client."""
    times = []
    for _ in range(runs):
        t = time.monotonic()
        subprocess.run([sys.executable, "-c", "import vipd.app"], check=True, cwd=C.ROOT)
        times.append(time.monotonic() - t)
    return round(min(times), 3)


def footprint(args: argparse.Namespace, work: Path, run: int) -> dict[str, Any]:
    """10 VIPs: start to ready, idle RSS and CPU, and vipd cleanup's start to first removal."""
    vips = scale_vips(5, 5)
    byte_compile()
    with Lab(PREFIX, n_hosts=1) as lab:
        etcd = EtcdServer(work / f"etcd-fp-{run}", host=str(lab.etcd_ip), client_port=2379, peer_port=2380,
                          netns=lab.etcd_ns, name=f"{PREFIX}etcd")
        etcd.start(timeout=15.0)
        try:
            cluster = Cluster(lab, work / f"fp-{run}", vips, endpoints=[etcd.endpoint],
                              **profile(args.timing))
            h = lab.hosts[0]
            started = time.time()
            proc = cluster.start(h)
            pid = C.main_pid(proc.pid)
            C.wait_until(lambda: log_time(cluster.log_path(h), "ready"), 15)
            ready = log_time(cluster.log_path(h), "ready")
            C.wait_until(lambda: len(tagged_addresses(h.ns)) >= len(vips), 15)
            idle = steady(lab, etcd, [pid], args.idle, cluster)
            # a crash under systemd: SIGKILL, then ExecStopPost=vipd cleanup
            os.kill(pid, signal.SIGKILL)
            proc.wait(10)
            t = time.time()
            out = subprocess.run(["ip", "netns", "exec", h.ns, *vipd_argv(), "cleanup", "-c",
                                  str(cluster.config_path(h))], capture_output=True, text=True, timeout=30)
            done = time.time()
            first = None
            for line in (out.stdout + out.stderr).splitlines():
                m = _TS_RE.match(line)
                if m and m.group(2) == "cleanup_address_removed":
                    first = dt.datetime.fromisoformat(m.group(1)).replace(tzinfo=dt.timezone.utc).timestamp()
                    break
            return {"start_to_ready_s": round(ready - started, 3) if ready else None,
                    "idle_rss_mib": idle["rss_mib_max"][0], "idle_cpu_percent": idle["cpu_percent"][0],
                    "idle_loop_wakeups_per_s": idle["loop_wakeups_per_s"][0],
                    "cleanup_first_removal_s": round(first - t, 3) if first else None,
                    "cleanup_total_s": round(done - t, 3), "left_after_cleanup": len(tagged_addresses(h.ns)),
                    "import_s": import_seconds()}
        finally:
            etcd.stop()


def holders(lab: Lab) -> dict[str, set[Any]]:
    return {h.name: tagged_addresses(h.ns) for h in lab.hosts}


def placed(vips: list[Any], hosts: list[str]) -> dict[Any, str]:
    """VIP IP -> the host vipd's placement (the host directory's `rankings`) assigns it with every
    host healthy (one-VIP units, as the bench configures them)."""
    units = [Unit(v.name, (VipSpec(v.name, ipaddress.ip_interface(v.address), v.interface or "eth0"),)) for v in vips]
    ranked = rankings(units, {h: HostInfo(h) for h in hosts})
    return {ipaddress.ip_interface(v.address).ip: ranked[v.name][0] for v in vips}


def moves(lab: Lab, ips: set[Any], to: list[Any], t0: float, timeout: float,
          seen: dict[Any, float] | None = None) -> dict[str, Any]:
    """Poll the hosts `to` (every ~50 ms) until each of `ips` is held by one of them: per VIP, the
    first poll it was seen there, in seconds after t0 (into `seen`, if given); the distribution,
    and how many never moved."""
    seen = {} if seen is None else seen
    while len(seen) < len(ips) and time.monotonic() - t0 < timeout:
        held = holders(lab)
        now = time.monotonic() - t0
        for ip in ips - seen.keys():
            if any(ip in held[h.name] for h in to):
                seen[ip] = now
        time.sleep(0.05)
    times = sorted(seen.values())

    def pct(q: float) -> float | None:
        return round(times[min(len(times) - 1, int(q * len(times)))], 3) if times else None

    return {"vips": len(ips), "p10_s": pct(0.1), "p50_s": pct(0.5), "p90_s": pct(0.9),
            "all_s": round(times[-1], 3) if times and len(times) == len(ips) else None,
            "not_moved": len(ips) - len(times)}


def cluster_case(args: argparse.Namespace, work: Path, m: int, run: int) -> dict[str, Any]:
    vips = scale_vips(m, 0) if args.cluster_on == "nic" else scale_vips(0, m)
    wanted = vip_ips(vips)
    with Lab(PREFIX, n_hosts=3) as lab:
        etcd = EtcdServer(work / f"etcd-c{m}-{run}", host=str(lab.etcd_ip), client_port=2379, peer_port=2380,
                          netns=lab.etcd_ns, name=f"{PREFIX}etcd")
        etcd.start(timeout=15.0)
        try:
            placement = {} if args.placement == "default" else {"preempt": False}  # (the lab's own default)
            cluster = Cluster(lab, work / f"cluster-{m}-{run}", vips, endpoints=[etcd.endpoint],
                              placement={"preempt": True, **placement}, **profile(args.timing))
            if args.no_peers:  # (on by default in vipd: it must be turned off)
                for h in lab.hosts:
                    cluster.host_tables[h.name] = {"peers": {"enabled": False}}
            else:  # fast takeover: heartbeats between the hosts' lab addresses
                timing = {}
                if args.peers_timing:
                    grace, lease, interval = (float(x) for x in args.peers_timing.split(","))
                    timing = {"grace": grace, "lease": lease, "interval": interval}
                for h in lab.hosts:
                    cluster.host_tables[h.name] = {"peers": {"address": str(h.ip.ip), **timing}}
            t0 = time.monotonic()
            cluster.start_all()
            pids = [C.main_pid(p.pid) for p in cluster.procs.values()]

            def settled() -> bool:
                held = holders(lab)
                return all(sum(ip in s for s in held.values()) == 1 for ip in wanted)

            ok = C.wait_until(settled, args.settle_timeout, interval=0.2)
            result: dict[str, Any] = {"vips": m, "on": args.cluster_on, "peers": not args.no_peers,
                                      "peers_timing": args.peers_timing or "shipped", "placement": args.placement,
                                      "settled_s": round(time.monotonic() - t0, 2) if ok else None,
                                      "per_host": {k: len(v & wanted) for k, v in holders(lab).items()}}
            if ok and args.placement == "default":  # preemption hands each VIP to its placed host
                target = placed(vips, [h.name for h in lab.hosts])

                def as_placed() -> bool:
                    held = holders(lab)
                    return all(ip in held[target[ip]] and sum(ip in s for s in held.values()) == 1 for ip in wanted)

                done = C.wait_until(as_placed, args.settle_timeout, interval=0.2)
                result["placed_s"] = round(time.monotonic() - t0, 2) if done else None
                result["per_host_placed"] = {k: len(v & wanted) for k, v in holders(lab).items()}
                if not done:
                    return result
            # trio batches past the peer lease while settling (vipd/loopwatch.py)
            result["loop_stalls"] = {h.name: loop_stalls(cluster.log_path(h)) for h in lab.hosts}
            if args.loop_tasks:  # which tasks the long batches spent their time in (vipd/loopwatch.py TaskTimes)
                result["loop_tasks"] = {h.name: loop_tasks(cluster.log_path(h)) for h in lab.hosts}
            if not ok:  # what the hosts logged meanwhile: why it did not settle
                events = {h.name: log_events(cluster.log_path(h)) for h in lab.hosts}
                result["unsettled_events"] = {name: {k: e.get(k, 0) for k in UNSETTLED}
                                              for name, e in events.items()}
                return result
            named = {h.name: log_events(cluster.log_path(h)).get("successor_named", 0) for h in lab.hosts}
            result["steady"] = steady(lab, etcd, pids, args.steady, cluster)
            result["steady"]["successor_renames"] = {  # churn at rest: a live successor is kept
                h.name: log_events(cluster.log_path(h)).get("successor_named", 0) - named[h.name] for h in lab.hosts}
            # the busiest host stops (with `--placement lab` placement need not have given every
            # host a third), then the busier of the other two is lost
            pid_of = {h.name: p for h, p in zip(lab.hosts, pids)}
            held = holders(lab)
            stop, *rest = sorted(lab.hosts, key=lambda h: (-len(held[h.name] & wanted), h.name))
            moved = held[stop.name] & wanted
            cpu0 = [C.proc_cpu_seconds(pid_of[h.name]) for h in rest]
            calm = FenceSampler(rest)  # at rest, for 2 s before the signal: none (checks the reader too)
            calm.start()
            time.sleep(2.0)
            calm.stop()
            result["dark_at_rest"] = calm.result()
            sampler = FenceSampler(rest)  # from the signal until the announcements are in
            sampler.start()
            t1, wall = time.monotonic(), time.time()
            stopping_cpu = C.CpuToExit(pid_of[stop.name])
            cluster.signal(stop, signal.SIGTERM)
            held_at: dict[Any, float] = {}
            result["planned_stop"] = moves(lab, moved, rest, t1, 60, held_at)
            result["planned_stop"]["host"] = stop.name
            result["planned_stop"]["all_held_elsewhere_s"] = result["planned_stop"]["all_s"]
            result["planned_stop"]["cpu_s"] = [round(C.proc_cpu_seconds(pid_of[h.name]) - c, 2)
                                               for h, c in zip(rest, cpu0)]
            result["planned_stop"]["stopping_host_cpu_s"] = stopping_cpu.result()  # (before it is reaped)
            cluster.procs[stop.name].wait(30)
            revoked = log_time(cluster.log_path(stop), "lease_revoked")  # (its log is complete once it exited)
            result["planned_stop"]["lease_revoked_s"] = round(revoked - wall, 3) if revoked else None
            result["planned_stop"]["keys_marked_s"] = keys_marked(cluster.log_path(stop), wall)
            result["planned_stop"]["phases"] = stop_phases(cluster.log_path(stop), [cluster.log_path(h) for h in rest],
                                                           wall)
            for _ in range(50):  # their last bursts are a few intervals after the last claim: up to 5 s more
                result["planned_stop"]["announced"] = announced([cluster.log_path(h) for h in rest], moved, wall,
                                                                held_at)
                if not result["planned_stop"]["announced"]["not_announced"]:
                    break
                time.sleep(0.1)
            sampler.stop()
            result["planned_stop"]["dark"] = sampler.result()
            time.sleep(max(0.0, wall + AFTER_WINDOW - time.time()))
            result["planned_stop"]["after"] = after_stop([cluster.log_path(h) for h in rest], wall)
            if args.crash:  # then the busier of the other two is lost (SIGKILL): the last takes its VIPs
                time.sleep(2.0)
                held = holders(lab)
                lost_host, last = sorted(rest, key=lambda h: (-len(held[h.name] & wanted), h.name))
                lost = held[lost_host.name] & wanted
                t2 = time.monotonic()
                cluster.signal(lost_host, signal.SIGKILL)
                result["crash"] = moves(lab, lost, [last], t2, 60)
                result["crash"]["host"] = lost_host.name
            events = {h.name: log_events(cluster.log_path(h)) for h in lab.hosts}
            result["trouble"] = {name: trouble(e) for name, e in events.items()}
            result["successor_renames"] = {name: e.get("successor_named", 0) for name, e in events.items()}
            return result
        finally:
            cluster.stop_all()
            etcd.stop()


def med(values: list[Any]) -> Any:
    nums = [v for v in values if isinstance(v, (int, float))]
    return round(statistics.median(nums), 3) if nums else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host-vips", type=int, default=1000, help="NIC VIPs (and as many on lo) on one host; 0 skips")
    p.add_argument("--cluster-vips", type=int, default=10000, help="VIPs in the 3-host cluster; 0 skips")
    p.add_argument("--steady", type=float, default=60.0, help="seconds of steady state measured")
    p.add_argument("--idle", type=float, default=10.0, help="seconds of idle measurement at 10 VIPs")
    p.add_argument("--settle-timeout", type=float, default=120.0)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--no-footprint", action="store_true")
    p.add_argument("--stall", type=float, default=5.0,
                   help="single host: seconds etcd is frozen after the steady phase (0 skips)")
    p.add_argument("--cluster-on", choices=("nic", "lo"), default="nic",
                   help="cluster: VIPs on the hosts' NIC (token fence, fast takeover) or on lo (routed VIPs: "
                        "no token fence, so a crash fails over by the lease)")
    p.add_argument("--placement", choices=("default", "lab"), default="default",
                   help="cluster: vipd's default placement (preemption on: each VIP is handed to the host placement "
                        "assigns, 5 s after it is up), or the lab's (no preemption: the first host up keeps what it took)")
    p.add_argument("--no-peers", action="store_true", help="cluster: fast takeover off (lease takeover only)")
    p.add_argument("--loop-tasks", action="store_true",
                   help="cluster: vipd times every task step (VIPD_LOOP_TASKS=1) and the JSON says which tasks "
                        "the long batches while settling spent their time in (loop_tasks)")
    p.add_argument("--peers-timing", metavar="G,L,H",
                   help="cluster: [peers] grace, lease and interval (s) instead of the shipped 0.13,0.09,0.01")
    p.add_argument("--crash", action=argparse.BooleanOptionalAction, default=True,
                   help="cluster: after the planned stop, SIGKILL the busier host left and measure the last taking its VIPs")
    p.add_argument("--timing", choices=("shipped", "ttl3"), default="shipped",
                   help="vipd's defaults (lease TTL 10 s), or lease TTL 3 s (a keepalive every 0.3 s)")
    args = p.parse_args()
    if args.loop_tasks:
        os.environ["VIPD_LOOP_TASKS"] = "1"  # inherited by the daemons the lab starts
    if os.geteuid() != 0:
        print("bench/scale.py needs root (network namespaces)", file=sys.stderr)
        return 2
    ts = time.strftime("%Y%m%d-%H%M%S")
    work = C.ROOT / "bench" / "out" / f"scale-{ts}"
    work.mkdir(parents=True, exist_ok=True)
    left = topology.purge(PREFIX)
    if left:
        print(f"removed leftovers of an earlier bench: {left}")
    out: dict[str, Any] = {"environment": C.environment(), "args": vars(args), "host": [], "footprint": [],
                           "cluster": []}
    for run in range(args.runs):
        if not args.no_footprint:
            out["footprint"].append(footprint(args, work, run))
            print("[footprint]", out["footprint"][-1], flush=True)
        if args.host_vips:
            out["host"].append(single_host(args, work, args.host_vips, run))
            print("[host]", out["host"][-1], flush=True)
        if args.cluster_vips:
            out["cluster"].append(cluster_case(args, work, args.cluster_vips, run))
            print("[cluster]", out["cluster"][-1], flush=True)
    rows: list[list[Any]] = []
    if out["footprint"]:
        fp = out["footprint"]
        rows += [["10 VIPs: start to ready (s)", med([r["start_to_ready_s"] for r in fp])],
                 ["10 VIPs: idle RSS (MiB)", med([r["idle_rss_mib"] for r in fp])],
                 ["10 VIPs: idle CPU (% of a core)", med([r["idle_cpu_percent"] for r in fp])],
                 ["10 VIPs: idle loop wake-ups per second", med([r.get("idle_loop_wakeups_per_s") for r in fp])],
                 ["vipd cleanup: start to first removal (s)", med([r["cleanup_first_removal_s"] for r in fp])],
                 ["importing vipd.app (s)", med([r["import_s"] for r in fp])]]
    if out["host"]:
        hs = out["host"]
        n = hs[0]["nic_vips"]
        for pct in ("10%", "50%", "90%", "100%"):
            rows.append([f"{n}+{n} VIPs: {pct} claimed after lease (s)",
                         med([h["claimed_s_after_lease"][pct] for h in hs])])
        rows += [[f"{n}+{n} VIPs: all NIC VIPs announced after lease (s)", med([h["announced_all_s_after_lease"] for h in hs])],
                 [f"{n}+{n} VIPs: campaigns won after lease, first / last (s)",
                  "/".join(str(med([h["claim_phases"][k] for h in hs]))
                           for k in ("campaigns_won_first_s", "campaigns_won_last_s"))],
                 [f"{n}+{n} VIPs: start probe round (s)", med([h["claim_phases"]["start_probe_took_s"] for h in hs])],
                 [f"{n}+{n} VIPs: steady CPU (% of a core)", med([h.get("steady", {}).get("cpu_percent", [None])[0] for h in hs])],
                 [f"{n}+{n} VIPs: steady CPU user / kernel (% of a core)",
                  "/".join(str(med([h.get("steady", {}).get("cpu_user_sys_percent", [[None, None]])[0][i] for h in hs]))
                           for i in (0, 1))],
                 [f"{n}+{n} VIPs: steady loop wake-ups per second",
                  med([h.get("steady", {}).get("loop_wakeups_per_s", [None])[0] for h in hs])],
                 [f"{n}+{n} VIPs: steady garbage collection (% of a core)",
                  med([h.get("steady", {}).get("gc_percent", [None])[0] for h in hs])],
                 [f"{n}+{n} VIPs: steady RSS max (MiB)", med([h.get("steady", {}).get("rss_mib_max", [None])[0] for h in hs])],
                 [f"{n}+{n} VIPs: etcd requests/s steady", med([h.get("steady", {}).get("etcd_requests_per_s") for h in hs])],
                 [f"{n}+{n} VIPs: trouble lines while steady", sum(sum(h.get("trouble_while_steady", {}).values()) for h in hs)],
                 [f"{n}+{n} VIPs: etcd frozen {args.stall:g} s: fewest present / trouble lines",
                  "/".join(str(x) for x in (min((h["etcd_stall"]["fewest_present"] for h in hs if "etcd_stall" in h),
                                                default=None),
                                            sum(sum(h.get("etcd_stall", {}).get("trouble", {}).values()) for h in hs)))],
                 [f"{n}+{n} VIPs: SIGTERM to exit (s)", med([h["stop_exit_s"] for h in hs])],
                 [f"{n}+{n} VIPs: left after exit", max(h["left_after_exit"] for h in hs)]]
    cs = out["cluster"]
    if cs:
        m = cs[0]["vips"]

        def dist(phase: str) -> str:
            return " / ".join(str(med([c.get(phase, {}).get(k) for c in cs])) for k in ("p50_s", "p90_s", "all_s"))

        rows += [[f"3 hosts, {m} VIPs: settled (s)", med([c.get("settled_s") for c in cs])],
                 [f"3 hosts, {m} VIPs: placed, a third each (s; default placement)",
                  med([c.get("placed_s") for c in cs if "placed_s" in c]) if any("placed_s" in c for c in cs) else "-"],
                 [f"3 hosts, {m} VIPs: steady CPU per host (% of a core)",
                  " / ".join(str(med([c.get("steady", {}).get("cpu_percent", [None] * 3)[i] for c in cs])) for i in range(3))],
                 [f"3 hosts, {m} VIPs: steady garbage collection per host (% of a core)",
                  " / ".join(str(med([c.get("steady", {}).get("gc_percent", [None] * 3)[i] for c in cs])) for i in range(3))],
                 [f"3 hosts, {m} VIPs: successor renames while steady (all hosts)",
                  med([sum(c["steady"]["successor_renames"].values()) if "steady" in c else None for c in cs])],
                 [f"3 hosts, {m} VIPs: etcd requests/s steady", med([c.get("steady", {}).get("etcd_requests_per_s") for c in cs])],
                 [f"3 hosts, {m} VIPs: busiest host SIGTERM, its VIPs held elsewhere p50 / p90 / all (s)", dist("planned_stop")],
                 [f"3 hosts, {m} VIPs: ... and announced there (last burst) p50 / p90 / all (s)",
                  " / ".join(str(med([c.get("planned_stop", {}).get("announced", {}).get(k) for c in cs]))
                             for k in ("p50_s", "p90_s", "all_s"))],
                 [f"3 hosts, {m} VIPs: ... per VIP, seen held there to announced, p50 / p90 (s)",
                  " / ".join(str(med([c.get("planned_stop", {}).get("announced", {}).get(k) for c in cs]))
                             for k in ("lag_p50_s", "lag_p90_s"))],
                 [f"3 hosts, {m} VIPs: ... announcements that failed (every frame refused)",
                  " / ".join(str(c.get("planned_stop", {}).get("announced", {}).get("failed")) for c in cs)],
                 [f"3 hosts, {m} VIPs: survivors' VIPs dark in their own fence (dead grant): most at once, "
                  "dark samples / samples, VIP-s",
                  " ; ".join("{most_at_once}, {dark_samples}/{samples}, {vip_seconds}".format(**c["planned_stop"]["dark"])
                             for c in cs if "dark" in c.get("planned_stop", {}))],
                 [f"3 hosts, {m} VIPs: its SIGTERM to its first / last key marked released (s)",
                  " / ".join(str(med([c.get("planned_stop", {}).get("keys_marked_s", {}).get(k) for c in cs]))
                             for k in ("first_s", "last_s"))],
                 *[[f"3 hosts, {m} VIPs: stop phase, {label}, p50 / p90 / max (s)",
                    " ; ".join("{p50_s} / {p90_s} / {max_s}".format(**c["planned_stop"]["phases"][key])
                               for c in cs if "phases" in c.get("planned_stop", {}))]
                   for key, label in (("reached", "SIGTERM to the unit's RELEASING"),
                                      ("marked_after_reached", "then to its key marked"),
                                      ("campaign_after_mark", "then to a taker's campaign won"),
                                      ("owned_after_campaign", "then to the taker owning it"))],
                 [f"3 hosts, {m} VIPs: its SIGTERM to its lease revoked (s)",
                  med([c.get("planned_stop", {}).get("lease_revoked_s") for c in cs])],
                 [f"3 hosts, {m} VIPs: CPU from its SIGTERM: its own to its exit / the takers' until all held (s)",
                  " ; ".join(f"{c['planned_stop'].get('stopping_host_cpu_s')} / "
                             + " + ".join(str(x) for x in c["planned_stop"].get("cpu_s", []))
                             for c in cs if "planned_stop" in c)],
                 [f"3 hosts, {m} VIPs: the others in the {AFTER_WINDOW:g} s after the stop's signal: successor "
                  "renames (to nobody), handovers to the preferred host",
                  " ; ".join("{renames} ({renames_to_nobody}), {handovers}".format(**c["planned_stop"]["after"])
                             for c in cs if "after" in c.get("planned_stop", {}))],
                 [f"3 hosts, {m} VIPs: successor renames per run (all hosts)",
                  " / ".join(str(sum(c.get("successor_renames", {}).values())) for c in cs)],
                 [f"3 hosts, {m} VIPs: then the busier other SIGKILL, the last holds its VIPs p50 / p90 / all (s)", dist("crash")]]
    print(C.table(["measure", "median"], rows, right=[1]))
    path = work.with_suffix(".json")
    path.write_text(json.dumps(out, indent=2, default=str))
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

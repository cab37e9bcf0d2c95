"""Operating vipd: systemd notify/watchdog, ExecStopPost cleanup after a crash, link flaps,
stopping while etcd is unreachable, and a bad config that must change nothing."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from vipd.lab.cluster import VipDef, vipd_argv


def _ip(v: VipDef):  # type: ignore[no-untyped-def]
    return ipaddress.ip_interface(v.address).ip


def test_sd_notify_ready_status_and_watchdog(lab, make_cluster, tmp_path):
    c = make_cluster([VipDef("api", str(lab.vip4(0)))], start=False)
    h = lab.hosts[0]
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}
    env.pop("WATCHDOG_PID", None)
    proc = lab.popen(h.ns, [*vipd_argv(), "run", "-c", str(c.write_config(h))], log=c.log_path(h), env=env)
    c.procs[h.name] = proc
    got: list[str] = []
    deadline = time.monotonic() + 10
    try:
        while time.monotonic() < deadline and not (
                "READY=1" in got and got.count("WATCHDOG=1") >= 3):
            try:
                got += sock.recv(4096).decode().split("\n")
            except socket.timeout:
                pass
        assert "READY=1" in got, got
        assert any(line.startswith("STATUS=running") for line in got), got
        assert got.count("WATCHDOG=1") >= 3, got
        # a hung daemon stops feeding the watchdog (systemd would then kill and restart it)
        os.kill(proc.pid, 19)  # SIGSTOP
        time.sleep(0.3)
        while True:
            try:
                sock.recv(4096)
            except socket.timeout:
                break
        time.sleep(0.5)
        try:
            extra = sock.recv(4096).decode()
        except socket.timeout:
            extra = ""
        assert "WATCHDOG=1" not in extra
        os.kill(proc.pid, 18)  # SIGCONT
        c.term(h)
        try:
            tail = b""
            while True:
                tail += sock.recv(4096)
        except socket.timeout:
            pass
        assert b"STOPPING=1" in tail
    finally:
        sock.close()


def test_cleanup_after_crash_revokes_the_lease_after_removing_the_address(lab, lab_etcd, make_cluster):
    c = make_cluster([VipDef("api", str(lab.vip4(0)))])
    v = c.vips[0]
    old = c.wait_owner(_ip(v))
    host = c.host(old)
    lease = int((c.config_path(host).parent / "run" / "lease").read_text())
    c.kill(host)
    # what systemd's ExecStopPost runs after the crash
    r = c.run_cli(host, "cleanup")
    assert r.returncode == 0, r.stderr
    assert old not in lab.holders(_ip(v)), "cleanup left the VIP on the crashed host"
    assert "cleanup_lease_revoked" in r.stderr
    # revoked, not left to expire: the standby may win at once (bench/failover.py measures how fast)
    ttl = lab_etcd.request("/v3/lease/timetolive", {"ID": str(lease)})
    assert int(ttl.get("TTL", -1)) == -1, ttl
    new = c.wait_owner(_ip(v), exclude=[old], timeout=c.lease_ttl)
    assert new != old
    assert not (c.config_path(host).parent / "run" / "lease").exists()


def test_link_flap_reannounces(lab, make_cluster):
    # [peers] off: a 0.3 s flap outlasts the heartbeat grace, and the successor rightly takes over
    # (tests/lab/test_fast_takeover.py); this proves the link-up re-announcement of a kept VIP
    c = make_cluster([VipDef("api", str(lab.vip4(0)))], top_extra={"peers": {"enabled": False}})
    v = c.vips[0]
    owner = c.wait_owner(_ip(v))
    host = c.host(owner)
    log = c.log_path(host)
    time.sleep(0.5)
    before = log.read_text().count("event=announced")
    lab.cut(host)
    time.sleep(0.3)  # shorter than the lease slack: ownership survives the flap
    lab.restore(host)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and log.read_text().count("event=announced") <= before:
        time.sleep(0.05)
    assert log.read_text().count("event=announced") > before, "no announcement after the link came back"
    assert lab.holders(_ip(v)) == [owner]


def test_sigterm_while_etcd_unreachable_stops_cleanly(lab, lab_etcd, make_cluster):
    lab_etcd.kill()
    c = make_cluster([VipDef("api", str(lab.vip4(0)))])
    deadline = time.monotonic() + 20  # until each daemon runs and has found etcd unreachable (startup
    for h in lab.hosts:               # takes seconds on a loaded 2-core machine; before it, SIGTERM kills)
        while "event=watch_failed" not in c.log_path(h).read_text():
            assert time.monotonic() < deadline, c.log_tail()
            time.sleep(0.05)
    for h in lab.hosts:
        assert c.term(h, timeout=10) == 0
    assert all(lab.holders(_ip(v)) == [] for v in c.vips)
    log = c.log_path(lab.hosts[0]).read_text()
    assert "watch_failed" in log or "lease_grant_failed" in log, log
    assert "event=stopped" in log


def test_invalid_config_changes_nothing(lab, lab_etcd, make_cluster):
    c = make_cluster([VipDef("api", str(lab.vip4(0)))], start=False)
    h = lab.hosts[0]
    path = c.write_config(h)
    path.write_text(path.read_text() + "\n[bogus]\nkey = 1\n")
    before = lab.ip(h, "-o", "addr").stdout
    r = subprocess.run(["ip", "netns", "exec", h.ns, *vipd_argv(), "run", "-c", str(path)],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 2
    assert "bogus: unknown key" in r.stderr
    assert lab.ip(h, "-o", "addr").stdout == before
    # nothing was written to etcd either
    kvs = lab_etcd.request("/v3/kv/range", {"key": "Lw==", "range_end": "MA=="})
    assert not kvs.get("kvs"), kvs
    # a missing interface is a config error too, named by key
    path.write_text(path.read_text().replace("[bogus]\nkey = 1\n", "").replace(h.ifname, "vtnosuch0"))
    r = subprocess.run(["ip", "netns", "exec", h.ns, *vipd_argv(), "check", "-c", str(path)],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 2 and re.search(r"vip\[0\]\.interface: no interface 'vtnosuch0'", r.stderr), r.stderr


def test_second_daemon_on_the_same_state_dir_changes_nothing(lab, lab_etcd, make_cluster):
    """A second `vipd run` with the running daemon's config: exit 1 with one line naming the holder's
    pid, before touching the host or etcd (the owner keeps its VIP, key and lease); the same for a
    metrics port that another process holds."""
    c = make_cluster([VipDef("api", str(lab.vip4(0)))])
    v = c.vips[0]
    owner = c.wait_owner(_ip(v))
    host = c.host(owner)
    time.sleep(0.5)  # let the owner key settle
    before = lab_etcd.request("/v3/kv/range", {"key": "Lw==", "range_end": "MA=="})
    r = c.run_cli(host, "run", timeout=20)
    assert r.returncode == 1, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pid {c.procs[host.name].pid}" in lines[0], r.stderr
    after = lab_etcd.request("/v3/kv/range", {"key": "Lw==", "range_end": "MA=="})
    assert [(kv["key"], kv["create_revision"], kv.get("lease")) for kv in after["kvs"]] == \
           [(kv["key"], kv["create_revision"], kv.get("lease")) for kv in before["kvs"]]
    assert lab.holders(_ip(v)) == [owner]
    assert c.procs[host.name].poll() is None
    # `vipd cleanup` (ExecStopPost) is refused too while the daemon runs: it would pull its VIP
    r = c.run_cli(host, "cleanup")
    assert r.returncode == 1 and "another vipd" in r.stderr, r
    assert lab.holders(_ip(v)) == [owner]
    # another host's config pointing at a metrics port in use: one line, exit 1, nothing added
    other = next(h for h in lab.hosts if h.name != owner)
    c.term(other)
    blocker = lab.popen(other.ns, [sys.executable, "-c", "import socket,time;s=socket.socket();"
                                   "s.bind(('127.0.0.1',9654));s.listen(1);print('up',flush=True);time.sleep(30)"],
                        log=c.dir / "blocker.log")
    try:
        deadline = time.monotonic() + 10
        while "up" not in (c.dir / "blocker.log").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = c.run_cli(other, "run", timeout=20)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "metrics.listen" in r.stderr, r
        assert "in use" in r.stderr
    finally:
        blocker.kill()
        blocker.wait(5)


def test_release_says_whether_the_vip_comes_back_and_exits_3_when_not_owner(lab, make_cluster):
    c = make_cluster([VipDef("api", str(lab.vip4(0)))])
    v = c.vips[0]
    owner = c.wait_owner(_ip(v))
    backup = next(h for h in lab.hosts if h.name != owner)
    r = c.run_cli(backup, "release", "api")
    assert r.returncode == 3 and "api is not owned by this host" in r.stderr, r
    r = c.run_cli(backup, "release", "nosuch")
    assert r.returncode == 1 and "no VIP named 'nosuch'" in r.stderr, r
    r = c.run_cli(c.host(owner), "release", "api")
    assert r.returncode == 0, r
    assert "preemption is off: it stays with its new owner" in r.stdout, r.stdout  # the lab's placement
    c.wait_owner(_ip(v), exclude=[owner])


def _filter_set(name: str, seen: set[str] | None = None) -> set[str]:
    """Every system call in a systemd syscall group, nested groups expanded."""
    out = subprocess.run(["systemd-analyze", "syscall-filter", name], capture_output=True, text=True,
                         check=True).stdout
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        t = line.strip()
        if t and not t.startswith("#"):
            calls |= _filter_set(t) if t.startswith("@") else {t}
    return calls


@pytest.mark.needs_tools("strace", "systemd-analyze")
def test_the_daemon_stays_inside_the_units_system_call_filter(lab, make_cluster, tmp_path):
    """Every system call `vipd run` makes while claiming, announcing, serving metrics and releasing
    (strace -f) is allowed by the unit's SystemCallFilter: the sandbox would not kill it."""
    import configparser
    from pathlib import Path

    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(Path(__file__).resolve().parents[2] / "systemd" / "vipd.service")
    allowed: set[str] = set()
    for word in cp["Service"]["SystemCallFilter"].split():
        allowed |= _filter_set(word) if word.startswith("@") else {word}
    c = make_cluster([VipDef("api", str(lab.vip4(0)))], start=False)
    h = lab.hosts[0]
    counts = tmp_path / "strace.txt"
    proc = lab.popen(h.ns, ["strace", "-f", "-qq", "-c", "-o", str(counts), *vipd_argv(), "run", "-c",
                            str(c.write_config(h))], log=c.log_path(h))
    c.procs[h.name] = proc
    assert c.wait_owner(_ip(c.vips[0]), timeout=30) == h.name
    assert "vipd_vip_owner" in c.metrics(h)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    os.kill(int(children[0]), 15)  # the daemon itself (strace is its parent): a planned stop
    assert proc.wait(20) == 0
    used = {line.split()[-1] for line in counts.read_text().splitlines()
            if line and line.split()[0][0].isdigit() and line.split()[-1] != "total"}
    assert {"sendto", "bind", "socket"} <= used  # the parse found the netlink and packet traffic
    assert sorted(used - allowed) == [], f"calls outside SystemCallFilter: {sorted(used - allowed)}"

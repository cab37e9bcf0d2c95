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
    c = make_cluster([VipDef("api", str(lab.vip4(0)))])
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
    time.sleep(1.5)
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

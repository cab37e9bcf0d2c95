"""Egress SNAT that follows ownership: an outside server sees connections from the VIP, from
whichever host owns it, and never from a host that lost it; other nftables tables are untouched."""

from __future__ import annotations

import subprocess
import sys
import time

from vipd.lab.cluster import VipDef

SERVER = r'''
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080)); s.listen(64)
with open(sys.argv[1], "a", buffering=1) as out:
    while True:
        c, peer = s.accept(); out.write(peer[0] + "\n"); c.close()
'''


def connect_from(lab, host, ip) -> None:  # type: ignore[no-untyped-def]
    code = f"import socket; socket.create_connection(('{ip}', 8080), timeout=2).close()"
    subprocess.run(["ip", "netns", "exec", host.ns, sys.executable, "-c", code], check=True, timeout=10)


def seen(path, n: int, timeout: float = 3.0) -> str:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = path.read_text().split() if path.exists() else []
        if len(lines) >= n:
            return lines[n - 1]
        time.sleep(0.02)
    raise AssertionError(f"server saw {path.read_text() if path.exists() else ''!r}, expected {n} connections")


def nft(lab, host, *args: str) -> str:  # type: ignore[no-untyped-def]
    return lab.run(host, ["nft", *args], check=False).stdout


def test_egress_follows_ownership_and_leaves_other_tables_alone(lab, make_cluster, tmp_path):
    log = tmp_path / "peers.txt"
    lab.popen(lab.client, [sys.executable, "-c", SERVER, str(log)], log=tmp_path / "server.log")
    rules = tmp_path / "user.nft"
    rules.write_text("table inet vtuser {\n chain output {\n  type filter hook output priority 0; policy accept;\n"
                     "  tcp dport 9 counter\n }\n}\n")
    for h in lab.hosts:
        lab.run(h, ["nft", "-f", str(rules)])
    before = {h.name: nft(lab, h, "list", "table", "inet", "vtuser") for h in lab.hosts}
    vip = lab.vip4(0)
    c = make_cluster([VipDef("api", str(vip))], start=False)
    c.egress = [{"name": "web", "vip": "api", "destinations": [f"{lab.client.ip.ip}/32"], "protocol": "tcp",
                 "ports": [8080]}]
    c.start_all()
    owner = c.host(c.wait_owner(vip.ip))
    other = next(h for h in lab.hosts if h is not owner)
    time.sleep(0.3)
    connect_from(lab, owner, lab.client.ip.ip)
    assert seen(log, 1) == str(vip.ip)
    connect_from(lab, other, lab.client.ip.ip)
    assert seen(log, 2) == str(other.ip.ip), "a host that does not own the VIP must not use it as source"
    ruleset = nft(lab, owner, "list", "table", "inet", "vipd")
    assert f"snat ip to {vip.ip}" in ruleset and "timeout" in ruleset, ruleset
    c.term(owner)
    new = c.host(c.wait_owner(vip.ip, exclude=[owner.name]))
    time.sleep(0.3)
    connect_from(lab, new, lab.client.ip.ip)
    assert seen(log, 3) == str(vip.ip)
    connect_from(lab, owner, lab.client.ip.ip)
    assert seen(log, 4) == str(owner.ip.ip)
    assert "vipd" not in nft(lab, owner, "list", "tables"), "the stopped host kept vipd's table"
    for h in lab.hosts:
        assert nft(lab, h, "list", "table", "inet", "vtuser") == before[h.name]
    status = c.run_cli(new, "status")
    assert f"web              api              {new.name}" in status.stdout, status.stdout


def test_table_left_by_an_earlier_config_is_removed_at_start_and_by_cleanup(lab, make_cluster, tmp_path):
    vip = lab.vip4(0)
    c = make_cluster([VipDef("api", str(vip))], start=False)
    c.egress = [{"name": "web", "vip": "api", "destinations": [f"{lab.client.ip.ip}/32"]}]
    h = lab.hosts[0]
    c.start(h)
    c.wait_owner(vip.ip)
    assert "table inet vipd" in nft(lab, h, "list", "tables")
    c.kill(h)  # a crash leaves the table (its sets expire by themselves)
    assert "table inet vipd" in nft(lab, h, "list", "tables")
    c.egress = []  # the operator removed the egress rules
    c.write_config(h)
    r = c.run_cli(h, "cleanup")  # ExecStopPost after the crash, with the new config
    assert r.returncode == 0, r.stderr
    assert "vipd" not in nft(lab, h, "list", "tables")
    c.egress = [{"name": "web", "vip": "api", "destinations": [f"{lab.client.ip.ip}/32"]}]
    c.start(h)
    c.wait_owner(vip.ip)
    c.kill(h)
    c.egress = []
    c.start(h)  # a restart with the new config drops the old table too
    c.wait_owner(vip.ip, timeout=10)
    deadline = time.monotonic() + 5
    while "table inet vipd" in nft(lab, h, "list", "tables") and time.monotonic() < deadline:
        time.sleep(0.05)
    tables = nft(lab, h, "list", "tables")
    assert "table inet vipd" not in tables  # the running daemon keeps only its token fence's table
    assert "table netdev vipd_fence" in tables

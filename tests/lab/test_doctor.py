"""`vipd doctor` end to end in the lab: a cloud-like proxy-ARP segment blocks L2 mode (and the
daemon's pre-claim check says so), a normal segment passes; each sysctl finding is provoked and then
fixed; an etcd with a long election timeout makes doctor report the longer failover.

Doctor runs as the operator runs it: `ip netns exec <host> vipd doctor -c FILE --json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from vipd import config
from vipd.dataplane.netlink import Netlink
from vipd.doctor.checks_l2 import l2_blockers
from vipd.lab import netns
from vipd.lab.cloud import add_gateway, set_proxy_arp
from vipd.lab.cluster import Cluster, VipDef, render_toml, vipd_argv
from vipd.lab.etcd import EtcdServer
from vipd.lab.topology import Host, Lab

from tests.lab.util import wait_for


def write_config(path: Path, host: Host, endpoint: str, vips: list[dict[str, Any]], lease_ttl: int = 3) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_toml({"node": host.name, "state_dir": str(path.parent / "run")},
                                {"etcd": {"endpoints": [endpoint], "prefix": "/vipd/doctor/", "lease_ttl": lease_ttl,
                                          "request_timeout": 0.5},  # the timing the figures below assume
                                 "timing": {"keepalives_per_ttl": 6},
                                 "metrics": {"listen": ""}}, vips))
    return path


def doctor(lab: Lab, host: Host, cfg: Path) -> tuple[int, dict[str, Any]]:
    proc = lab.run(host, [*vipd_argv(), "doctor", "-c", str(cfg), "--json"], check=False, timeout=60)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def find(report: dict[str, Any], check: str, subject: str | None = None) -> dict[str, Any]:
    hits = [f for f in report["findings"] if f["check"] == check and subject in (None, f["subject"])]
    assert len(hits) == 1, (check, subject, report["findings"])
    return hits[0]


def blockers(host: Host, cfg_path: Path) -> dict[str, Any]:
    cfg = config.load(cfg_path)

    async def main() -> dict[str, Any]:
        async with Netlink(host.ns) as nl:
            return await l2_blockers(nl, cfg)

    return trio.run(main)


@pytest.mark.needs_tools("sysctl")
def test_proxy_arp_segment_blocks_l2_mode_and_a_normal_segment_passes(lab: Lab, lab_etcd: EtcdServer,
                                                                      tmp_path: Path) -> None:
    gw = add_gateway(lab, proxy_arp=True)
    h1 = lab.hosts[0]
    cfg = write_config(tmp_path / "h1.toml", h1, lab_etcd.endpoint,
                       [{"name": "api", "address": str(lab.vip4(0)), "interface": h1.ifname}])

    rc, report = doctor(lab, h1, cfg)
    assert rc == 1 and report["blocking"]
    proxy = find(report, "l2.proxy_arp", h1.ifname)
    assert proxy["severity"] == "error" and proxy["data"]["mac"] == gw.mac
    assert "BGP" in proxy["fix"] and "cloud" in proxy["fix"]
    # the proxy also answers for the VIP: reported as the proxy, not as a second machine
    assert find(report, "l2.vip_answered", "api")["severity"] == "info"
    # what the daemon calls before its first claim on the interface
    blocked = blockers(h1, cfg)
    assert set(blocked) == {h1.ifname} and blocked[h1.ifname].data["mac"] == gw.mac

    set_proxy_arp(lab, gw, False)  # the same segment, now an ordinary one: the gateway answers for itself only
    rc, report = doctor(lab, h1, cfg)
    assert rc == 0 and not report["blocking"], report
    proxy = find(report, "l2.proxy_arp", h1.ifname)
    assert proxy["severity"] == "ok" and proxy["data"]["gateway_mac"] == gw.mac
    # the picks are random: one may hit a lab machine h1 never talked to, which answers for itself
    own = {h.ip.ip.exploded: h.mac for h in [*lab.hosts, lab.client]}
    assert all(mac is None or own.get(ip) == mac for ip, mac in proxy["data"]["probed_unused"].items()), proxy
    assert find(report, "l2.vip_answered", "api")["severity"] == "ok"
    assert blockers(h1, cfg) == {}

    # another machine holding the VIP blocks too (a conflict, not a proxy)
    lab.ip(lab.client, "addr", "add", str(lab.vip4(0)), "dev", lab.client.ifname)
    rc, report = doctor(lab, h1, cfg)
    hit = find(report, "l2.vip_answered", "api")
    assert rc == 1 and hit["severity"] == "error" and hit["data"]["mac"] == lab.client.mac


def test_daemon_refuses_l2_mode_on_a_proxy_arp_segment(lab: Lab, make_cluster: Any) -> None:
    """`vipd run` tests the segment before its first claim: on a proxy-ARP segment the VIP's unit is
    unfit here, with the cloud explanation in the log, the metric, `vipd state` and the presence
    (`vipd status`); nothing is ever claimed. conflict_check is off, so the claim's own ARP probe
    (which the proxy would also trip) cannot be what refuses it."""
    gw = add_gateway(lab, proxy_arp=True)
    vip = lab.vip4(0)
    cluster: Cluster = make_cluster([VipDef("api", str(vip), extra={"conflict_check": False})], start=False)
    h1 = lab.hosts[0]
    cluster.start(h1)
    log = cluster.log_path(h1)

    def log_text() -> str:
        return log.read_text() if log.exists() else ""

    line = wait_for(lambda: next((x for x in log_text().splitlines() if "event=l2_blocked" in x), None), 30,
                    "the l2_blocked line in h1's log")
    assert f"interface={h1.ifname}" in line and gw.mac in line and "BGP" in line, line

    def status_reason() -> str | None:
        out = cluster.run_cli(h1, "status", "--json")
        hosts = json.loads(out.stdout)["hosts"] if out.returncode == 0 else []
        return next((r for h in hosts if h["node"] == "h1" and "api" in h["down"] for r in h["reasons"]), None)

    reason = wait_for(status_reason, 30, "h1's presence to list api as down, with the reason")
    assert reason.startswith("api/l2: L2 mode refused on") and gw.mac in reason, reason
    state = json.loads(cluster.run_cli(h1, "state").stdout)
    assert state["api"]["state"] == "backup" and state["api"]["why_not"] == "unhealthy", state
    assert "L2 mode refused" in state["api"]["unfit"][0], state
    assert f'vipd_l2_blocked{{interface="{h1.ifname}"}} 1.0' in cluster.metrics(h1)
    assert "to=owner" not in log_text() and "to=acquiring" not in log_text()
    assert lab.holders(vip) == []
    timeline = cluster.monitor.holders_timeline(vip.ip)  # type: ignore[attr-defined]
    assert all(not holders for _, holders in timeline), timeline  # never held, at any sampled instant


@pytest.mark.needs_tools("sysctl")
def test_each_sysctl_finding_is_provoked_then_fixed(lab: Lab, lab_etcd: EtcdServer, tmp_path: Path) -> None:
    h1 = lab.hosts[0]
    cfg = write_config(tmp_path / "h1.toml", h1, lab_etcd.endpoint, [
        # a subnet the host has no address of its own in: the first VIP would become its primary
        {"name": "side", "address": "10.214.0.10/24", "interface": h1.ifname},
        {"name": "side2", "address": "10.214.0.11/24", "interface": h1.ifname},
        {"name": "routed", "address": "198.18.0.10/32", "interface": "lo"},
        {"name": "any", "address": "198.18.0.20/32", "interface": "lo", "mode": "anycast"},
    ])
    nic = h1.ifname
    netns.sysctl(h1.ns, {"net.ipv4.conf.all.promote_secondaries": 0, f"net.ipv4.conf.{nic}.promote_secondaries": 0,
                         "net.ipv4.conf.all.rp_filter": 1, "net.ipv4.fib_multipath_hash_policy": 0})
    rc, report = doctor(lab, h1, cfg)
    assert find(report, "sysctl.promote_secondaries", nic)["severity"] == "warning"
    assert find(report, "sysctl.rp_filter", nic)["severity"] == "warning"
    assert find(report, "sysctl.multipath_hash")["severity"] == "warning"
    assert rc == 0  # warnings do not block

    netns.sysctl(h1.ns, {f"net.ipv4.conf.{nic}.promote_secondaries": 1, "net.ipv4.conf.all.rp_filter": 2,
                         f"net.ipv4.conf.{nic}.rp_filter": 2, "net.ipv4.fib_multipath_hash_policy": 1})
    rc, report = doctor(lab, h1, cfg)
    for check, subject in (("sysctl.promote_secondaries", nic), ("sysctl.rp_filter", nic),
                           ("sysctl.multipath_hash", None)):
        assert find(report, check, subject)["severity"] == "ok", check


def _host_loss(report: dict[str, Any]) -> dict[str, Any]:
    costs = find(report, "timing.failover")["data"]["costs"]
    return next(c for c in costs if c["fault"].startswith("host loss"))


def test_long_election_timeout_makes_doctor_report_the_longer_failover(lab: Lab, lab_etcd: EtcdServer,
                                                                       tmp_path: Path) -> None:
    h1 = lab.hosts[0]
    vips = [{"name": "routed", "address": "198.18.0.10/32", "interface": "lo"}]
    fast = write_config(tmp_path / "fast.toml", h1, lab_etcd.endpoint, vips)
    rc, report = doctor(lab, h1, fast)
    assert find(report, "etcd.lease_ttl")["data"]["granted"] == 3
    assert find(report, "etcd.election")["data"]["election_timeout"] == 0.5
    assert _host_loss(report)["high"] == pytest.approx(3 + 0.5 + 0.05)
    assert next(c for c in find(report, "timing.failover")["data"]["costs"]
                if c["fault"] == "etcd leader loss")["high"] > 0  # 2 x 0.5 + 0.5 s > slack 1.0 s

    slow_srv = EtcdServer(tmp_path / "slow-etcd", host=str(lab.etcd_ip), client_port=2479, peer_port=2480,
                          netns=lab.etcd_ns, fast=False, name="vtslow",
                          extra_args=["--heartbeat-interval", "300", "--election-timeout", "3000"])
    slow_srv.start()
    try:
        slow = write_config(tmp_path / "slow.toml", h1, slow_srv.endpoint, vips)
        rc, report = doctor(lab, h1, slow)
    finally:
        slow_srv.stop()
    ttl = find(report, "etcd.lease_ttl")
    assert ttl["severity"] == "warning" and ttl["data"] == {"asked": 3, "granted": 5, "min_ttl": 5}
    assert find(report, "etcd.election")["data"]["election_timeout"] == 3.0
    assert _host_loss(report)["high"] == pytest.approx(5 + 0.5 + 0.05)
    leader = next(c for c in find(report, "timing.failover")["data"]["costs"] if c["fault"] == "etcd leader loss")
    assert leader["high"] == pytest.approx(2 * 3.0 + 0.5 - (5 - 1.5 - 5 / 6) + 0.05, abs=1e-3)
    assert rc == 0


def test_doctor_with_etcd_down_blocks(lab: Lab, tmp_path: Path) -> None:
    h1 = lab.hosts[0]
    cfg = write_config(tmp_path / "h1.toml", h1, f"http://{lab.etcd_ip}:2379",
                       [{"name": "routed", "address": "198.18.0.10/32", "interface": "lo"}])
    rc, report = doctor(lab, h1, cfg)
    assert rc == 1 and find(report, "etcd.reachable")["severity"] == "error"

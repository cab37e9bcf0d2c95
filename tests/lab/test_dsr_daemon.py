"""DSR run by the daemon itself: `vipd run` on five hosts (vipd.lab.cluster) with one L2 VIP that has
a TCP service whose backends are three of them. Nothing is driven by hand: ownership elects the
director, the controllers arm its fence, etcd presence fills the Maglev table, the backend role is
started by the daemon. A client's long download reaches a backend through the director; when the
owner stops, the new owner forwards the same flow to the same backend (the same table from the
same presence); after every daemon stops nothing of DSR is left, and `vipd cleanup` removes what a
SIGKILLed daemon left.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.lab.test_dsr_lab import Stream, fan
from tests.lab.util import wait_for
from vipd.lab.cluster import Cluster, VipDef
from vipd.lab.dsr import PORT, peers_seen, start_servers
from vipd.lab.etcd import EtcdServer
from vipd.lab.monitor import AddressMonitor
from vipd.lab.topology import Host, Lab
from vipd.succession_plan import LATE_HOLD_MAX, REBALANCE_AFTER

pytestmark = pytest.mark.needs_tools("clang")

DIRECTORS, BACKENDS = ("h1", "h2"), ("h3", "h4", "h5")


@pytest.fixture
def lab5(tmp_path: Path) -> Iterator[tuple[Lab, EtcdServer]]:
    with Lab("vt" + secrets.token_hex(2), n_hosts=5) as lab:
        srv = EtcdServer(tmp_path / "etcd", host=str(lab.etcd_ip), client_port=2379, peer_port=2380,
                         netns=lab.etcd_ns)
        srv.start()
        try:
            yield lab, srv
        finally:
            srv.stop()


def state(cluster: Cluster, h: Host) -> dict[str, Any]:
    out = cluster.run_cli(h, "state")
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def service_row(cluster: Cluster, h: Host) -> dict[str, Any]:
    [row] = state(cluster, h)["web"]["dsr"]
    return dict(row)


def table_ready(cluster: Cluster, h: Host) -> bool:
    """Every backend active (present and healthy in etcd) with its MAC resolved on this director."""
    row = service_row(cluster, h)
    return all(b["state"] == "active" and b["mac"] for b in row["backends"]) and len(row["backends"]) == 3


def dsr_filter(lab: Lab, h: Host) -> bool:
    return "vipd_dsr" in lab.run(h, ["tc", "filter", "show", "dev", lab.nic, "ingress"]).stdout


def nic_holders(lab: Lab, ip: Any) -> list[str]:
    """Hosts holding `ip` on their NIC (the backends hold it on lo, index 1, by design)."""
    return [h.name for h in lab.hosts if any(a.ip == ip and a.ifindex != 1 and a.usable for a in lab.addresses(h))]


def nic_owner(cluster: Cluster, ip: Any, exclude: tuple[str, ...] = ()) -> str:
    """The one host holding `ip` on its NIC, once there is exactly one (not in `exclude`)."""
    def one() -> str | None:
        hs = nic_holders(cluster.lab, ip)
        return hs[0] if len(hs) == 1 and hs[0] not in exclude else None
    return str(wait_for(one, 30, f"one owner of {ip} (not {exclude})\n{cluster.log_tail()}"))


def on_lo(lab: Lab, h: Host, ip: Any) -> bool:
    return f"{ip}/32" in lab.ip(h, "-4", "addr", "show", "dev", "lo").stdout


def dsr_cluster(lab: Lab, etcd: EtcdServer, tmp_path: Path) -> tuple[Cluster, dict[str, Host], Any, AddressMonitor]:
    """Five daemons' configs (not started): one VIP `web` with a TCP service on the three backends.
    The directors are the first placement tier; the backends could direct too, only when no
    director can. [peers] is on (the default): the token fence gates a DSR VIP for ARP/ND only, so
    the frames the director sends reach the backends and their answers from the VIP leave them.
    The monitor watches the directors (the backends hold the VIP on lo by design: nic_holders)."""
    vip = lab.vip4(0)
    hosts = {h.name: h for h in lab.hosts}
    service = {"protocol": "tcp", "port": PORT, "check_interval": 0.5, "check_timeout": 0.3,
               "backends": [{"node": b, "address": str(hosts[b].ip.ip)} for b in BACKENDS]}
    cluster = Cluster(lab, tmp_path / "hosts", [VipDef("web", str(vip), extra={
        "service": [service], "prefer": list(DIRECTORS), "avoid": list(BACKENDS)})], endpoints=[etcd.endpoint])
    monitor = AddressMonitor(lab, [vip.ip], hosts=[hosts[n] for n in DIRECTORS]).start()
    lab.add_cleanup(cluster.stop_all)
    return cluster, hosts, vip, monitor


def test_the_daemon_directs_a_flow_and_the_new_owner_keeps_its_backend(lab5: tuple[Lab, EtcdServer],
                                                                         tmp_path: Path) -> None:
    lab, etcd = lab5
    cluster, hosts, vip, monitor = dsr_cluster(lab, etcd, tmp_path)
    sysctls = ("net.ipv4.conf.all.arp_ignore", "net.ipv4.conf.all.arp_announce")

    def arp_sysctls(h: Host) -> list[str]:
        return [lab.run(h, ["sysctl", "-n", k]).stdout.strip() for k in sysctls]

    before_sysctls = {n: arp_sysctls(hosts[n]) for n in BACKENDS}
    try:
        for name in DIRECTORS:  # the directors first, so a backend never wins the first race
            cluster.start(hosts[name])
        owner = hosts[nic_owner(cluster, vip.ip)]
        standby = hosts[next(n for n in DIRECTORS if n != owner.name)]
        for name in BACKENDS:
            cluster.start(hosts[name])
        for name in BACKENDS:  # the daemon started the backend role: VIP on lo, ARP sysctls
            b = hosts[name]
            wait_for(lambda: on_lo(lab, b, vip.ip), 30, f"{name}'s backend role")
            assert arp_sysctls(b)[0] == "1"
        for h in (owner, standby):  # both directors build the same table from etcd presence
            wait_for(lambda: table_ready(cluster, h), 30, f"{h.name}'s DSR table with every backend")
        assert service_row(cluster, owner)["directing"] and not service_row(cluster, standby)["directing"]
        assert all(dsr_filter(lab, h) for h in lab.hosts)  # every host with the service runs the program
        assert nic_holders(lab, vip.ip) == [owner.name]  # a backend never holds the VIP on its NIC

        logs = start_servers(lab, [hosts[n] for n in BACKENDS], tmp_path)
        res = fan(lab, lab.client, str(vip.ip), 60)
        assert res["errors"] == 0 and set(res["backends"]) == set(BACKENDS), res
        for n in BACKENDS:  # the client's own address reached the backends, never the director's
            assert set(peers_seen(logs[n])) == {str(lab.client.ip.ip)}
        text = cluster.metrics(owner)
        assert 'vipd_dsr_available 1.0' in text and f'vipd_dsr_program_attached{{interface="{lab.nic}"}} 1.0' in text
        assert not [x for x in text.splitlines() if x.startswith("vipd_takeovers_total{")]  # a first claim
        assert 'vipd_vip_address_present{vip="web"} 1.0' in text
        assert 'vipd_vip_address_present{vip="web"} 0.0' in cluster.metrics(standby)

        stream = Stream(lab, lab.client, str(vip.ip), tmp_path)
        backend = stream.backend()
        stream.advances()
        before = {b["backend"]: b["packets"] for b in service_row(cluster, owner)["backends"]}
        assert before[backend] > 0

        # the owner stops: the standby takes the VIP and forwards the same flow to the same backend
        assert cluster.term(owner) == 0
        assert nic_owner(cluster, vip.ip, exclude=(owner.name,)) == standby.name
        stream.advances()
        row = service_row(cluster, standby)
        assert row["directing"]
        assert {b["backend"]: b["packets"] for b in row["backends"]}[backend] > 0
        done = stream.stop()
        assert done["error"] is None and done["backend"] == backend, done
        assert 'vipd_takeovers_total{cause="released",vip="web"} 1.0' in cluster.metrics(standby)
        # the stopped owner left nothing of DSR, nor its address
        assert not dsr_filter(lab, owner) and nic_holders(lab, vip.ip) == [standby.name]

        # a SIGKILLed backend leaves its filter and its lo address; `vipd cleanup` removes both
        h5 = hosts["h5"]
        cluster.kill(h5)
        assert dsr_filter(lab, h5) and on_lo(lab, h5, vip.ip)
        out = cluster.run_cli(h5, "cleanup", timeout=30)
        assert out.returncode == 0, out.stderr
        assert not dsr_filter(lab, h5) and not on_lo(lab, h5, vip.ip)

        for name in ("h3", "h4", standby.name):  # the backends first: none of them may take the VIP over
            assert cluster.term(hosts[name]) == 0, name
        for h in lab.hosts:
            assert not dsr_filter(lab, h), h.name
        assert lab.holders(vip.ip) == []
        for name in ("h3", "h4"):  # a clean stop restores the ARP sysctls and removes the lo address
            b = hosts[name]
            assert not on_lo(lab, b, vip.ip)
            assert arp_sysctls(b) == before_sysctls[name]
    finally:
        cluster.stop_all()
        monitor.stop()
    monitor.assert_never_dual()


def test_a_backend_that_would_answer_arp_refuses_and_its_unit_is_unfit_there(lab: Lab, make_cluster: Any) -> None:
    """The daemon's backend role refuses (an interface whose arp_ignore is a reserved value: the
    kernel would answer ARP for the VIP): the unit is unfit on that host (a Fitness veto, with the
    reason in `vipd state` and the presence), so it never directs or claims it; everything else runs."""
    h1 = lab.hosts[0]
    vip = lab.vip4(1)
    service = {"protocol": "tcp", "port": PORT, "backends": [{"node": h1.name, "address": str(h1.ip.ip)}]}
    lab.run(h1, ["sysctl", "-qw", f"net.ipv4.conf.{lab.nic}.arp_ignore=5"])
    cluster: Cluster = make_cluster([VipDef("web", str(vip), extra={"service": [service]})], start=False)
    cluster.start(h1)
    log = cluster.log_path(h1)
    wait_for(lambda: "event=dsr_backend_refused" in (log.read_text() if log.exists() else ""), 30,
             "the refusal in h1's log")

    def unfit() -> list[str] | None:
        out = cluster.run_cli(h1, "state")
        return json.loads(out.stdout)["web"]["unfit"] if out.returncode == 0 else None

    reasons = wait_for(unfit, 30, "h1's state to say why web is unfit")
    assert any(r.startswith("web/dsr: refusing to be a DSR backend for web") and "arp_ignore is 5" in r
               for r in reasons), reasons

    def presence() -> dict[str, Any] | None:
        out = cluster.run_cli(h1, "status", "--json")
        hosts = json.loads(out.stdout)["hosts"] if out.returncode == 0 else []
        return next((h for h in hosts if h["node"] == h1.name), None)

    me = wait_for(presence, 30, "h1's presence in etcd")
    assert me["down"] == ["web"] and any("arp_ignore is 5" in r for r in me["reasons"]), me
    assert lab.holders(vip.ip) == [] and "to=owner" not in log.read_text()
    assert cluster.term(h1) == 0
    assert not on_lo(lab, h1, vip.ip) and not dsr_filter(lab, h1)
    assert lab.run(h1, ["sysctl", "-n", "net.ipv4.conf.all.arp_ignore"]).stdout.strip() == "0"  # restored


def test_a_killed_director_is_replaced_by_its_successor_and_the_flow_keeps_its_backend(
        lab5: tuple[Lab, EtcdServer], tmp_path: Path) -> None:
    """Fast takeover on a DSR VIP ([peers] on): the director is SIGKILLed; the standby, its named
    successor, takes the unit over from heartbeats (not from the etcd lease), directs the same flow
    to the same backend, and the directors never both serve (ARP/ND tokens; the BPF deadline)."""
    lab, etcd = lab5
    cluster, hosts, vip, monitor = dsr_cluster(lab, etcd, tmp_path)
    try:
        for name in DIRECTORS:
            cluster.start(hosts[name])
        owner = hosts[nic_owner(cluster, vip.ip)]
        standby = hosts[next(n for n in DIRECTORS if n != owner.name)]
        for name in BACKENDS:
            cluster.start(hosts[name])
        for h in (owner, standby):
            wait_for(lambda: table_ready(cluster, h), 30, f"{h.name}'s DSR table with every backend")
        # (the backends' start loads the machine: the owner may find the standby late, rename to a
        # backend, hold the standby off and rename back after REBALANCE_AFTER: vipd/succession_plan.py)
        wait_for(lambda: state(cluster, owner)["web"].get("successor") == standby.name,
                 10 + REBALANCE_AFTER + LATE_HOLD_MAX, "the standby named successor")
        start_servers(lab, [hosts[n] for n in BACKENDS], tmp_path)
        stream = Stream(lab, lab.client, str(vip.ip), tmp_path)
        backend = stream.backend()
        stream.advances()
        cluster.kill(owner)
        stream.advances()
        row = service_row(cluster, standby)
        assert row["directing"] and {b["backend"]: b["packets"] for b in row["backends"]}[backend] > 0
        done = stream.stop()
        assert done["error"] is None and done["backend"] == backend, done
        assert 'vipd_takeovers_total{cause="peer",vip="web"} 1.0' in cluster.metrics(standby)
    finally:
        cluster.stop_all()
        monitor.stop()
    monitor.assert_never_dual()

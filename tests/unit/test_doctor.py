"""Pure parts of `vipd doctor`: the proxy-ARP verdict, failover costs, etcd timing inference, sysctl
rules (with a fake /proc/sys), capabilities, BGP config reading, rendering and exit status."""

from __future__ import annotations

import ipaddress
import json
import math
import random
from pathlib import Path

import pytest

from vipd import config
from vipd.dataplane.proxyarp import judge, unused_candidates
from vipd.doctor import checks_bgp, checks_sysctl
from vipd.doctor.checks_etcd import election_from_cmdline, reconcile_election
from vipd.doctor.checks_host import capabilities, effective_caps
from vipd.doctor.findings import Finding, Severity, exit_status, render, to_json
from vipd.doctor.timing import TimingInputs, etcd_min_ttl, failover_costs

IP = ipaddress.IPv4Address
NET = ipaddress.IPv4Network("10.0.0.0/24")
CONF = Path(__file__).resolve().parents[2] / "conf"


def cfg(vips: list[str], **extra: object) -> config.Config:
    data = {"node": "n1", "vip": [dict(zip(("name", "address", "interface", "mode"), v.split())) for v in vips]}
    return config.parse({**data, **extra})


# ---------------------------------------------------------------- proxy-ARP verdict

def test_one_mac_for_every_unused_address_is_proxy_arp() -> None:
    v = judge("eth0", NET, {IP("10.0.0.7"): "ee:ff:ff:ff:ff:ff", IP("10.0.0.9"): "ee:ff:ff:ff:ff:ff",
                            IP("10.0.0.44"): "ee:ff:ff:ff:ff:ff"}, IP("10.0.0.1"), "ee:ff:ff:ff:ff:ff", IP("10.0.0.5"))
    assert v.proxy_arp and v.mac == "ee:ff:ff:ff:ff:ff" and "gateway" in v.reason


def test_gateway_mac_answering_one_unused_address_is_proxy_arp() -> None:
    v = judge("eth0", NET, {IP("10.0.0.7"): "02:00:00:00:00:01", IP("10.0.0.9"): None}, IP("10.0.0.1"),
              "02:00:00:00:00:01", IP("10.0.0.5"))
    assert v.proxy_arp


def test_a_real_machine_on_one_pick_or_silence_is_not_proxy_arp() -> None:
    one = judge("eth0", NET, {IP("10.0.0.7"): "02:00:00:00:00:07", IP("10.0.0.9"): None}, IP("10.0.0.1"),
                "02:00:00:00:00:01", IP("10.0.0.5"))
    silent = judge("eth0", NET, {IP("10.0.0.7"): None, IP("10.0.0.9"): None}, None, None, IP("10.0.0.5"))
    two_machines = judge("eth0", NET, {IP("10.0.0.7"): "02:00:00:00:00:07", IP("10.0.0.9"): "02:00:00:00:00:09"},
                         None, None, IP("10.0.0.5"))
    assert not one.proxy_arp and not silent.proxy_arp and not two_machines.proxy_arp


def test_unused_candidates_avoid_taken_and_special_addresses() -> None:
    net = ipaddress.IPv4Network("10.0.0.0/29")  # hosts .1-.6
    taken = [IP(f"10.0.0.{i}") for i in (1, 2, 3, 4)]
    picks = unused_candidates(net, taken, 5, random.Random(1))
    assert sorted(picks) == [IP("10.0.0.5"), IP("10.0.0.6")]
    assert unused_candidates(ipaddress.IPv4Network("10.0.0.0/31"), [], 3) == []
    assert len(unused_candidates(ipaddress.IPv4Network("10.0.0.0/8"), [], 3, random.Random(2))) == 3


# ---------------------------------------------------------------- failover costs

def test_host_loss_cost_follows_the_granted_ttl() -> None:
    base = TimingInputs(lease_ttl=3, fence_margin=1.5, keepalives_per_ttl=6, request_timeout=0.5)
    short = {c.fault: c for c in failover_costs(TimingInputs(**{**base.__dict__, "granted_ttl": 3}))}
    long = {c.fault: c for c in failover_costs(TimingInputs(**{**base.__dict__, "granted_ttl": 8}))}
    key = "host loss, link cut, hang, crash without cleanup"
    assert (short[key].low, short[key].high) == pytest.approx((2.5, 3.55))
    assert long[key].high == pytest.approx(8.55) and long[key].low == pytest.approx(8 - 8 / 6)


def test_leader_loss_is_free_only_when_the_election_fits_the_slack() -> None:
    def leader(et: float, ttl: int) -> float:
        t = TimingInputs(3, 1.5, 6, 0.5, granted_ttl=ttl, election_timeout=et)
        return next(c for c in failover_costs(t) if c.fault == "etcd leader loss").high

    assert leader(1.0, 3) == pytest.approx(2 * 1.0 + 0.5 - (3 - 1.5 - 0.5) + 0.05)  # FACTS: fenced 15/15
    assert leader(0.5, 10) == 0.0  # a 10 s TTL rides out any election with these flags
    unknown = TimingInputs(3, 1.5, 6, 0.5, granted_ttl=3)
    leader = next(c for c in failover_costs(unknown) if c.fault == "etcd leader loss")
    assert math.isnan(leader.high) and leader.as_dict()["high"] is None


def test_ttl_in_force_without_a_grant_is_raised_to_etcds_minimum() -> None:
    assert etcd_min_ttl(1.0) == 2 and etcd_min_ttl(0.5) == 1 and etcd_min_ttl(3.0) == 5
    assert TimingInputs(3, 1.5, 6, 0.5, election_timeout=5.0).ttl == 8


def test_election_timeout_from_cmdline_and_min_ttl() -> None:
    assert election_from_cmdline(["etcd", "--election-timeout", "3000"]) == 3.0
    assert election_from_cmdline(["etcd", "--election-timeout=700"]) == 0.7
    assert election_from_cmdline(["etcd", "--name", "x"]) == 1.0  # etcd's default
    assert reconcile_election(3.0, 5) == (3.0, "etcd command line (agrees with the minimum TTL granted)")
    et, source = reconcile_election(1.0, 5)  # set through ETCD_ELECTION_TIMEOUT: the grant wins
    assert et == pytest.approx(5 / 1.5) and "minimum TTL" in source
    assert reconcile_election(None, None) == (None, "unknown")


# ---------------------------------------------------------------- sysctls, capabilities

def fake(values: dict[str, int]):  # type: ignore[no-untyped-def]
    return lambda name: values.get(name)


def test_promote_secondaries_only_where_a_vip_would_be_primary() -> None:
    c = cfg(["a 10.1.0.10/24 eth0", "b 10.1.0.11/24 eth0", "c 10.0.0.10/24 eth0"])
    nets = {"eth0": [ipaddress.IPv4Network("10.0.0.0/24")]}
    off = checks_sysctl.promote_secondaries(c, nets, fake({}))
    assert [(f.severity, f.data["subnet"]) for f in off] == [(Severity.WARNING, "10.1.0.0/24")]
    assert "a, b" in off[0].detail
    on = checks_sysctl.promote_secondaries(c, nets, fake({"net.ipv4.conf.all.promote_secondaries": 1}))
    assert [f.severity for f in on] == [Severity.OK]


def test_rp_filter_strict_warns_for_routed_vips_only() -> None:
    strict = fake({"net.ipv4.conf.all.rp_filter": 1})
    assert checks_sysctl.rp_filter(cfg(["a 10.0.0.10/24 eth0"]), ["eth0"], strict) == []
    routed = cfg(["r 198.18.0.1/32 lo"])
    assert [f.severity for f in checks_sysctl.rp_filter(routed, ["eth0"], strict)] == [Severity.WARNING]
    loose = fake({"net.ipv4.conf.all.rp_filter": 1, "net.ipv4.conf.eth0.rp_filter": 2})
    assert [f.severity for f in checks_sysctl.rp_filter(routed, ["eth0"], loose)] == [Severity.OK]  # max() = 2


def test_multipath_hash_for_anycast() -> None:
    any_ = cfg(["x 198.18.0.2/32 lo anycast"])
    assert checks_sysctl.multipath_hash(any_, fake({"net.ipv4.fib_multipath_hash_policy": 0}))[0].severity is Severity.WARNING
    assert checks_sysctl.multipath_hash(any_, fake({"net.ipv4.fib_multipath_hash_policy": 1}))[0].severity is Severity.OK
    assert checks_sysctl.multipath_hash(cfg(["r 198.18.0.1/32 lo"]), fake({})) == []


def test_capabilities(tmp_path: Path) -> None:
    assert effective_caps("Name:\tx\nCapEff:\t0000000000003000\n") == 0x3000
    status = tmp_path / "status"
    status.write_text("CapEff:\t0000000000001000\n")  # NET_ADMIN only
    [f] = capabilities(str(status))
    assert f.blocks and f.data["missing"] == ["CAP_NET_RAW"]
    status.write_text("CapEff:\t000001ffffffffff\n")
    assert not capabilities(str(status))[0].blocks


# ---------------------------------------------------------------- BGP speakers

def test_bird_config_with_the_shipped_snippet(tmp_path: Path) -> None:
    conf = tmp_path / "bird.conf"
    conf.write_text(f'define VIPD_VIPS = [ 198.18.0.0/24{{32,32}} ];\ninclude "{CONF / "bird2-vipd.conf"}";\n')
    c = cfg(["in 198.18.0.10/32 lo", "out 198.19.0.10/32 lo"])
    [f] = checks_bgp.bgp_findings(c, bird_conf=str(conf), which=lambda n: "/usr/sbin/bird" if n == "bird" else None)
    assert f.severity is Severity.WARNING and f.data["missing"] == ["out"]
    [f] = checks_bgp.bgp_findings(cfg(["in 198.18.0.10/32 lo"]), bird_conf=str(conf),
                                  which=lambda n: "/usr/sbin/bird" if n == "bird" else None)
    assert f.severity is Severity.OK


def test_frr_config_and_no_speaker(tmp_path: Path) -> None:
    frr = tmp_path / "frr.conf"
    frr.write_text((CONF / "frr-vipd.conf").read_text())
    assert checks_bgp.frr_prefixes(frr.read_text()) == [(ipaddress.IPv4Network("198.18.0.0/24"), 32, 32)]
    [none] = checks_bgp.bgp_findings(cfg(["in 198.18.0.10/32 lo"]), bird_conf="/nonexistent",
                                     frr_conf="/nonexistent", which=lambda n: None)
    assert none.check == "bgp.speaker" and none.severity is Severity.WARNING
    assert checks_bgp.bgp_findings(cfg(["a 10.0.0.10/24 eth0"]), which=lambda n: None) == []


# ---------------------------------------------------------------- rendering

def test_render_json_and_exit_status() -> None:
    findings = [Finding("a.b", Severity.OK, "host", "fine"),
                Finding("l2.proxy_arp", Severity.ERROR, "eth0", "every ARP request is answered", "why it matters",
                        "use routed mode", {"mac": "ee:ff:ff:ff:ff:ff"})]
    text = render(findings)
    assert "ERROR" in text and "fix: use routed mode" in text and "1 blocking" in text
    assert exit_status(findings) == 1 and exit_status(findings[:1]) == 0
    doc = json.loads(to_json(findings))
    assert doc["blocking"] and doc["findings"][1]["data"]["mac"] == "ee:ff:ff:ff:ff:ff"


def test_report_l2_blockers_logs_and_sets_the_metric(caplog: pytest.LogCaptureFixture) -> None:
    from vipd.doctor.checks_l2 import proxy_finding, report_l2_blockers
    from vipd.dataplane.proxyarp import judge
    from vipd.metrics import Metrics

    c = cfg(["a 10.0.0.10/24 eth0", "b 10.1.0.10/24 eth1", "r 198.18.0.1/32 lo"])
    verdict = judge("eth0", NET, {IP("10.0.0.7"): "ee:ff:ff:ff:ff:ff", IP("10.0.0.9"): "ee:ff:ff:ff:ff:ff"},
                    None, None, IP("10.0.0.5"))
    m = Metrics("n1")
    import logging
    vlog = logging.getLogger("vipd")
    before, vlog.propagate = vlog.propagate, True  # let caplog see vipd's own logger
    try:
        with caplog.at_level(logging.ERROR, logger="vipd"):
            report_l2_blockers(c, {"eth0": proxy_finding("eth0", verdict)}, m)
    finally:
        vlog.propagate = before
    text = m.render().decode()
    assert 'vipd_l2_blocked{interface="eth0"} 1.0' in text and 'vipd_l2_blocked{interface="eth1"} 0.0' in text
    assert "lo" not in [line.split('"')[1] for line in text.splitlines() if line.startswith("vipd_l2_blocked{")]
    [rec] = caplog.records
    assert "event=l2_blocked" in rec.getMessage() and "mac=ee:ff:ff:ff:ff:ff" in rec.getMessage()
    assert "vips=a" in rec.getMessage() and "fix=" in rec.getMessage()

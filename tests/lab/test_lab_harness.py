"""Tests of the lab harness itself: Lab (namespaces, bridge, processes, teardown), AddressMonitor and Probe."""

from __future__ import annotations

import secrets
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest

from vipd.lab import netns, topology
from vipd.lab.monitor import AddressMonitor
from vipd.lab.probe import Probe
from vipd.lab.topology import Host, Lab


def new_prefix() -> str:
    return "vtc" + secrets.token_hex(2)


def leftovers(prefix: str) -> list[str]:
    return netns.list_ns(prefix)


def root_links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    prefix = new_prefix()
    with Lab(prefix, n_hosts=3) as lab:
        yield lab
    assert leftovers(prefix) == []


def addr(lab: Lab, host: Host, op: str, ip: object) -> None:
    """Add or delete a VIP by hand, as a single host address (/32 or /128)."""
    ip_ = topology.to_ip(ip)  # type: ignore[arg-type]
    plen = 32 if ip_.version == 4 else 128
    nodad = ("nodad",) if op == "add" and ip_.version == 6 else ()
    lab.ip(host, "addr", op, f"{ip_}/{plen}", "dev", host.ifname, *nodad)


# ---------------------------------------------------------------------- Lab

def test_names_and_addresses_are_validated_before_anything_is_created() -> None:
    for bad in ("lab", "vt", "vtC1", "vt-1", "xvt1"):
        with pytest.raises(ValueError):
            Lab(bad)
    with pytest.raises(ValueError, match="longer than 15"):
        Lab("vt" + "x" * 12)
    lab = Lab("vtc0")
    assert [h.ns for h in lab.nodes] == ["vtc0e", "vtc0c", "vtc0h1", "vtc0h2", "vtc0h3"]
    assert all(len(n) <= 15 and n.startswith("vt") for n in (lab.bridge, lab.nic, *(h.port for h in lab.nodes)))
    assert str(lab.hosts[0].ip) == "10.213.0.11/24" and str(lab.hosts[0].ip6) == "fd00:213::11/64"
    assert str(lab.vip4(1)) == "10.213.0.101/24" and str(lab.vip6(1)) == "fd00:213::101/64"
    assert str(lab.etcd_ip) == "10.213.0.2" and str(lab.client.ip) == "10.213.0.3/24"
    assert len({h.mac for h in lab.nodes}) == len(lab.nodes)
    lab.down()  # never up: a no-op
    assert leftovers("vtc0") == []


def test_up_down_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(topology, "STOP_GRACE", 0.3)
    prefix = new_prefix()
    lab = Lab(prefix, n_hosts=2).up()
    try:
        assert leftovers(prefix) == sorted(lab.namespaces)
        assert prefix not in root_links()  # no lab link ever appears in the root netns
        tracked = lab.popen(lab.hosts[0], ["sleep", "60"], log=tmp_path / "h1" / "sleep.log")
        stubborn = lab.popen(lab.etcd, ["sh", "-c", "trap '' TERM; while :; do sleep 0.05; done"],
                             log=tmp_path / "stubborn.log")
        stray = subprocess.Popen(["ip", "netns", "exec", lab.client.ns, "sleep", "60"])  # not via the lab
        mon = AddressMonitor(lab, [lab.vip4(1)]).start()
        probe = Probe(lab, lab.vip4(1), log=tmp_path / "probe.log").start()
        assert lab.hosts[0].procs == [tracked]
        time.sleep(0.1)
        assert all(p.poll() is None for p in (tracked, stubborn, stray))
    finally:
        lab.down()
    assert leftovers(prefix) == []
    assert tracked.poll() is not None and stubborn.poll() is not None  # SIGKILL after the grace period
    stray.wait(5)
    assert probe._proc is not None and probe._proc.poll() is not None
    assert mon._thread is not None and not mon._thread.is_alive() and mon.samples > 0
    assert probe.sent() > 0
    assert prefix not in root_links()
    lab.down()  # idempotent


def test_exception_inside_the_lab_removes_everything(tmp_path: Path) -> None:
    prefix = new_prefix()
    with pytest.raises(ZeroDivisionError):
        with Lab(prefix, n_hosts=1) as lab:
            proc = lab.popen(lab.hosts[0], ["sleep", "60"], log=tmp_path / "sleep.log")
            1 / 0
    assert leftovers(prefix) == [] and proc.poll() is not None


def test_failure_during_setup_removes_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    real = netns.run_all
    calls = []

    def failing_last_step(*args, **kwargs):  # the per-namespace configuration: everything exists by now
        calls.append(1)
        real(*args, **kwargs)
        if len(calls) == 2:
            raise netns.CommandError("injected failure")

    monkeypatch.setattr(netns, "run_all", failing_last_step)
    prefix = new_prefix()
    lab = Lab(prefix, n_hosts=2)
    with pytest.raises(netns.CommandError, match="injected"):
        lab.up()
    assert len(calls) == 2 and leftovers(prefix) == [] and not lab.is_up
    lab.down()


def test_a_namespace_it_did_not_create_is_left_alone() -> None:
    prefix = new_prefix()
    netns.ip("netns", "add", prefix + "c")
    try:
        with pytest.raises(FileExistsError):
            Lab(prefix).up()
        assert leftovers(prefix) == [prefix + "c"]
        assert topology.purge(prefix) == [prefix + "c"]
        assert leftovers(prefix) == []
    finally:
        netns.delete([prefix + "c"])


def test_every_node_reaches_every_other(lab: Lab) -> None:
    for src in lab.nodes:
        for dst in lab.nodes:
            assert lab.ping(src, dst.ip), f"{src.name} -> {dst.name} {dst.ip}"
    for h in lab.hosts:
        assert lab.ping(lab.client, h.ip6), f"client -> {h.name} {h.ip6}"
        assert lab.ping(h, lab.etcd.ip6)
    # the root namespace holds no lab address, route or link
    root = subprocess.run(["sh", "-c", "ip -o addr; ip route; ip -6 route; ip -o link"],
                          capture_output=True, text=True, check=True).stdout
    assert "10.213.0." not in root and "fd00:213:" not in root and lab.prefix not in root


def test_add_node_joins_the_segment_and_goes_with_the_lab(tmp_path: Path) -> None:
    prefix = new_prefix()
    lab = Lab(prefix, n_hosts=1).up()
    try:
        r = lab.add_node("router", "r", 1, 0xA0)
        assert (r.ns, str(r.ip), r.mac) == (prefix + "r", "10.213.0.1/24", "02:76:74:00:00:a0")
        assert r in lab.nodes and r.ns in lab.namespaces and lab.host_by_mac(r.mac) is r
        assert lab.ping(r, lab.hosts[0].ip) and lab.ping(lab.hosts[0], r.ip6)
        for clash in (("router", "x", 5, 0xA5), ("x", "r", 5, 0xA5), ("x", "x", 11, 0xA5), ("x", "br", 5, 0xA5)):
            with pytest.raises(ValueError):
                lab.add_node(*clash)
        lab.popen(r, ["sleep", "60"], log=tmp_path / "r.log")
    finally:
        lab.down()
    assert leftovers(prefix) == []
    netns.ip("netns", "add", prefix + "r")  # what a crashed lab would leave: purge knows the name
    assert topology.purge(prefix) == [prefix + "r"] and leftovers(prefix) == []


def test_holders_and_announce(lab: Lab) -> None:
    vip = lab.vip4(7)
    h1, h2, _ = lab.hosts
    assert lab.holders(vip) == []
    addr(lab, h1, "add", vip)
    addr(lab, h2, "add", vip)
    try:
        assert lab.holders(vip) == ["h1", "h2"] and lab.holders(str(vip)) == ["h1", "h2"]
    finally:
        addr(lab, h1, "del", vip)
        addr(lab, h2, "del", vip)
    assert lab.holders(vip) == []


@pytest.mark.parametrize("silent", [False, True], ids=["carrier-loss", "silent"])
def test_cut_and_restore(lab: Lab, silent: bool) -> None:
    h1, h2, _ = lab.hosts
    assert lab.ping(lab.client, h1.ip)
    lab.cut(h1, silent=silent)
    try:
        assert not lab.ping(lab.client, h1.ip, timeout=0.2)
        assert not lab.ping(h1, lab.etcd_ip, timeout=0.2)
        assert lab.ping(h2, lab.etcd_ip)  # the others are untouched
        assert [str(a.ip) for a in lab.addresses(h1) if a.ip == h1.ip.ip]  # the host keeps its addresses
    finally:
        lab.restore(h1)
    assert lab.ping(lab.client, h1.ip) and lab.ping(h1, lab.etcd_ip)


# ---------------------------------------------------------------------- AddressMonitor

def test_monitor_detects_dual_ownership(lab: Lab) -> None:
    vip = lab.vip4(1)
    h1, h2, _ = lab.hosts
    with AddressMonitor(lab, [vip, lab.vip6(1)]) as mon:
        addr(lab, h1, "add", vip)
        time.sleep(0.05)
        addr(lab, h2, "add", vip)
        time.sleep(0.1)
        addr(lab, h1, "del", vip)
        time.sleep(0.05)
        addr(lab, h2, "del", vip)
        assert mon.wait_holders(vip, [], timeout=2)
    dual = mon.dual_ownership()
    assert 0.08 < dual[vip] < 0.5, mon.holders_timeline(vip)
    assert dual[lab.vip6(1).ip] == 0.0
    with pytest.raises(AssertionError) as exc:
        mon.assert_never_dual()
    assert "10.213.0.101" in str(exc.value) and "h1, h2" in str(exc.value) and " ms " in str(exc.value)
    assert [(sorted(old), sorted(new)) for _, old, new in mon.owner_changes(vip)] == [
        ([], ["h1"]), (["h1"], ["h1", "h2"]), (["h1", "h2"], ["h2"]), (["h2"], [])]
    assert mon.samples > 15 and mon.max_gap < 0.1, mon.summary()


def test_monitor_reports_no_dual_for_clean_moves(lab: Lab) -> None:
    """Delete on A then add on B is never dual ownership, even back to back (~0.1 ms apart), although
    the hosts are dumped one after another."""
    from pyroute2 import IPRoute

    vip = lab.vip4(2)
    h1, h2, _ = lab.hosts
    r1, r2 = IPRoute(netns=h1.ns, flags=0), IPRoute(netns=h2.ns, flags=0)
    try:
        i1, i2 = r1.link_lookup(ifname=h1.ifname)[0], r2.link_lookup(ifname=h2.ifname)[0]
        with AddressMonitor(lab, [vip]) as mon:
            addr(lab, h1, "add", vip)  # one slow move with `ip`...
            time.sleep(0.03)
            addr(lab, h1, "del", vip)
            addr(lab, h2, "add", vip)
            assert mon.wait_holders(vip, ["h2"], timeout=2)
            addr(lab, h2, "del", vip)
            r1.addr("add", index=i1, address=str(vip.ip), prefixlen=32)
            for _ in range(150):  # ...and many fast ones
                r1.addr("del", index=i1, address=str(vip.ip), prefixlen=32)
                r2.addr("add", index=i2, address=str(vip.ip), prefixlen=32)
                r2.addr("del", index=i2, address=str(vip.ip), prefixlen=32)
                r1.addr("add", index=i1, address=str(vip.ip), prefixlen=32)
            r1.addr("del", index=i1, address=str(vip.ip), prefixlen=32)
            assert mon.wait_holders(vip, [], timeout=2)
        mon.assert_never_dual()
        assert mon.dual_ownership() == {vip.ip: 0.0}
        assert any(new == {"h2"} for _, _, new in mon.owner_changes(vip)), mon.owner_changes(vip)
        assert mon.events > 0
    finally:
        r1.close()
        r2.close()


# ---------------------------------------------------------------------- Probe

@pytest.mark.parametrize("family", [4, 6])
def test_probe_measures_a_manual_move(lab: Lab, tmp_path: Path, family: int) -> None:
    vip = lab.vip4(3) if family == 4 else lab.vip6(3)
    h1, h2, _ = lab.hosts
    addr(lab, h1, "add", vip)
    try:
        with Probe(lab, vip, log=tmp_path / "probe.log") as probe:
            assert probe.wait_responder("h1", timeout=3), probe.summary()
            time.sleep(0.05)
            addr(lab, h1, "del", vip)
            moved = time.monotonic()
            time.sleep(0.2)
            addr(lab, h2, "add", vip)
            lab.announce(h2, vip)  # gratuitous ARP / unsolicited NA updates the client's entry
            assert probe.wait_responder("h2", timeout=3), probe.summary()
            time.sleep(0.05)
        outages = probe.outages()
        assert len(outages) == 1, outages
        o = outages[0]
        assert 150 <= o.ms <= 600 and o.before_host == "h1" and o.after_host == "h2", o
        assert moved - 0.02 <= o.start <= moved + 0.05
        assert probe.outages(since=o.end + 0.001) == []
        assert probe.last_responder() == "h2"
        assert probe.sent() >= 25 and probe.answered() >= probe.sent() - o.lost - 2
        assert [h for _, h in probe.responders()] == ["h1", "h2"]
        assert probe.max_send_gap < 0.1, probe.summary()
    finally:
        addr(lab, h2, "del", vip)


def test_probe_reports_an_unreachable_vip_as_one_outage(lab: Lab, tmp_path: Path) -> None:
    with Probe(lab, lab.vip4(4), log=tmp_path / "probe.log") as probe:
        time.sleep(0.15)
    assert probe.answered() == 0 and probe.last_responder() is None
    [o] = probe.outages()
    assert o.before_host is None and o.after_host is None and o.ongoing and o.lost == probe.sent()


def test_outage_arithmetic() -> None:
    """Outages from a synthetic run: one lost probe is no outage, two are; a late reply is lost."""
    names = {"02:76:74:00:00:01": "h1", "02:76:74:00:00:02": "h2"}
    fake = SimpleNamespace(prefix="vtcx", host_by_mac=lambda mac: SimpleNamespace(name=names[mac]))
    probe = Probe(fake, "10.213.0.101", interval=0.01)  # type: ignore[arg-type]
    answers = {**{i: "h1" for i in [*range(10), 11, 13, 14]}, **{i: "h2" for i in range(20, 28)}}
    for seq in range(30):
        probe._handle(["s", seq, seq * 0.01])
        if seq in answers:
            probe._handle(["r", seq, seq * 0.01 + 0.0003, "02:76:74:00:00:0" + answers[seq][1]])
    probe._handle(["r", 12, 0.12 + 0.5, "02:76:74:00:00:01"])  # too late: lost
    assert probe.sent() == 30 and probe.answered() == len(answers) and probe.late == 1
    a, b = probe.outages()
    assert (a.lost, a.before_host, a.after_host) == (5, "h1", "h2") and a.ms == pytest.approx(50)
    assert a.start == pytest.approx(0.15) and a.end == pytest.approx(0.20) and not a.ongoing
    assert (b.lost, b.before_host, b.after_host, b.ongoing) == (2, "h2", None, True) and b.ms == pytest.approx(20)
    assert probe.outages(since=0.25) == [b]
    assert probe.responders() == [(0.0, "h1"), (pytest.approx(0.20), "h2")]
    assert probe.last_responder() == "h1"  # the late reply arrived last

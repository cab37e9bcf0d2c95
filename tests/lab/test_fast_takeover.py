"""Fast takeover end to end (vipd/succession.py): real etcd, vipd on three host namespaces, a client
probing the VIP every 10 ms and naming the answering host by its MAC, and the make_cluster monitor
failing the test on any instant two hosts *serve* the VIP (address present and fence token alive).

How long each fault costs the client is measured by bench/failover.py, not asserted here; these
tests assert who serves, in which order, and what each host's kernel holds.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import re
import signal
import time
from typing import Any

import pytest

from tests.lab.util import wait_for
from vipd.lab.cluster import Cluster, VipDef
from vipd.lab.fence_tokens import TokenGates, netfilter_socket
from vipd.lab.probe import Probe
from vipd.lab.topology import Lab

pytestmark = pytest.mark.needs_tools("nft")


def status(c: Cluster, host: str) -> dict[str, Any]:
    out = c.run_cli(c.host(host), "status", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def row(c: Cluster, host: str, vip: str = "api") -> dict[str, Any]:
    return next(v for v in status(c, host)["vips"] if v["vip"] == vip)


def named(c: Cluster, probe: Probe, vip: str = "api") -> tuple[str, str]:
    """Wait for one host serving and its successor named in the owner key: (owner, successor)."""
    got: dict[str, Any] = {}

    def ready() -> bool:
        owner = probe.last_responder()
        if owner is None:
            return False
        got.update(row(c, owner, vip))
        return got.get("owner") == owner and bool(got.get("successor"))

    wait_for(ready, 20, "an owner serving with a successor named", interval=0.3)
    return got["owner"], got["successor"]


def token_alive(lab: Lab, host: str, ip: Any) -> bool:
    """The host's fence lets the VIP through: its token alive, and its successor's grant too when
    it is in a grant's group (read as the address monitor reads it)."""
    gates = TokenGates()
    with contextlib.closing(netfilter_socket(lab.host(host).ns)) as sock:
        at = gates.read(host, sock, [ip])
    end = gates.gated_end(host, ip)
    return end is None or end > at


def responders_since(probe: Probe, t: float) -> set[str]:
    """Every host that answered a probe sent at or after t."""
    changes = probe.responders()
    before = [h for at, h in changes if at < t]
    return set(before[-1:]) | {h for at, h in changes if at >= t}


@pytest.fixture
def api(lab: Lab, make_cluster: Any) -> tuple[Cluster, Any]:
    c = make_cluster([VipDef("api", str(lab.vip4(0)))])
    return c, ipaddress.ip_interface(c.vips[0].address).ip


def test_sigkill_owner_successor_takes_over_and_dead_kernel_stops_answering(lab: Lab, api: Any) -> None:
    c, ip = api
    with Probe(lab, ip) as probe:
        old, succ = named(c, probe)
        assert token_alive(lab, old, ip)
        c.kill(c.host(old))
        assert probe.wait_responder(succ, timeout=10), probe.summary()
        moved = time.monotonic()
        # nobody ran code on the dead host: its kernel token ended, its address is still there
        assert not token_alive(lab, old, ip)
        assert old in lab.holders(ip)
        log = c.log_path(c.host(succ)).read_text()
        assert f"event=took_over vip=api previous={old}" in log
        assert "reason=\"took over from a suspect owner\"" in log
        time.sleep(0.5)
        assert responders_since(probe, moved) == {succ}
    # the new owner names a successor of its own (the third host)
    third = ({h.name for h in lab.hosts} - {old, succ}).pop()
    wait_for(lambda: row(c, succ)["successor"] == third, 10, "the new owner names the third host",
             interval=0.3)
    assert re.search(r'vipd_takeovers_total\{(?=[^}]*cause="peer")(?=[^}]*vip="api")[^}]*\} 1\.0',
                     c.metrics(c.host(succ)))


def test_frozen_owner_thawed_never_serves_again(lab: Lab, api: Any) -> None:
    c, ip = api
    with Probe(lab, ip) as probe:
        old, succ = named(c, probe)
        c.signal(c.host(old), signal.SIGSTOP)
        assert probe.wait_responder(succ, timeout=10), probe.summary()
        moved = time.monotonic()
        time.sleep(0.3)
        c.signal(c.host(old), signal.SIGCONT)
        wait_for(lambda: "to=fenced" in c.log_path(c.host(old)).read_text(), 10, "the thawed owner fences")
        time.sleep(0.5)
        assert responders_since(probe, moved) == {succ}, probe.summary()
        assert not token_alive(lab, old, ip)


def test_owner_link_cut_successor_takes_over_old_fences_on_return(lab: Lab, api: Any) -> None:
    c, ip = api
    with Probe(lab, ip) as probe:
        old, succ = named(c, probe)
        lab.cut(c.host(old))
        assert probe.wait_responder(succ, timeout=10), probe.summary()
        moved = time.monotonic()
        lab.restore(c.host(old))
        wait_for(lambda: "to=fenced" in c.log_path(c.host(old)).read_text(), 10, "the cut owner fences")
        time.sleep(0.5)
        assert responders_since(probe, moved) == {succ}, probe.summary()


def test_one_way_loss_owner_to_successor_renames_before_the_successor_may_suspect(lab: Lab, api: Any) -> None:
    """The successor hears nothing from the owner: its echoes stop advancing, so the owner's grant
    stalls and the owner names the third host after L/2, before the successor's grace G runs out.
    The successor does suspect the owner, but the record no longer names it: no takeover, no move."""
    c, ip = api
    with Probe(lab, ip) as probe:
        old, succ = named(c, probe)
        t0 = time.monotonic()
        lab.one_way([(c.host(old), c.host(succ))])
        try:
            third = ({h.name for h in lab.hosts} - {old, succ}).pop()
            wait_for(lambda: row(c, old)["successor"] == third, 10, "the owner names the third host", interval=0.3)
            wait_for(lambda: f"event=peer_suspected peer={old}" in c.log_path(c.host(succ)).read_text(), 10,
                     "the old successor suspects the owner")
            time.sleep(0.5)
            assert responders_since(probe, t0) == {old}, probe.summary()
            assert "event=took_over" not in c.log_path(c.host(succ)).read_text()
        finally:
            lab.heal_loss()


def test_one_way_loss_successor_to_owner_renames_and_keeps_the_vip(lab: Lab, api: Any) -> None:
    c, ip = api
    with Probe(lab, ip) as probe:
        old, succ = named(c, probe)
        t0 = time.monotonic()
        lab.one_way([(c.host(succ), c.host(old))])  # the owner hears no acks; the successor hears the owner
        try:
            third = ({h.name for h in lab.hosts} - {old, succ}).pop()
            wait_for(lambda: row(c, old)["successor"] == third, 10, "the owner names the third host", interval=0.3)
            time.sleep(0.5)
            assert responders_since(probe, t0) == {old}, probe.summary()  # the VIP never moved
            assert f"event=successor_named vip=api successor={third} previous={succ}" in \
                c.log_path(c.host(old)).read_text()
        finally:
            lab.heal_loss()


def test_standby_sigkill_owner_keeps_the_vip(lab: Lab, api: Any) -> None:
    c, ip = api
    with Probe(lab, ip) as probe:
        old, succ = named(c, probe)
        t0 = time.monotonic()
        c.kill(c.host(succ))
        third = ({h.name for h in lab.hosts} - {old, succ}).pop()
        wait_for(lambda: row(c, old)["successor"] == third, 10, "the owner names the third host", interval=0.3)
        time.sleep(0.5)
        assert responders_since(probe, t0) == {old}, probe.summary()
        assert "to=fenced" not in c.log_path(c.host(old)).read_text()


def test_segment_loss_never_two_servers_and_few_moves(lab: Lab, api: Any) -> None:
    """10 % of frames lost on every port for 15 s (the 60 s soak is bench/chaos.py): heartbeats
    falter, suspicions may move the VIP, the monitor (fixture) proves no instant of two servers."""
    c, ip = api
    with Probe(lab, ip) as probe:
        named(c, probe)
        lab.segment_loss(10)
        try:
            time.sleep(15)
        finally:
            lab.heal_loss()
        time.sleep(1.0)
        assert probe.last_responder() is not None
    moves = len(c.monitor.owner_changes(ip))  # type: ignore[attr-defined]
    assert moves <= 10, f"{moves} ownership changes in 15 s of 10 % loss"


def _logged_at(line: str) -> float:
    return dt.datetime.fromisoformat(line.split()[0].rstrip("Z")).replace(tzinfo=dt.timezone.utc).timestamp()


def test_a_standby_stopped_is_replaced_as_successor_before_it_stops_granting(lab: Lab, make_cluster: Any) -> None:
    """SIGTERM to the successor of 40 VIPs' owner: its presence says "stopping" at once, the owner's
    placement drops it and the owner renames the successor of each while the stopping host still
    heartbeats (it waits for those renames before it exits), so no VIP's token depends on a grant
    that lapses: the probed VIP never stops answering. (Before, the renames followed the exit: the
    owner's grant from the stopped host lapsed first and its VIPs went dark for 20-40 ms.)"""
    c = make_cluster([VipDef(f"v{i}", str(lab.vip4(i))) for i in range(40)])
    ip = ipaddress.ip_interface(c.vips[0].address).ip
    with Probe(lab, ip) as probe:
        old, succ = named(c, probe, "v0")
        third = ({h.name for h in lab.hosts} - {old, succ}).pop()
        t0 = time.monotonic()
        assert c.term(c.host(succ), 15) == 0
        time.sleep(0.5)
        assert responders_since(probe, t0) == {old}, probe.summary()
        assert not probe.outages(since=t0), probe.summary()
    renamed = [ln for ln in c.log_path(c.host(old)).read_text().splitlines()
               if "event=successor_named vip=v0 " in ln and f"previous={succ}" in ln]
    stopped = [ln for ln in c.log_path(c.host(succ)).read_text().splitlines() if "event=stopped" in ln]
    assert renamed and stopped, (renamed, stopped)
    assert _logged_at(renamed[-1]) < _logged_at(stopped[-1]), (renamed[-1], stopped[-1])
    assert f"successor={third}" in renamed[-1] or "successor=-" in renamed[-1]

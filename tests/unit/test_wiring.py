"""The daemon's wiring seams that run without a kernel: Fitness vetoes, the takeover metric (pure and
through the real controller on the mock clock), the DSR fence port, and the L2 gate's failure path."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import trio
import trio.testing

from tests.unit.controller_fakes import FakeEtcd, make_host
from tests.unit.test_controller import owner_of, start, wait_state
from vipd import config
from vipd.dataplane.netlink import Netlink
from vipd.dsr.service import DsrService
from vipd.fitness import Fitness
from vipd.metrics import Metrics
from vipd.model import Event, HealthChanged, ReleaseRequested, State
from vipd.takeover import takeover
from vipd.wiring_dsr import ServiceFence
from vipd.wiring_l2 import L2Gate


def cfg(**extra: Any) -> config.Config:
    return config.parse({"node": "n1", "vip": [
        {"name": "api", "address": "10.0.0.10/24", "interface": "eth0"},
        {"name": "web", "address": "10.0.0.20/24", "interface": "eth0",
         "service": [{"protocol": "tcp", "port": 80, "backends": [{"node": "n2", "address": "10.0.0.2"}]}]},
        {"name": "routed", "address": "198.18.0.1/32", "interface": "lo"}], **extra})


# ---------------------------------------------------------------- Fitness vetoes

def test_a_veto_makes_one_unit_unfit_with_its_reason_and_lifting_it_restores_it() -> None:
    posted: list[tuple[str, Event]] = []
    changes = []
    f = Fitness(cfg(), lambda u, ev: posted.append((u, ev)), lambda: changes.append(1), Metrics("n1"))
    assert f.initial("api") and f.reasons("api") == []
    f.veto("api", "L2 mode refused on eth0: proxy ARP", source="l2")
    assert posted == [("api", HealthChanged(False, "api/l2: L2 mode refused on eth0: proxy ARP"))]
    assert f.reasons("api") == ["api/l2: L2 mode refused on eth0: proxy ARP"] and not f.initial("api")
    p = json.loads(f.presence())
    assert p["healthy"] and p["down"] == ["api"] and p["reasons"] == ["api/l2: L2 mode refused on eth0: proxy ARP"]
    f.veto("api", "backend refused", source="dsr")  # a second source adds to it
    assert len(f.reasons("api")) == 2 and len(posted) == 1  # still unfit: no new event
    f.veto("api", None, source="l2")
    f.veto("api", None, source="dsr")
    assert posted[-1] == ("api", HealthChanged(True, "")) and f.reasons("api") == []
    assert json.loads(f.presence())["down"] == [] and changes


# ---------------------------------------------------------------- takeover metric

@dataclass
class S:
    last_owner: str | None = None
    last_clean: bool = False
    absent_since: float = 0.0


def test_takeover_is_a_claim_of_what_another_host_held() -> None:
    assert takeover("h1", S(), 10.0) is None  # nobody held it: a first claim
    assert takeover("h1", S("h1", True, 9.0), 10.0) is None  # taking back what we let go
    assert takeover("h1", S("h2", True, 9.5), 10.0) == ("released", 0.5)
    assert takeover("h1", S("h2", False, 7.0), 10.0) == ("expired", 3.0)


async def test_controller_records_a_planned_takeover_and_not_the_first_claim(autojump_clock):  # type: ignore[no-untyped-def]
    etcd = FakeEtcd()
    hosts = [make_host(etcd, "h1", 1), make_host(etcd, "h2", 2)]
    async with trio.open_nursery() as n:
        await start(n, etcd, hosts)
        await trio.sleep(2)
        o = owner_of(hosts)
        other = hosts[1] if o is hosts[0] else hosts[0]
        assert o.metrics.takeovers == []  # nobody held it before
        o.controller.post(ReleaseRequested("operator"))
        await wait_state(other, State.OWNER, limit=5)
        [(cause, seconds)] = other.metrics.takeovers
        assert cause == "released" and seconds is not None and 0 <= seconds < 2
        n.cancel_scope.cancel()


async def test_controller_records_a_takeover_after_the_owner_lease_expired(autojump_clock):  # type: ignore[no-untyped-def]
    from tests.unit.test_controller import keepalives  # noqa: F401  (start() runs them)

    etcd = FakeEtcd()
    hosts = [make_host(etcd, "h1", 1), make_host(etcd, "h2", 2)]
    async with trio.open_nursery() as n:
        alive = await start(n, etcd, hosts)
        await trio.sleep(2)
        o = owner_of(hosts)
        other = hosts[1] if o is hosts[0] else hosts[0]
        alive[hosts.index(o)][0] = False
        await wait_state(o, State.BACKUP)
        etcd.expire_lease(o.lease.lease_id)
        await wait_state(other, State.OWNER)
        assert [c for c, _ in other.metrics.takeovers] == ["expired"]
        n.cancel_scope.cancel()


# ---------------------------------------------------------------- the DSR fence port

class FakeMaps:
    def __init__(self) -> None:
        self.deadlines: dict[Any, int] = {}

    def set_deadline(self, ip: Any, ns: int) -> None:
        self.deadlines[ip] = ns

    def clear_deadline(self, ip: Any) -> None:
        self.deadlines.pop(ip, None)


async def test_service_fence_covers_only_vips_with_services_and_arms_only_those() -> None:
    c = cfg()
    svc = DsrService(c.node, c.vips, Netlink())  # never opened: nothing here touches the kernel
    fence = ServiceFence(svc)
    api, web, routed = c.vips
    assert fence.covers([web]) and fence.covers([api, web]) and not fence.covers([api]) and not fence.covers([routed])
    until = trio.current_time() + 5
    await fence.arm([api, web], until)  # not directing (no program): nothing armed, nothing claimed
    assert fence.armed_until([web]) is None
    maps = FakeMaps()
    svc.director.maps = maps  # type: ignore[assignment]
    await fence.arm([api, web], until)
    assert list(maps.deadlines) == [web.ip] and fence.armed_until([api, web]) == until
    assert svc.fence.covers([web])
    await fence.disarm([api, web])
    assert maps.deadlines == {} and fence.armed_until([web]) is None


# ---------------------------------------------------------------- the L2 gate

class Vetoes:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    def veto(self, unit: str, reason: str | None, *, source: str) -> None:
        self.calls.append((unit, reason))


async def test_l2_gate_that_cannot_test_blocks_nothing_and_lets_the_daemon_go_on() -> None:
    vetoes, m = Vetoes(), Metrics("n1")
    gate = L2Gate(cfg(), Netlink(), m, vetoes)  # never opened: every netlink call raises DataplaneError
    await gate.run()
    assert gate.checked.is_set() and gate.blocked == {} and vetoes.calls == []
    assert 'vipd_l2_blocked{interface="eth0"} 0.0' in m.render().decode()


async def test_l2_gate_without_nic_vips_does_nothing() -> None:
    c = config.parse({"node": "n1", "vip": [{"name": "r", "address": "198.18.0.1/32", "interface": "lo"}]})
    gate = L2Gate(c, Netlink(), Metrics("n1"), Vetoes())
    assert not gate.needed
    await gate.run()
    assert gate.checked.is_set()


async def test_l2_gate_holds_keepalives_back_until_its_vetoes_are_in() -> None:
    from vipd.doctor.findings import Finding, Severity
    from vipd.model import LeaseGone, LeaseValid

    class Blocked(L2Gate):
        async def _test(self):  # type: ignore[no-untyped-def]
            await release.wait()
            return {"eth0": Finding("l2.proxy_arp", Severity.ERROR, "eth0", "proxy ARP answers for everyone",
                                    fix="turn it off")}

    release, vetoes, published = trio.Event(), Vetoes(), []
    gate = Blocked(cfg(), Netlink(), Metrics("n1"), vetoes)
    publish = gate.gate(lambda ev: published.append((ev, list(vetoes.calls))))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gate.run)
        await trio.testing.wait_all_tasks_blocked()
        publish(LeaseValid(7, 10.0))
        publish(LeaseGone(7))  # passes, and the older keepalive is not published after it
        publish(LeaseValid(8, 11.0))
        publish(LeaseValid(8, 12.0))
        assert [ev for ev, _ in published] == [LeaseGone(7)]
        release.set()
    assert [ev for ev, _ in published] == [LeaseGone(7), LeaseValid(8, 12.0)]
    assert {u for u, _ in published[1][1]} == {"api", "web"}  # the vetoes were in before the lease
    publish(LeaseValid(8, 13.0))  # once checked, at once
    assert published[-1][0] == LeaseValid(8, 13.0)

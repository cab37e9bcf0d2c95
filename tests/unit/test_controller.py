"""The real controller with in-memory fakes of its ports: the scenarios that only the root lab
reached before, on trio's MockClock (autojump), with etcd failures injected at every action."""

from __future__ import annotations

import math

import pytest
import trio

from tests.unit.controller_fakes import FakeEtcd, FakeHost, make_host, vip
from vipd.errors import AddressError
from vipd.model import (HealthChanged, LeaseValid, OwnerObserved, OwnerRecord, Placement, ReleaseRequested,
                        ShutdownRequested, State)
from vipd.ownership.state import Params, Sub


async def keepalives(host: FakeHost, alive: list[bool], period: float = 0.5) -> None:
    while True:
        if alive[0]:
            host.controller.post(LeaseValid(host.lease.lease_id, trio.current_time() + host.lease.ttl))
        await trio.sleep(period)


async def never_two(hosts: list[FakeHost], name: str = "api") -> None:
    """The invariant, sampled every millisecond of (mock) time."""
    while True:
        holders = [h.node for h in hosts if h.kernel.holds(name)]
        assert len(holders) <= 1, f"two holders at {trio.current_time():.3f}: {holders}"
        await trio.sleep(0.001)


async def wait_state(host: FakeHost, state: State, limit: float = 30.0) -> None:
    with trio.fail_after(limit):
        while host.controller.state.state is not state:
            await trio.sleep(0.01)


async def start(nursery: trio.Nursery, etcd: FakeEtcd, hosts: list[FakeHost]) -> list[list[bool]]:
    alive = []
    for h in hosts:
        await nursery.start(h.controller.run)
        flag = [True]
        alive.append(flag)
        nursery.start_soon(keepalives, h, flag)
    for h in hosts:
        h.controller.post(OwnerObserved(OwnerRecord(None, revision=etcd.revision)))
    nursery.start_soon(never_two, hosts)
    return alive


def owner_of(hosts: list[FakeHost]) -> FakeHost:
    owners = [h for h in hosts if h.controller.state.state is State.OWNER]
    assert len(owners) == 1, [h.controller.state for h in hosts]
    return owners[0]


async def test_one_of_two_hosts_takes_the_vip(autojump_clock):
    etcd = FakeEtcd()
    hosts = [make_host(etcd, "h1", 1), make_host(etcd, "h2", 2)]
    async with trio.open_nursery() as n:
        await start(n, etcd, hosts)
        await trio.sleep(2)
        o = owner_of(hosts)
        assert o.kernel.holds("api") and etcd.keys["api"].node == o.node
        n.cancel_scope.cancel()


async def test_silent_lease_fences_before_etcd_lets_the_other_host_win(autojump_clock):
    etcd = FakeEtcd()
    hosts = [make_host(etcd, "h1", 1), make_host(etcd, "h2", 2)]
    async with trio.open_nursery() as n:
        alive = await start(n, etcd, hosts)
        await trio.sleep(2)
        o = owner_of(hosts)
        other = hosts[1] if o is hosts[0] else hosts[0]
        alive[hosts.index(o)][0] = False  # keepalives stop being acknowledged
        await wait_state(o, State.BACKUP)
        assert not o.kernel.holds("api")  # fenced by the controller, without a word from etcd
        await trio.sleep(o.lease.ttl)  # etcd expires the silent lease only later
        etcd.expire_lease(o.lease.lease_id)
        await wait_state(other, State.OWNER)
        n.cancel_scope.cancel()


async def test_health_release_survives_an_etcd_blip_on_the_key_delete(autojump_clock):
    """The old core's liveness bug: the delete failed once and the unit stayed RELEASING for good."""
    etcd = FakeEtcd()
    hosts = [make_host(etcd, "h1", 1), make_host(etcd, "h2", 2)]
    async with trio.open_nursery() as n:
        await start(n, etcd, hosts)
        await trio.sleep(2)
        o = owner_of(hosts)
        other = hosts[1] if o is hosts[0] else hosts[0]
        etcd.fail.add("release")
        o.controller.post(HealthChanged(False, "check failed"))
        with trio.fail_after(5):
            while o.controller.state.sub is not Sub.RETRY_DELETE:
                await trio.sleep(0.01)
        assert not o.kernel.holds("api") and etcd.keys["api"].node == o.node
        etcd.fail.discard("release")  # etcd answers again: the retry gives the key back
        await wait_state(other, State.OWNER, limit=5)
        assert o.controller.state.state is State.BACKUP
        n.cancel_scope.cancel()


@pytest.mark.parametrize("fail", ["campaign", "release"])
async def test_etcd_failing_at_every_action_recovers_when_it_answers(autojump_clock, fail):
    etcd = FakeEtcd()
    hosts = [make_host(etcd, "h1", 1), make_host(etcd, "h2", 2)]
    etcd.fail.add(fail)
    async with trio.open_nursery() as n:
        await start(n, etcd, hosts)
        await trio.sleep(2)
        if fail == "campaign":
            assert all(h.controller.state.state is State.BACKUP for h in hosts)
            assert sum(1 for op, _ in etcd.calls if op == "campaign") > 4  # retried, bounded pace
            etcd.fail.clear()
            await trio.sleep(2)
            owner_of(hosts)
        else:
            o = owner_of(hosts)
            o.controller.post(ReleaseRequested("operator"))
            await trio.sleep(2)
            assert not o.kernel.holds("api")
            etcd.fail.clear()
            await trio.sleep(3)
            assert etcd.keys.get("api") is None or etcd.keys["api"].node != o.node or o.controller.state.state is State.OWNER
        n.cancel_scope.cancel()


async def test_address_failure_gives_the_key_back_and_the_other_host_serves(autojump_clock):
    etcd = FakeEtcd()
    h1, h2 = make_host(etcd, "h1", 1), make_host(etcd, "h2", 2)
    h1.kernel.fail_add = True
    async with trio.open_nursery() as n:
        await start(n, etcd, [h1])
        await trio.sleep(0.5)
        assert "claim" in h1.metrics.errors and "api" not in etcd.keys  # tried, failed, gave it back
        await start(n, etcd, [h2])
        await trio.sleep(3)
        assert h2.controller.state.state is State.OWNER and h2.kernel.holds("api")
        assert not h1.kernel.holds("api")
        n.cancel_scope.cancel()


async def test_claim_with_less_than_a_second_left_renews_the_lease_at_once(autojump_clock):
    etcd = FakeEtcd()
    h1 = make_host(etcd, "h1", 1, params=Params("h1", fence_margin=0.5, release_holdoff=1.0))
    async with trio.open_nursery() as n:
        await n.start(h1.controller.run)
        now = trio.current_time()
        h1.controller.post(LeaseValid(1, now + 1.3))  # fence deadline now + 0.8: no whole second left
        h1.controller.post(OwnerObserved(OwnerRecord(None, revision=1)))
        await wait_state(h1, State.OWNER, limit=1)
        assert h1.lease.renewals == 1 and trio.current_time() - now < 0.1
        n.cancel_scope.cancel()


async def test_conflict_probe_refusal_releases_and_backs_off(autojump_clock):
    class Conflicts:
        calls = 0

        async def check_free(self, v):  # type: ignore[no-untyped-def]
            Conflicts.calls += 1
            raise AddressError("02:00:00:00:00:99 answers for it")

    etcd = FakeEtcd()
    h1 = make_host(etcd, "h1", 1, params=Params("h1", 0.5, 1.0, conflict_check=True), conflicts=Conflicts())
    async with trio.open_nursery() as n:
        await start(n, etcd, [h1])
        await trio.sleep(10)
        assert not [op for _, op, _ in h1.kernel.history if op == "add"]  # never added
        assert 2 <= Conflicts.calls <= 5  # backed off: 1 s, 2 s, 4 s ...
        assert "api" not in etcd.keys or etcd.keys["api"].node != "h1" or h1.controller.state.sub is Sub.PROBING
        n.cancel_scope.cancel()


async def test_shutdown_removes_then_gives_the_key_back(autojump_clock):
    etcd = FakeEtcd()
    hosts = [make_host(etcd, "h1", 1, [vip(), vip("api2", "10.0.0.11/24")])]
    async with trio.open_nursery() as n:
        await start(n, etcd, hosts)
        await trio.sleep(2)
        h = owner_of(hosts)
        h.controller.post(ShutdownRequested())
        with trio.fail_after(2):
            await h.controller.stopped.wait()
        assert not h.kernel.held and "api" not in etcd.keys
        dels = [t for t, op, _ in h.kernel.history if op == "del"]
        assert dels and max(dels) <= trio.current_time()
        n.cancel_scope.cancel()


async def test_a_daemon_stop_frees_the_address_before_the_key_and_says_so(autojump_clock):
    """ShutdownRequested(revoke=True): `address_gone` turns true once the address left the kernel,
    while the key is still being marked (etcd slow): a stop may revoke then. The key is left on the
    lease, marked released."""
    etcd = FakeEtcd()
    hosts = [make_host(etcd, "h1", 1, [vip()])]
    async with trio.open_nursery() as n:
        await start(n, etcd, hosts)
        await trio.sleep(2)
        h = owner_of(hosts)
        assert not h.controller.address_gone
        etcd.fail.add("release")
        h.controller.post(ShutdownRequested(revoke=True))
        with trio.fail_after(2):
            while not h.controller.address_gone:
                await trio.sleep(0.001)
        assert not h.kernel.held and h.controller.state.state is State.RELEASING
        etcd.fail.clear()
        await h.controller.stopped.wait()
        assert h.controller.state.state is State.STOPPED and h.controller.address_gone
        n.cancel_scope.cancel()


async def test_a_unit_whose_removal_failed_on_the_way_out_keeps_the_revoke_back(autojump_clock):
    """Fenced (etcd silent), its removal failing, then stopped: STOPPED, yet `address_gone` stays
    false: its address may still be in the kernel until its lifetime ends."""
    etcd = FakeEtcd()
    hosts = [make_host(etcd, "h1", 1, [vip()])]
    async with trio.open_nursery() as n:
        alive = await start(n, etcd, hosts)
        await trio.sleep(2)
        h = owner_of(hosts)
        h.kernel.fail_remove = True
        alive[0][0] = False
        await wait_state(h, State.FENCED)
        h.controller.post(ShutdownRequested(revoke=True))
        await wait_state(h, State.STOPPED)
        await trio.sleep(0.1)
        assert not h.controller.address_gone
        n.cancel_scope.cancel()


async def test_a_keepalive_that_arrives_during_a_long_claim_is_taken_before_the_deadline_fences(autojump_clock):
    """A claim that waits longer than the lease's fence deadline (a batch of thousands): the
    keepalives posted meanwhile extend the deadline before the unit steps the claim's outcome or
    its timer, so it serves instead of fencing (and claiming again, in a loop)."""
    etcd = FakeEtcd()
    h = make_host(etcd, "h1", 1)
    async with trio.open_nursery() as n:
        await start(n, etcd, [h])
        await trio.sleep(0.1)  # the first claim went through quickly
        await wait_state(h, State.OWNER)
        h.controller.post(ReleaseRequested("test"))
        await wait_state(h, State.BACKUP)
        h.kernel.claim_delay = 3.5  # longer than the 2.5 s from a keepalive to its fence deadline
        await wait_state(h, State.OWNER, limit=30)
        await trio.sleep(3)
        assert h.controller.state.state is State.OWNER and h.kernel.holds("api")
        assert (State.OWNER, State.FENCED) not in h.metrics.transitions
        n.cancel_scope.cancel()


async def test_a_unit_not_holding_keeps_a_keepalive_of_its_lease_until_its_next_event(autojump_clock):
    etcd = FakeEtcd()
    h = make_host(etcd, "h1", 1)
    c = h.controller
    async with trio.open_nursery() as n:
        await n.start(c.run)
        c.post(LeaseValid(1, 10.0))
        await trio.sleep(0.1)
        assert c.state.state is State.BACKUP and c.state.valid_until == 10.0
        assert c.defer_lease(LeaseValid(1, 20.0))  # same lease, nothing held: kept, not stepped
        assert c.state.valid_until == 10.0 and c.valid_until == 20.0
        assert not c.defer_lease(LeaseValid(2, 30.0))  # a new lease is stepped at once
        c.post(HealthChanged(True))  # the next event takes the kept lease first
        await trio.sleep(0.1)
        assert c.state.valid_until == 20.0
        n.cancel_scope.cancel()


async def test_an_offered_event_that_only_notes_is_stepped_in_place_and_one_with_actions_wakes_the_task(autojump_clock):
    """offer(): a placement for a unit that waits is noted at once, without a task wake-up (no
    checkpoint passes between the offer and the check); a keepalive kept for the unit, or an
    event whose step asks for something (the owner gone: a campaign), goes to the task."""
    etcd = FakeEtcd()
    hosts = [make_host(etcd, "h1", 1), make_host(etcd, "h2", 2)]
    async with trio.open_nursery() as n:
        await start(n, etcd, hosts)
        await trio.sleep(2.2)  # (between two keepalives: none queued)
        o = owner_of(hosts)
        other = hosts[1] if o is hosts[0] else hosts[0]
        c = other.controller
        assert c.state.state is State.BACKUP
        c.offer(Placement((other.node, o.node)))
        assert c.state.ranking == (other.node, o.node) and c.state.state is State.BACKUP
        assert c.defer_lease(LeaseValid(other.lease.lease_id, trio.current_time() + 5))
        c.offer(Placement((o.node, other.node)))  # a keepalive is kept: the task steps both, in order
        assert c.state.ranking == (other.node, o.node)
        await trio.sleep(0.1)
        assert c.state.ranking == (o.node, other.node)
        gone = OwnerRecord(None, revision=etcd.revision + 1)
        c.offer(OwnerObserved(gone))  # its step campaigns: not in place
        assert c.state.owner != gone
        o.controller.post(ShutdownRequested())
        await wait_state(other, State.OWNER)
        n.cancel_scope.cancel()


async def test_a_campaign_not_sent_yet_is_withdrawn_when_a_host_that_joined_meanwhile_ranks_first(autojump_clock):
    """A host starting thousands of campaigns sends them over seconds; h9 joined meanwhile and
    ranks first: the campaign is withdrawn right before its transaction would go out, the unit
    waits h9's join grace, and campaigns only once h9 did not take it (here it never comes)."""
    etcd = FakeEtcd()
    h = make_host(etcd, "h1", 1)
    async with trio.open_nursery() as n:
        await start(n, etcd, [h])
        h.controller.post(Placement(("h9", "h1"), (trio.current_time(), -math.inf)))
        await trio.sleep(1)
        assert "api" not in etcd.keys and ("campaign", "h1") not in etcd.calls
        assert h.controller.state.sub is Sub.IDLE and h.controller.state.why_not == "waiting for better-ranked hosts"
        await wait_state(h, State.OWNER, limit=5.5)
        assert etcd.calls.count(("campaign", "h1")) == 1 and etcd.keys["api"].node == "h1"
        n.cancel_scope.cancel()


async def test_a_key_handed_back_at_a_stop_is_taken_over_before_the_revoke_deletes_it(autojump_clock):
    """A daemon stop marks its keys released and leaves them for the lease's revoke, seconds later
    at scale. The other host takes the marked key over at once (never two holders: `never_two`),
    with an epoch above the mark's revision."""
    etcd = FakeEtcd()
    hosts = [make_host(etcd, "h1", 1), make_host(etcd, "h2", 2)]
    async with trio.open_nursery() as n:
        await start(n, etcd, hosts)
        await trio.sleep(2)
        o = owner_of(hosts)
        other = hosts[1] if o is hosts[0] else hosts[0]
        o.controller.post(ShutdownRequested(revoke=True))
        await o.controller.stopped.wait()
        marked = etcd.keys["api"]
        assert marked.node == o.node and marked.released  # left for the revoke, which never comes here
        await wait_state(other, State.OWNER, limit=1.0)
        key = etcd.keys["api"]
        assert key.node == other.node and key.epoch == marked.revision + 1 and not key.released
        assert etcd.calls[-2:] == [("release", o.node), ("take_over", other.node)]
        n.cancel_scope.cancel()

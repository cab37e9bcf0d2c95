"""HostRefresh (vipd/refresh.py) with real controllers and in-memory kernel and etcd fakes, on trio's
MockClock: lazy keepalives at the shipped timing (TTL 10 s, a keepalive a second, fence margin
1.5 s: an owner is stepped, its token armed and its lifetime refreshed only when it could end
soon), the catch-up when keepalives stop, and no catch-up past the lease."""

from __future__ import annotations

import collections
from typing import Awaitable, Callable, Sequence

import trio

from tests.unit.controller_fakes import FakeAnnouncer, FakeEtcd, FakeKernel, FakeKeys, FakeLease, FakeMetrics, vip
from vipd.errors import AddressError, DataplaneError
from vipd.fence import LifetimeFence
from vipd.model import LeaseGone, LeaseValid, OwnerObserved, OwnerRecord, State, Unit, VipSpec
from vipd.ownership.controller import Controller
from vipd.ownership.state import Params
from vipd.refresh import BatchedFence, HostRefresh, Inflight, lazy_timing

TTL, INTERVAL, MARGIN = 10.0, 1.0, 1.5
N = 6


class Refresher:
    """The address port's refresh calls, counted per VIP, on the fake kernel."""

    def __init__(self, kernel: FakeKernel) -> None:
        self.kernel = kernel
        self.count: collections.Counter[str] = collections.Counter()

    async def refresh(self, v: VipSpec, lifetime: int) -> None:
        self.count[v.name] += 1
        await self.kernel.refresh(v, lifetime)

    async def refresh_many(self, items: Sequence[tuple[VipSpec, int]],
                           at: float | None = None) -> dict[str, AddressError]:
        for v, life in items:
            await self.refresh(v, life)
        return {}


class Token:
    """A kernel token fence: every unit's deadline, arms counted per unit; `fail` makes arms fail."""

    def __init__(self) -> None:
        self.until: dict[str, float] = {}
        self.arms: collections.Counter[str] = collections.Counter()
        self.fail = False

    def covers(self, vips: Sequence[VipSpec]) -> bool:
        return True

    async def arm(self, vips: Sequence[VipSpec], until: float) -> None:
        await self.arm_many([(vips, until)])

    async def arm_many(self, items: Sequence[tuple[Sequence[VipSpec], float]]) -> None:
        if self.fail:
            raise DataplaneError("token table gone")
        for vips, until in items:
            self.arms[vips[0].name] += 1
            self.until[vips[0].name] = until

    async def disarm(self, vips: Sequence[VipSpec]) -> None:
        self.until.pop(vips[0].name, None)

    def armed_until(self, vips: Sequence[VipSpec]) -> float | None:
        return self.until.get(vips[0].name)


class Host:
    def __init__(self, lazy: bool, catch_up: bool = True) -> None:
        self.etcd, self.kernel, self.lease = FakeEtcd(), FakeKernel(), FakeLease(1, TTL)
        self.refresher = Refresher(self.kernel)
        self.lifetime = LifetimeFence(self.refresher)
        self.metrics = FakeMetrics()
        self.controllers = {}
        inflight = Inflight()
        self.token = Token()
        token = BatchedFence(self.token, inflight)  # type: ignore[arg-type]
        for i in range(N):
            v = vip(f"v{i}", f"10.0.0.{10 + i}/32")
            c = Controller(Unit(v.unit, (v,)), Params("h1", fence_margin=MARGIN, release_holdoff=1.0), self.kernel,
                           FakeAnnouncer(), FakeKeys(self.etcd, "h1"), self.metrics, self.lifetime,
                           lease=self.lease, fences=[token])  # type: ignore[arg-type]
            self.controllers[c.name] = c
        hold, after = lazy_timing(INTERVAL) if lazy else (0.0, float("inf"))
        self.refresh = HostRefresh(self.controllers, self.lifetime, [token], self.refresher, self.metrics,  # type: ignore[arg-type]
                                   inflight, hold=hold, catch_up_after=after if catch_up else float("inf"))
        self.alive = True
        self.last_keepalive = 0.0
        self.expired: list[tuple[float, str]] = []  # an owner whose address was not in the kernel

    async def start(self, nursery: trio.Nursery) -> None:
        await nursery.start(self.refresh.run)
        for c in self.controllers.values():
            await nursery.start(c.run)
        nursery.start_soon(self._keepalives)
        for c in self.controllers.values():
            c.post(OwnerObserved(OwnerRecord(None, revision=self.etcd.revision)))
        nursery.start_soon(self._watch)
        with trio.fail_after(10):
            while not all(c.state.state is State.OWNER for c in self.controllers.values()):
                await trio.sleep(0.01)

    async def _keepalives(self) -> None:
        while True:
            if self.alive:
                self.last_keepalive = trio.current_time()
                self.refresh.publish(LeaseValid(1, self.last_keepalive + TTL))
            await trio.sleep(INTERVAL)

    async def _watch(self) -> None:
        while True:
            for name, c in self.controllers.items():
                if c.state.state is State.OWNER and not self.kernel.holds(name):
                    self.expired.append((trio.current_time(), name))
            await trio.sleep(0.01)


async def lazy_and_eager(watch: Callable[[Host], Awaitable[collections.Counter[str]]]) -> dict[bool, collections.Counter[str]]:
    """Run `watch` on a started host with lazy keepalives, then on one with eager ones (hold 0):
    what it counted, per mode."""
    counts = {}
    for lazy in (True, False):
        h = Host(lazy)
        async with trio.open_nursery() as n:
            await h.start(n)
            counts[lazy] = await watch(h)
            n.cancel_scope.cancel()
    return counts


async def test_a_keepalive_refreshes_a_lifetime_only_when_it_could_end_soon(autojump_clock):
    """8 s lifetimes, a keepalive a second: each address is refreshed every ~5th keepalive and never
    expires; the eager refresh (hold 0) touches every address on every keepalive."""
    async def watch(h: Host) -> collections.Counter[str]:
        h.refresher.count.clear()
        await trio.sleep(30)
        assert h.expired == []
        assert all(c.state.state is State.OWNER for c in h.controllers.values())
        return h.refresher.count

    counts = await lazy_and_eager(watch)
    assert all(4 <= counts[True][f"v{i}"] <= 8 for i in range(N)), counts[True]
    assert all(counts[False][f"v{i}"] >= 29 for i in range(N)), counts[False]


async def test_a_keepalive_steps_an_owner_and_arms_its_token_only_when_it_could_end_soon(autojump_clock):
    """The unit's own fence deadline and its token are moved by the same lazy step as its lifetime:
    every ~5th keepalive, and each stays ahead of the kernel lifetime, so none ends first."""
    async def watch(h: Host) -> collections.Counter[str]:
        h.token.arms.clear()
        for _ in range(300):
            await trio.sleep(0.1)
            now = trio.current_time()
            for name, c in h.controllers.items():
                assert c.state.state is State.OWNER
                assert c.state.valid_until - MARGIN >= h.kernel.held[name] > now
                assert h.token.until[name] >= h.kernel.held[name]
        return h.token.arms

    counts = await lazy_and_eager(watch)
    assert all(4 <= counts[True][f"v{i}"] <= 8 for i in range(N)), counts[True]
    assert all(counts[False][f"v{i}"] >= 29 for i in range(N)), counts[False]


async def test_a_unit_whose_token_failed_to_arm_is_stepped_by_every_keepalive(autojump_clock):
    """A token arm fails (the token keeps its old, earlier deadline): no keepalive passes the unit
    by until an arm succeeds, so its token never runs out while its lifetime still runs."""
    h = Host(lazy=True)
    async with trio.open_nursery() as n:
        await h.start(n)
        await trio.sleep(INTERVAL * 3)
        h.token.fail = True
        await trio.sleep(INTERVAL * 5)  # every unit is stepped at least once: each fails
        assert h.refresh._unarmed == set(h.controllers)
        h.token.fail = False
        h.token.arms.clear()
        await trio.sleep(INTERVAL * 1.1)  # the next keepalive arms every unit at once
        assert all(h.token.arms[name] == 1 for name in h.controllers), h.token.arms
        assert h.refresh._unarmed == set()
        for _ in range(100):
            await trio.sleep(0.1)
            assert all(h.token.until[name] > trio.current_time() for name in h.controllers)
        n.cancel_scope.cancel()


async def test_keepalives_that_stop_are_caught_up_so_addresses_live_until_the_fence_deadline(autojump_clock):
    """etcd stalls right after a keepalive that skipped every address (under 4.5 s of lifetime
    left): 1.5 keepalive intervals later each is refreshed to the fence deadline, so addresses
    serve through a 6.5 s stall (without the catch-up they expire earlier), and none outlives the
    deadline."""
    for catch_up in (True, False):
        h = Host(lazy=True, catch_up=catch_up)
        async with trio.open_nursery() as n:
            await h.start(n)
            with trio.fail_after(30):
                while True:  # until a keepalive that skipped addresses with under 4.5 s left
                    await trio.sleep(INTERVAL)
                    if h.refresh._parked and min(h.kernel.held.values()) - trio.current_time() < 4.5:
                        break
            h.alive = False
            stall = h.last_keepalive
            deadline = stall + TTL - MARGIN
            await trio.sleep(6.5)
            held = [name for name in h.controllers if h.kernel.holds(name)]
            if catch_up:
                assert h.refresh.catch_ups == 1
                assert sorted(held) == sorted(h.controllers), (trio.current_time() - stall, h.kernel.held)
                assert h.expired == []
                assert max(h.kernel.held.values()) <= deadline
            else:
                assert held == [] and h.expired
            await trio.sleep(deadline - trio.current_time() + 0.1)
            assert not any(h.kernel.holds(name) for name in h.controllers)
            assert all(c.state.state is not State.OWNER for c in h.controllers.values())
            n.cancel_scope.cancel()


async def test_no_catch_up_after_the_lease_is_gone(autojump_clock):
    """A LeaseGone after the last keepalive: that keepalive is never taken again (it would re-arm
    units that fenced)."""
    h = Host(lazy=True)
    async with trio.open_nursery() as n:
        await h.start(n)
        await trio.sleep(2.2)
        h.alive = False
        h.refresh.publish(LeaseGone(1))
        await trio.sleep(0.2)
        refreshed = dict(h.refresher.count)
        await trio.sleep(5)
        assert h.refresh.catch_ups == 0 and dict(h.refresher.count) == refreshed
        assert all(c.state.state is not State.OWNER for c in h.controllers.values())
        n.cancel_scope.cancel()


async def test_a_keepalive_with_an_earlier_deadline_is_never_skipped(autojump_clock):
    """etcd answers a keepalive with less TTL than before: every lifetime is cut to the new fence
    deadline at once, even those that would have been skipped."""
    h = Host(lazy=True)
    async with trio.open_nursery() as n:
        await h.start(n)
        await trio.sleep(2.5)  # right after a keepalive that skipped every address
        assert h.refresh._parked
        h.alive = False
        now = trio.current_time()
        h.refresh.publish(LeaseValid(1, now + 4.0))  # fence deadline now + 2.5
        await trio.sleep(0.01)
        assert max(h.kernel.held.values()) <= now + 4.0 - MARGIN
        n.cancel_scope.cancel()


async def test_a_keepalive_steps_a_host_of_units_a_slice_per_batch_and_stops_at_a_lease_event(
        autojump_clock, monkeypatch):
    """More units than a slice: the first slice is stepped at once, the rest a slice per trio batch;
    a lease event in between ends the pass (no unit is stepped with that keepalive after it)."""
    import vipd.refresh as refresh
    monkeypatch.setattr(refresh, "SLICE", 2)
    h = Host(lazy=False, catch_up=False)
    async with trio.open_nursery() as n:
        await h.start(n)
        h.alive = False  # keepalives from here on are the test's
        await trio.sleep(0.5)
        names = list(h.controllers)
        now = trio.current_time()
        h.refresh.publish(LeaseValid(1, now + TTL + 1))
        stepped = lambda: [c.state.valid_until == now + TTL + 1 for c in h.controllers.values()]  # noqa: E731
        assert stepped() == [True, True] + [False] * (N - 2)  # the first slice, at once
        await trio.sleep(0.1)
        assert all(stepped()), stepped()

        later = trio.current_time()
        h.refresh.publish(LeaseValid(1, later + TTL + 2))
        h.refresh.publish(LeaseGone(1))  # the pass ends here: only the first slice had the keepalive
        await trio.sleep(0.1)
        assert [c.state.valid_until == later + TTL + 2 for c in h.controllers.values()][2:] == [False] * (N - 2)
        assert names == list(h.controllers)
        n.cancel_scope.cancel()


async def test_a_parked_owner_is_passed_by_without_the_full_check_until_its_lifetime_changes(
        autojump_clock, monkeypatch):
    """Once a keepalive found an owner it may pass by, the next ones pass it by on a few comparisons
    (no `_may_skip`); a lifetime deadline that moved under it (an address re-added with a shorter
    lifetime) or a new state makes the next keepalive check it in full and refresh it."""
    h = Host(lazy=True)
    async with trio.open_nursery() as n:
        await h.start(n)
        await trio.sleep(2.5)  # a keepalive passed every owner by: all parked
        assert sorted(h.refresh._parked) == sorted(h.controllers)
        full: list[str] = []
        may_skip = h.refresh._may_skip
        monkeypatch.setattr(h.refresh, "_may_skip", lambda c, ev, now: full.append(c.name) or may_skip(c, ev, now))
        await trio.sleep(1.0)
        assert full == []  # passed by on the parked entry
        c = h.controllers["v0"]
        before = h.refresher.count["v0"]
        h.lifetime.claimed(c.vips, trio.current_time() + 1.0)  # its lifetime now ends in a second
        await trio.sleep(1.0)
        assert full == ["v0"] and h.refresher.count["v0"] == before + 1
        assert h.expired == []
        n.cancel_scope.cancel()


async def test_lifetimes_are_refreshed_while_the_token_batch_still_waits(autojump_clock):
    """A keepalive's token arms stuck behind other fence batches (a handover wave) do not hold its
    lifetime refreshes back: the addresses are refreshed while the token batch waits, and the
    batch ends (disarms may go on) only once the tokens are armed too."""
    h = Host(lazy=False, catch_up=False)
    async with trio.open_nursery() as n:
        await h.start(n)
        h.alive = False  # keepalives from here on are the test's
        await trio.sleep(0.5)
        release = trio.Event()
        arm_many = h.token.arm_many

        async def stuck(items):  # type: ignore[no-untyped-def]
            await release.wait()
            await arm_many(items)

        h.token.arm_many = stuck  # type: ignore[method-assign]
        before = dict(h.refresher.count)
        now = trio.current_time()
        h.refresh.publish(LeaseValid(1, now + TTL))
        await trio.sleep(2.0)
        assert all(h.refresher.count[name] == before.get(name, 0) + 1 for name in h.controllers)
        assert all(h.token.until[name] < now + TTL - MARGIN for name in h.controllers)  # not yet armed
        release.set()
        await trio.sleep(0.01)
        assert all(h.token.until[name] == now + TTL - MARGIN for name in h.controllers)
        n.cancel_scope.cancel()


async def test_a_failed_lifetime_refresh_releases_that_unit_only_and_the_tokens_still_arm(autojump_clock):
    """The lifetime refresh (side by side with the token batch) fails for one address, then the
    whole netlink call fails: each failed unit gets AddressFailed (released: address removed,
    key handed back, counted as a "claim" error) while the others keep their refreshed lifetime,
    and the token batch of that keepalive is armed all the same."""
    h = Host(lazy=False, catch_up=False)
    async with trio.open_nursery() as n:
        await h.start(n)
        h.alive = False  # keepalives from here on are the test's
        await trio.sleep(0.5)
        refresh_many = h.refresher.refresh_many
        fail: dict[str, object] = {"only": "v1"}

        async def failing(items, at=None):  # type: ignore[no-untyped-def]
            if fail.get("all"):
                raise DataplaneError("netlink socket gone")
            await refresh_many([(v, life) for v, life in items if v.name != fail["only"]], at)
            return {str(fail["only"]): AddressError("refused")} if any(v.name == fail["only"] for v, _ in items) else {}

        h.refresher.refresh_many = failing  # type: ignore[method-assign]
        now = trio.current_time()
        h.refresh.publish(LeaseValid(1, now + TTL))
        await trio.sleep(0.5)
        assert h.controllers["v1"].state.state is not State.OWNER and not h.kernel.holds("v1")
        assert h.metrics.errors == ["claim"]  # (the fake counts the op)
        others = [name for name in h.controllers if name != "v1"]
        assert all(h.controllers[name].state.state is State.OWNER for name in others)
        assert all(h.lifetime.armed_until(h.controllers[name].vips) == now + TTL - MARGIN for name in others)
        assert all(h.token.until[name] == now + TTL - MARGIN for name in others)

        fail["all"] = True
        later = trio.current_time()
        h.refresh.publish(LeaseValid(1, later + TTL))
        await trio.sleep(0.5)
        assert all(h.controllers[name].state.state is not State.OWNER for name in others)
        assert all(not h.kernel.holds(name) for name in others)
        n.cancel_scope.cancel()

"""The index of parked owners (vipd/parked.py): a lazy keepalive looks only at the owners that come
due or changed, and each of those is checked exactly as before (MockClock, the fakes of
test_refresh.py at the shipped timing)."""

from __future__ import annotations

import trio

from tests.unit.test_refresh import MARGIN, TTL, Host
from vipd.fence import lifetime_ends_after
from vipd.model import LeaseValid, Placement, State


async def test_a_keepalive_looks_only_at_the_parked_owners_that_come_due(autojump_clock, monkeypatch):
    h = Host(lazy=True)
    async with trio.open_nursery() as n:
        await h.start(n)
        await trio.sleep(2.5)  # a keepalive passed every owner by: all parked
        assert sorted(h.refresh._parked) == sorted(h.controllers)
        looked: list[tuple[float, list[str]]] = []
        take_slice = h.refresh._take_slice
        hold = h.refresh._hold

        def record(ev, controllers, *, lazy):  # type: ignore[no-untyped-def]
            controllers = list(controllers)
            now = trio.current_time()
            for c in controllers:  # every one it looks at was due (or not parked at all)
                p = h.refresh._parked.get(c.name)
                assert p is None or p.ends - now < hold, (c.name, p, now)
            looked.append((now, [c.name for c in controllers]))
            take_slice(ev, controllers, lazy=lazy)

        monkeypatch.setattr(h.refresh, "_take_slice", record)
        await trio.sleep(12)
        assert len(looked) >= 11
        assert any(names == [] for _, names in looked)  # a keepalive that looked at none
        for name in h.controllers:  # each came due, and was taken, at least once
            assert any(name in names for _, names in looked), (name, looked)
        assert h.expired == []
        assert all(c.state.state is State.OWNER for c in h.controllers.values())
        n.cancel_scope.cancel()


async def test_a_parked_owner_that_steps_is_checked_in_full_by_the_next_keepalive(autojump_clock, monkeypatch):
    """A step of its own (here a placement, stepped in place: no task wake-up) replaces the unit's
    state: the next keepalive checks it in full (`_may_skip`), even though it is not due."""
    h = Host(lazy=True)
    async with trio.open_nursery() as n:
        await h.start(n)
        await trio.sleep(2.5)
        assert sorted(h.refresh._parked) == sorted(h.controllers)
        full: list[str] = []
        may_skip = h.refresh._may_skip
        monkeypatch.setattr(h.refresh, "_may_skip", lambda c, ev, now: full.append(c.name) or may_skip(c, ev, now))
        c = h.controllers["v1"]
        before = c.state
        c.offer(Placement(("h1", "h2")))
        assert c.state is not before and c.state.state is State.OWNER
        await trio.sleep(1.0)
        assert full == ["v1"]
        n.cancel_scope.cancel()


async def test_an_earlier_deadline_or_another_lease_looks_at_every_parked_owner(autojump_clock):
    """A keepalive that would move a parked deadline earlier is taken by every unit at once, not
    only by those due (the index cannot tell which it would move)."""
    h = Host(lazy=True)
    async with trio.open_nursery() as n:
        await h.start(n)
        await trio.sleep(2.5)
        parked = h.refresh._parked
        assert len(parked) == len(h.controllers)
        h.alive = False
        now = trio.current_time()
        assert not parked.ends_ok(1, now + 4.0) and not parked.ends_ok(2, now + TTL)
        assert parked.ends_ok(1, now + TTL)
        h.refresh.publish(LeaseValid(1, now + 4.0))
        await trio.sleep(0.01)
        assert max(h.kernel.held.values()) <= now + 4.0 - MARGIN
        assert all(lifetime_ends_after(v) <= now + 4.0 for v in h.kernel.held.values())
        n.cancel_scope.cancel()


async def test_a_refreshed_lifetime_is_passed_by_until_it_comes_due_and_never_past_the_kernels(autojump_clock):
    """A lifetime refreshed by a keepalive's batch is recorded as ending when the kernel ends it
    (less its earliness), never later: so keepalives pass it by for 5 of every 6 seconds (8 s
    lifetimes, hold 2.5 s) rather than 4 of 5 by the bound for any lifetime of that deadline."""
    h = Host(lazy=True)
    async with trio.open_nursery() as n:
        await h.start(n)
        await trio.sleep(10)
        h.refresher.count.clear()
        for _ in range(600):  # 60 s
            await trio.sleep(0.1)
            for name, c in h.controllers.items():
                ends = h.lifetime.ends_after(c.vips)
                assert ends is not None and ends <= h.kernel.held[name], (name, ends, h.kernel.held[name])
        assert h.expired == []
        assert all(9 <= h.refresher.count[name] <= 11 for name in h.controllers), h.refresher.count
        n.cancel_scope.cancel()


async def test_a_refresh_done_late_records_only_the_bound_for_its_deadline(autojump_clock, monkeypatch):
    """A refresh batch whose netlink job ran past HELD_UP may have been shortened (address.py
    `_aged`): the lifetimes it set are recorded by the bound for any lifetime of the deadline."""
    import vipd.refresh as refresh
    from vipd.fence import lifetime_ends_after

    class Slow:  # every read of the clock is a second later than the one before
        t = 0.0

        @classmethod
        def perf_counter(cls) -> float:
            cls.t += 1.0
            return cls.t

    h = Host(lazy=True)
    async with trio.open_nursery() as n:
        await h.start(n)
        monkeypatch.setattr(refresh, "time", Slow)
        await trio.sleep(12)  # every unit refreshed at least once meanwhile
        for c in h.controllers.values():
            armed = h.lifetime.armed_until(c.vips)
            assert armed is not None and h.lifetime.ends_after(c.vips) == lifetime_ends_after(armed)
        assert h.expired == []
        n.cancel_scope.cancel()


async def test_a_due_owner_is_stepped_without_being_checked_again(autojump_clock, monkeypatch):
    """The full check (`_may_skip`) runs once per refresh, on the keepalive after it (which parks
    the owner), and not again on the keepalive that finds it due."""
    h = Host(lazy=True)
    async with trio.open_nursery() as n:
        await h.start(n)
        await trio.sleep(10.5)
        full: list[str] = []
        may_skip = h.refresh._may_skip
        monkeypatch.setattr(h.refresh, "_may_skip", lambda c, ev, now: full.append(c.name) or may_skip(c, ev, now))
        h.refresher.count.clear()
        await trio.sleep(30)
        for name in h.controllers:
            assert abs(full.count(name) - h.refresher.count[name]) <= 1, (name, full.count(name), h.refresher.count)
        assert h.expired == []
        n.cancel_scope.cancel()

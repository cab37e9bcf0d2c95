"""Host-level fence refresh (issue 13): per keepalive, one batch for every unit this host holds.

Without it every keepalive posts a LeaseValid to every unit's task, and every unit arms each of
its fences with its own netlink call: at 2,000 units the event loop saturates and keepalives go
out late. Here:

- `BatchedFence` wraps a Fence (vipd/fence.py; the protocol is unchanged): concurrent `arm` and
  `disarm` calls of many controllers become one `arm_many` / `disarm_many` call of the wrapped
  fence (vipd.coalesce), when it has them; otherwise they pass through one by one.
- `HostRefresh.lease_valid` takes a keepalive's LeaseValid instead of the broadcast: it steps the
  pure core of every waiting unit in place (Controller.step_if_idle: no task wake-up; a step that
  would change state or do anything but ArmFence goes to the unit's task as before), then arms
  every fence of all those units in one batch per fence and refreshes every address lifetime in
  one netlink job per `CHUNK` addresses. A unit whose lifetime refresh failed gets AddressFailed,
  exactly as if its own task had armed (Controller._arm).
- Ordering: a unit's disarm (the first step of every address removal, Controller._remove) waits
  for the host batch in flight, so a refresh can never re-add or re-arm after a removal.
- Lazy keepalives (`hold` > 0): a keepalive steps an owner (and arms its fences and refreshes its
  address lifetime) only when the kernel could remove its address within `hold` seconds (its
  lifetime ends no earlier than `LifetimeFence.ends_after`: as this batch recorded it, see
  `_lifetimes`, else by the bound for its deadline, `lifetime_ends_after`).
  Every IPv6 RTM_NEWADDR costs the kernel O(addresses + multicast groups of the device) (6.1:
  ipv6_find_idev -> ipv6_mc_up, addrconf_verify_rtnl), so refreshing every address on every
  keepalive is quadratic, and stepping, token arms and refreshes of thousands of units every
  keepalive cost more than the rest of the daemon together; at the shipped timing (a keepalive a
  second, 8 s lifetimes) a unit is taken every 6th keepalive instead. If no keepalive arrives
  within `catch_up_after` of the last one (etcd stalls: a leader election), that keepalive is taken
  again for every unit it passed by, at once, so a stall is ridden out as long as before (within
  the whole-second rounding). Safety is unchanged: a unit passed by keeps the deadlines it has
  (its own fence deadline, its tokens, its lifetime: all armed by one step), which only end
  earlier than the keepalive would have made them; a keepalive that would move a deadline earlier,
  or that names another lease, is never passed by. The owners passed by are indexed by when they
  come due (vipd/parked.py): a keepalive looks only at those and at the ones that changed.
"""

from __future__ import annotations

import math
import time
from typing import Iterable, Mapping, Optional, Protocol, Sequence

import trio

from vipd import log
from vipd.coalesce import Coalescer, Outcome
from vipd.errors import AddressError, DataplaneError
from vipd.fence import HELD_UP, KERNEL_EARLY, Fence, LifetimeFence, RefreshPort, whole_seconds_before
from vipd.model import AddressFailed, ArmFence, Event, LeaseValid, State, VipSpec
from vipd.ownership.controller import Controller
from vipd.ownership.state import Sub
from vipd.parked import Parked, ParkedOwners

CHUNK = 1000  # addresses per lifetime refresh job (struct-built: ~1 ms per 100)
SLICE = 1000  # units a keepalive steps per trio batch (see HostRefresh._take)
CATCH_UP_ROOM = 1.0  # seconds of lifetime a skipped address still has when a catch-up starts
SLOW = 1.0  # seconds: a host refresh batch (token arms and lifetimes, side by side) that took longer is logged


def lazy_timing(keepalive_interval: float) -> tuple[float, float]:
    """(hold, catch_up_after) for keepalives every `keepalive_interval` seconds: a missing keepalive
    is caught up half an interval after it was due, while skipped addresses have a second left."""
    catch_up_after = 1.5 * keepalive_interval
    return catch_up_after + CATCH_UP_ROOM, catch_up_after


class Inflight:
    """Host batches in flight; `idle()` returns once none is."""

    def __init__(self) -> None:
        self._n = 0
        self._idle = trio.Event()
        self._idle.set()

    def begin(self) -> None:
        self._n += 1
        if self._n == 1:
            self._idle = trio.Event()

    def end(self) -> None:
        self._n -= 1
        if self._n == 0:
            self._idle.set()

    async def idle(self) -> None:
        await self._idle.wait()


class BatchedFence:
    """A Fence whose arms and disarms of many units share one call of the wrapped fence."""

    def __init__(self, inner: Fence, inflight: Inflight) -> None:
        self.inner = inner
        self._inflight = inflight
        self._many = hasattr(inner, "arm_many")
        self._arms: Coalescer[tuple[Sequence[VipSpec], float], None] = Coalescer(self._arm_batch)
        self._disarms: Optional[Coalescer[Sequence[VipSpec], None]] = (
            Coalescer(self._disarm_batch) if hasattr(inner, "disarm_many") else None)

    def covers(self, vips: Sequence[VipSpec]) -> bool:
        return self.inner.covers(vips)

    async def arm(self, vips: Sequence[VipSpec], until: float) -> None:
        if self._many:
            await self._arms.submit((vips, until))
        else:
            await self.inner.arm(vips, until)

    async def arm_many(self, items: Sequence[tuple[Sequence[VipSpec], float]]) -> None:
        if self._many:
            await self.inner.arm_many(items)  # type: ignore[attr-defined]
        else:
            for vips, until in items:
                await self.inner.arm(vips, until)

    async def disarm(self, vips: Sequence[VipSpec]) -> None:
        await self._inflight.idle()
        if self._disarms is not None:
            await self._disarms.submit(vips)
        else:
            await self.inner.disarm(vips)

    def armed_until(self, vips: Sequence[VipSpec]) -> float | None:
        return self.inner.armed_until(vips)

    async def _arm_batch(self, items: list[tuple[Sequence[VipSpec], float]]) -> list[Outcome[None]]:
        await self.inner.arm_many(items)  # type: ignore[attr-defined]
        return [None] * len(items)

    async def _disarm_batch(self, units: list[Sequence[VipSpec]]) -> list[Outcome[None]]:
        await self.inner.disarm_many(units)  # type: ignore[attr-defined]
        return [None] * len(units)


class HostLifetimeFence(LifetimeFence):
    """The address-lifetime fence whose disarm waits for the host refresh in flight."""

    def __init__(self, refresher: RefreshPort, inflight: Inflight) -> None:
        super().__init__(refresher)
        self._inflight = inflight

    async def disarm(self, vips: Sequence[VipSpec]) -> None:
        await self._inflight.idle()
        await super().disarm(vips)


class RefreshManyPort(Protocol):
    async def refresh_many(self, items: Sequence[tuple[VipSpec, int]],
                           at: Optional[float] = None) -> dict[str, AddressError]: ...


class MetricsPort(Protocol):
    def count_dataplane_error(self, vip: str, op: str) -> None: ...


class PacerPort(Protocol):
    def post(self, unit: str, ev: Event) -> None: ...

    def pending(self, unit: str) -> bool: ...


class HostRefresh:
    def __init__(self, controllers: Mapping[str, Controller], lifetime: LifetimeFence,
                 fences: Sequence[BatchedFence], addresses: RefreshManyPort, metrics: MetricsPort,
                 inflight: Inflight, *, hold: float = 0.0, catch_up_after: float = math.inf,
                 pacer: Optional[PacerPort] = None) -> None:
        self._controllers = controllers
        self._pacer = pacer  # host-wide deliveries (vipd/pacing.py): lease events go through it
        self._lifetime = lifetime
        self._fences = fences
        self._addresses = addresses
        self._metrics = metrics
        self._inflight = inflight
        self._hold = hold  # 0: every keepalive refreshes every address
        self._catch_up_after = catch_up_after
        self._nursery: trio.Nursery | None = None
        self._last: LeaseValid | None = None  # the newest keepalive, while no other lease event followed
        self._unarmed: set[str] = set()  # units whose last fence arm failed: never passed by
        # the owners keepalives pass by (lazy: their deadlines are far), each with what `_may_skip`
        # found: the next keepalives look only at those that come due or changed (vipd/parked.py).
        # Every unit the last keepalive passed by is here.
        self._parked = ParkedOwners()
        self._due: set[str] = set()  # the parked owners this keepalive found due (vipd/parked.py)
        lifetime.changed = self._parked.stir_vips
        self._catch_up_at = math.inf
        self._moved = trio.Event()
        self.batches = 0
        self.refreshed = 0  # addresses whose lifetime was refreshed
        self.catch_ups = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                with trio.move_on_at(self._catch_up_at):
                    await self._moved.wait()
                    self._moved = trio.Event()
                    continue
                self._catch_up()

    def publish(self, ev: Event) -> None:
        """The lease's publish: a LeaseValid is taken here, any other event goes to every unit."""
        if not isinstance(ev, LeaseValid) or self._nursery is None:
            self._last, self._catch_up_at = None, math.inf  # (no catch-up past it)
            self._parked.clear()
            for name, c in list(self._controllers.items()):
                if self._pacer is not None:
                    self._pacer.post(name, ev)
                else:
                    c.post(ev)
            return
        self._last = ev
        self._catch_up_at = trio.current_time() + self._catch_up_after if self._hold > 0 else math.inf
        self._moved.set()
        units: Iterable[Controller] = self._controllers.values()
        parked = self._parked
        if self._hold > 0 and parked and parked.ends_ok(ev.lease, ev.valid_until):
            # the parked owners that come due or changed; every other one is passed by as it is
            stirred, self._due = parked.to_check(trio.current_time() + self._hold)
            check = stirred | self._due
            units = [c for name, c in self._controllers.items() if name not in parked or name in check]
        else:
            self._due = set()
        self._take(ev, units, lazy=self._hold > 0)

    def _catch_up(self) -> None:
        """No keepalive came in time: take the last one again for the units it skipped, without
        skipping (the same LeaseValid again is the same ArmFence for an owner)."""
        ev, skipped = self._last, set(self._parked)
        self._catch_up_at = math.inf
        if ev is None or not skipped or trio.current_time() >= ev.valid_until:
            return
        self.catch_ups += 1
        log.info("lifetimes_caught_up", units=len(skipped), reason="keepalive overdue")
        self._take(ev, [c for name, c in self._controllers.items() if name in skipped], lazy=False)

    def _take(self, ev: LeaseValid, controllers: Iterable[Controller], *, lazy: bool) -> None:
        """The keepalive for `controllers`: the first SLICE at once, the rest SLICE per trio batch
        (a pass over 10,000 units held the loop 0.4 s: bench/scale.py --loop-tasks, HostLease.run),
        until a newer keepalive or any other lease event takes over (`_last` moves on): a newer
        keepalive's own pass covers every unit, and after a lease event none may be stepped with
        this one. A unit reached a few batches later keeps the deadlines it has meanwhile, which
        the lazy hold (seconds) covers."""
        units = list(controllers)
        if len(self._parked) > len(self._controllers):  # units a reload removed
            for name in [n for n in self._parked if n not in self._controllers]:
                self._parked.pop(name)
        self._take_slice(ev, units[:SLICE], lazy=lazy)
        if len(units) > SLICE:
            assert self._nursery is not None
            self._nursery.start_soon(self._take_rest, ev, units[SLICE:], lazy)

    async def _take_rest(self, ev: LeaseValid, units: list[Controller], lazy: bool) -> None:
        for i in range(0, len(units), SLICE):
            await trio.sleep(0)  # a batch boundary: I/O and timers first
            if self._last is not ev:
                return
            self._take_slice(ev, units[i:i + SLICE], lazy=lazy)

    def _take_slice(self, ev: LeaseValid, controllers: Iterable[Controller], *, lazy: bool) -> None:
        due: list[tuple[Controller, float]] = []
        now = trio.current_time()
        parked, armed_until, hold, due_now = self._parked, self._lifetime.armed_until, self._hold, self._due
        for c in controllers:
            if lazy and c.name not in due_now:  # (a due one: the checks would find it due again)
                p = parked.get(c.name)
                if (p is not None and p.state is c.state and p.ends - now >= hold
                        and ev.valid_until - c.params.fence_margin >= p.armed and ev.lease == p.state.lease
                        and armed_until(c.vips) == p.armed):
                    continue  # (stays parked)
                if self._may_skip(c, ev, now):
                    continue
            parked.pop(c.name)
            if self._pacer is not None and self._pacer.pending(c.name):
                self._pacer.post(c.name, ev)  # behind the unit's paced events, not ahead of them
                continue
            if c.defer_lease(ev):
                continue
            actions = c.step_if_idle(ev, (ArmFence,))
            if actions:
                due.append((c, min(a.until for a in actions if isinstance(a, ArmFence))))
        if due:
            assert self._nursery is not None
            self._inflight.begin()  # from now on, disarms wait for this batch
            self._nursery.start_soon(self._arm, due)

    def _may_skip(self, c: Controller, ev: LeaseValid, now: float) -> bool:
        """A keepalive may pass an owner by (no step, no fence arm, no lifetime refresh) while its
        address lifetime, the earliest of its fences, still runs `hold` seconds: the step would
        only move every deadline of the unit later, and the unit keeps the ones it has, which end
        no earlier than that lifetime (they were armed by the same step, or, for a token that
        failed to arm, the unit is in `_unarmed` and never skipped). A unit whose lease changed, or
        whose deadline the keepalive would move earlier, is always stepped."""
        s, parked = c.state, self._parked
        if s.state is not State.OWNER or s.sub is Sub.DEFERRED or ev.lease != s.lease or c.name in self._unarmed:
            return False
        last, ends = self._lifetime.armed_until(c.vips), self._lifetime.ends_after(c.vips)
        if last is None or ends is None:
            return False
        if ev.valid_until - c.params.fence_margin >= last and ends - now >= self._hold:
            c.on_state = parked.stir  # (a no-op once the unit is no longer parked)
            parked.park(c.name, c.vips, Parked(s, last, ends), s.lease, c.params.fence_margin)
            return True
        return False

    async def _arm(self, due: list[tuple[Controller, float]]) -> None:
        """Token arms and lifetime refreshes of one keepalive, side by side: the lifetimes do not
        wait for the token batch. Under a wave of handovers a keepalive's token arms waited 1.4-3.6 s
        behind the fence's other batches (successor renames, grants, claims; `refresh_slow`) and
        lifetimes behind them ran out under their owners. Order does not matter for safety: each
        moves its own kernel deadline, and neither beyond the one this keepalive proved."""
        began = trio.current_time()
        took: dict[str, float] = {}

        async def lifetimes() -> None:
            await self._lifetimes(due)
            took["lifetimes_s"] = trio.current_time() - began

        try:
            self.batches += 1
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lifetimes)
                await self._arm_fences(due)
                took["fences_s"] = trio.current_time() - began
            done = trio.current_time()
            if done - began > SLOW:  # (where a refresh waited when lifetimes ran out under owners)
                log.warning("refresh_slow", units=len(due), seconds=round(done - began, 3),
                            **{k: round(v, 3) for k, v in sorted(took.items())})
        finally:
            self._inflight.end()

    async def _arm_fences(self, due: list[tuple[Controller, float]]) -> None:
        for fence in self._fences:  # (in the order Controller._arm arms them)
            items = [(c.vips, until) for c, until in due if fence in c.fences]  # those Controller._arm arms
            if not items:
                continue
            try:
                await fence.arm_many(items)
            except DataplaneError as e:  # each ends at its previous deadline: loud, never unsafe
                for c, _ in due:
                    self._metrics.count_dataplane_error(c.name, "fence")
                    self._unarmed.add(c.name)  # stepped by every keepalive until an arm succeeds
                    self._parked.pop(c.name)
                log.error("fence_arm_failed", units=len(items), fence=type(fence.inner).__name__, error=e)
            else:
                self._unarmed.difference_update(c.name for c, _ in due if fence in c.fences)

    async def _lifetimes(self, due: list[tuple[Controller, float]]) -> None:
        """Each address's lifetime restarted for as long as its unit's deadline allows, in chunks.
        A chunk done within HELD_UP of computing the lifetimes was sent as computed (address.py
        `_aged` shortens only past it), so the kernel keeps its addresses at least `life` from
        then, less its earliness: the unit's lifetime is recorded as ending there (ends_after),
        which lets lazy keepalives pass it by ~0.55 s longer than the bound for any lifetime armed
        for that deadline (lifetime_ends_after). A chunk done later: that bound."""
        items: list[tuple[VipSpec, int]] = []
        armed: list[tuple[Controller, float, float]] = []  # (unit, deadline, its lifetime runs until)
        now, at = trio.current_time(), time.perf_counter()
        for c, until in due:
            life = whole_seconds_before(until, now)
            if life >= 1:  # else the running lifetime ends earlier still: nothing to extend
                items += [(v, life) for v in c.vips]
                armed.append((c, until, now + life - KERNEL_EARLY))
        self.refreshed += len(items)
        failures: dict[str, AddressError] = {}
        late: set[str] = set()  # VIPs of chunks done past HELD_UP
        for i in range(0, len(items), CHUNK):
            chunk = items[i:i + CHUNK]
            try:
                failures.update(await self._addresses.refresh_many(chunk, at))  # (a later chunk waited for this one)
            except DataplaneError as e:
                failures.update({v.name: AddressError(str(e)) for v, _ in chunk})
            if time.perf_counter() - at > HELD_UP:
                late.update(v.name for v, _ in chunk)
        for c, until, ends in armed:
            failed = [failures[v.name] for v in c.vips if v.name in failures]
            if failed:
                self._metrics.count_dataplane_error(c.name, "claim")
                log.error("address_refresh_failed", vip=c.name, address=c.addresses, error=failed[0])
                c.post(AddressFailed(str(failed[0])))
            else:
                self._lifetime.claimed(c.vips, until, None if any(v.name in late for v in c.vips) else ends)

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
"""

from __future__ import annotations

from typing import Mapping, Optional, Protocol, Sequence

import trio

from vipd import log
from vipd.coalesce import Coalescer, Outcome
from vipd.errors import AddressError, DataplaneError
from vipd.fence import Fence, LifetimeFence, RefreshPort, whole_seconds_before
from vipd.model import AddressFailed, ArmFence, Event, LeaseValid, VipSpec
from vipd.ownership.controller import Controller

CHUNK = 1000  # addresses per lifetime refresh job (struct-built: ~1 ms per 100)


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
    async def refresh_many(self, items: Sequence[tuple[VipSpec, int]]) -> dict[str, AddressError]: ...


class MetricsPort(Protocol):
    def count_dataplane_error(self, vip: str, op: str) -> None: ...


class HostRefresh:
    def __init__(self, controllers: Mapping[str, Controller], lifetime: LifetimeFence,
                 fences: Sequence[BatchedFence], addresses: RefreshManyPort, metrics: MetricsPort,
                 inflight: Inflight) -> None:
        self._controllers = controllers
        self._lifetime = lifetime
        self._fences = fences
        self._addresses = addresses
        self._metrics = metrics
        self._inflight = inflight
        self._nursery: trio.Nursery | None = None
        self.batches = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def publish(self, ev: Event) -> None:
        """The lease's publish: a LeaseValid is taken here, any other event goes to every unit."""
        if not isinstance(ev, LeaseValid) or self._nursery is None:
            for c in self._controllers.values():
                c.post(ev)
            return
        due: list[tuple[Controller, float]] = []
        for c in self._controllers.values():
            if c.defer_lease(ev):
                continue
            actions = c.step_if_idle(ev, (ArmFence,))
            if actions:
                due.append((c, min(a.until for a in actions if isinstance(a, ArmFence))))
        if due:
            self._inflight.begin()  # from now on, disarms wait for this batch
            self._nursery.start_soon(self._arm, due)

    async def _arm(self, due: list[tuple[Controller, float]]) -> None:
        try:
            self.batches += 1
            for fence in self._fences:  # kernel tokens first, as Controller._arm does
                items = [(c.vips, until) for c, until in due if fence in c.fences]  # those Controller._arm arms
                if not items:
                    continue
                try:
                    await fence.arm_many(items)
                except DataplaneError as e:  # each ends at its previous deadline: loud, never unsafe
                    for c, _ in due:
                        self._metrics.count_dataplane_error(c.name, "fence")
                    log.error("fence_arm_failed", units=len(items), fence=type(fence.inner).__name__, error=e)
            await self._lifetimes(due)
        finally:
            self._inflight.end()

    async def _lifetimes(self, due: list[tuple[Controller, float]]) -> None:
        items: list[tuple[VipSpec, int]] = []
        armed: list[tuple[Controller, float]] = []
        now = trio.current_time()
        for c, until in due:
            life = whole_seconds_before(until, now)
            if life >= 1:  # else the running lifetime ends earlier still: nothing to extend
                items += [(v, life) for v in c.vips]
                armed.append((c, until))
        failures: dict[str, AddressError] = {}
        for i in range(0, len(items), CHUNK):
            chunk = items[i:i + CHUNK]
            try:
                failures.update(await self._addresses.refresh_many(chunk))
            except DataplaneError as e:
                failures.update({v.name: AddressError(str(e)) for v, _ in chunk})
        for c, until in armed:
            failed = [failures[v.name] for v in c.vips if v.name in failures]
            if failed:
                self._metrics.count_dataplane_error(c.name, "claim")
                log.error("address_refresh_failed", vip=c.name, address=c.addresses, error=failed[0])
                c.post(AddressFailed(str(failed[0])))
            else:
                self._lifetime.claimed(c.vips, until)

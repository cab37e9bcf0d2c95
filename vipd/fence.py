"""The fence seam: kernel-enforced proof that this host may still serve a unit.

A fence is armed until a deadline on trio's clock and the *kernel* enforces it: when vipd stops
proving ownership (crash, hang, partition) the VIP stops being served at that deadline without any
vipd code running. Implementations:
- `LifetimeFence` (here): the addresses' kernel lifetime, whole seconds, the coarse backstop that
  removes the address itself (ends no later than the deadline; the kernel may remove it up to
  ~1.25 s late, which `timing.fence_margin` covers);
- the egress SNAT sets (vipd/routing.py), and further kernel tokens with millisecond deadlines.

The ownership core emits ClaimAddress/ArmFence(until)/RemoveAddress; the controller arms every
fence that covers the unit. Safety: each fence ends by `until` = the lease's fence deadline (or an
earlier one), so a host stops serving before any other host can be granted the unit.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol, Sequence

import trio

from vipd.model import VipSpec

LIFETIME_SLACK = 0.05  # seconds: the lifetime is computed from the deadline minus this, at the call
# (a hold-up past 0.5 s between that and the kernel is taken off in the netlink thread: address.py `_aged`)
HELD_UP = 0.5  # seconds between computing a lifetime and sending it past which it is shortened (address.py _aged)
KERNEL_EARLY = 0.05  # seconds: the kernel may remove an address this much before its lifetime (timer fuzz, jiffies)


class Fence(Protocol):
    def covers(self, vips: Sequence[VipSpec]) -> bool:
        """Does this mechanism apply to (any of) these VIPs?"""

    async def arm(self, vips: Sequence[VipSpec], until: float) -> None:
        """Serve these VIPs until `until` (trio clock) and no later, enforced by the kernel.
        Raises DataplaneError; a fence that failed to arm simply ends at its previous deadline."""

    async def disarm(self, vips: Sequence[VipSpec]) -> None:
        """Stop serving now. Raises DataplaneError (the deadline still ends it)."""

    def armed_until(self, vips: Sequence[VipSpec]) -> float | None:
        """The deadline last armed for these VIPs; None when disarmed."""


class RefreshPort(Protocol):
    async def refresh(self, vip: VipSpec, lifetime: int) -> None: ...


def whole_seconds_before(until: float, now: float) -> int:
    """The longest whole-second lifetime that, started now, ends before `until`."""
    return max(0, math.floor(until - now - LIFETIME_SLACK))


def lifetime_ends_after(until: float) -> float:
    """A lifetime of whole_seconds_before(until, t), given at any t, runs at least until this instant:
    t + floor(until - t - LIFETIME_SLACK) > until - 1 - LIFETIME_SLACK, less the kernel's own earliness."""
    return until - 1.0 - LIFETIME_SLACK - KERNEL_EARLY


class LifetimeFence:
    """The address lifetime as a fence: arm() restarts the kernel countdown of addresses we hold
    (batched across units by the refresher); disarm() is the address removal itself."""

    def __init__(self, refresher: RefreshPort) -> None:
        self._refresher = refresher
        self._armed: dict[str, float] = {}  # changed by arm, claimed and disarm only
        self._ends: dict[str, float] = {}  # when known (claimed with `ends`): the lifetime runs until then
        self.changed: Callable[[Sequence[VipSpec]], None] | None = None  # told after each (vipd/parked.py)

    def covers(self, vips: Sequence[VipSpec]) -> bool:
        return True

    async def arm(self, vips: Sequence[VipSpec], until: float) -> None:
        life = whole_seconds_before(until, trio.current_time())
        if life < 1:
            return  # the running lifetime ends earlier still: nothing to extend
        try:
            for vip in vips:
                await self._refresher.refresh(vip, life)
                self._armed[vip.name] = until
                self._ends.pop(vip.name, None)
        finally:
            self._changed(vips)

    def claimed(self, vips: Sequence[VipSpec], until: float, ends: float | None = None) -> None:
        """The addresses were (re)added with a lifetime ending by `until`; `ends`, when the caller
        knows it: the kernel keeps them at least until then (ends_after)."""
        for vip in vips:
            self._armed[vip.name] = until
            if ends is None:
                self._ends.pop(vip.name, None)
            else:
                self._ends[vip.name] = ends
        self._changed(vips)

    async def disarm(self, vips: Sequence[VipSpec]) -> None:
        for vip in vips:
            self._armed.pop(vip.name, None)  # the controller removes the addresses themselves
            self._ends.pop(vip.name, None)
        self._changed(vips)

    def _changed(self, vips: Sequence[VipSpec]) -> None:
        if self.changed is not None:
            self.changed(vips)

    def armed_until(self, vips: Sequence[VipSpec]) -> float | None:
        if len(vips) == 1:  # (most units: read for every owner on every keepalive)
            return self._armed.get(vips[0].name)
        times = [self._armed.get(v.name) for v in vips]
        return None if any(t is None for t in times) else min(t for t in times if t is not None)

    def ends_after(self, vips: Sequence[VipSpec]) -> float | None:
        """The addresses' lifetimes run at least until this instant: as the claim said (`ends`),
        else as any lifetime armed for the deadline does (lifetime_ends_after); None: disarmed."""
        armed = self.armed_until(vips)
        if armed is None:
            return None
        ends = [self._ends.get(v.name) for v in vips]
        known = [e for e in ends if e is not None]
        return min(known) if len(known) == len(ends) else lifetime_ends_after(armed)

"""Owners a lazy keepalive passes by (vipd/refresh.py), indexed by when they come due.

A keepalive may pass an owner by while its address lifetime runs `hold` seconds more
(`HostRefresh._may_skip`). Checking that for every parked owner on every keepalive cost a pass
over all of them (thousands) when one in five or so was due. Here a keepalive only looks at:

- the owners whose lifetime comes within `hold` of its end (a heap ordered by that instant);
- the owners *stirred* since they were parked: their state object was replaced (any step of the
  pure core makes a new one: `Controller.on_state`), or their lifetime deadline was set anew
  (`LifetimeFence.changed`: an add, a refresh or a removal);
- every owner, when the keepalive names another lease than the one they were parked under, or
  would move a parked deadline earlier (`ends_ok` is False).
Every other parked owner still meets all of `_may_skip`'s conditions with the values it was
parked with: its state (hence its lease and role) and its lifetime deadline are unchanged, the
lifetime still ends `hold` or more from now, and the keepalive's deadline is no earlier than the
one it holds. So the keepalive passes it by exactly as the full check would. A due owner that was
not stirred is stepped without the full check: its lifetime's end is still the one it was parked
with, which the check would find due again.

Correctness rests on the two hooks reaching every change: Controller assigns its state in one
method (`_set_state`), and LifetimeFence changes its deadlines in arm/claimed/disarm only.
"""

from __future__ import annotations

import heapq
import math
from typing import Iterator, NamedTuple, Sequence

from vipd.model import VipSpec
from vipd.ownership.state import VipState


class Parked(NamedTuple):
    state: VipState  # the unit's state object when parked
    armed: float  # its lifetime's armed deadline then
    ends: float  # LifetimeFence.ends_after then: the lifetime runs at least until here


class ParkedOwners:
    def __init__(self) -> None:
        self.entries: dict[str, Parked] = {}
        self._heap: list[tuple[float, str]] = []
        self._stirred: set[str] = set()
        self._unit_of: dict[str, str] = {}  # VIP name -> unit name, for LifetimeFence.changed
        self._lease = 0  # the lease every entry was parked under
        self._need = -math.inf  # max(armed + fence margin): a keepalive valid before it may move one earlier

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def get(self, name: str) -> Parked | None:
        return self.entries.get(name)

    def park(self, name: str, vips: Sequence[VipSpec], entry: Parked, lease: int, margin: float) -> None:
        if not self.entries:
            self._lease, self._need = lease, -math.inf
        elif lease != self._lease:  # (never: publish() clears at any other lease event)
            self.clear()
            self._lease = lease
        self.entries[name] = entry
        self._stirred.discard(name)
        heapq.heappush(self._heap, (entry.ends, name))
        self._need = max(self._need, entry.armed + margin)
        for v in vips:
            self._unit_of[v.name] = name
        if len(self._heap) > 4 * len(self.entries) + 64:  # entries popped or parked anew
            self._heap = [(p.ends, n) for n, p in self.entries.items()]
            heapq.heapify(self._heap)

    def pop(self, name: str) -> None:
        self.entries.pop(name, None)
        self._stirred.discard(name)

    def clear(self) -> None:
        self.entries.clear()
        self._heap.clear()
        self._stirred.clear()
        self._unit_of.clear()
        self._need = -math.inf

    def stir(self, name: str) -> None:
        """The unit's state changed: the next keepalive checks it in full."""
        if name in self.entries:
            self._stirred.add(name)

    def stir_vips(self, vips: Sequence[VipSpec]) -> None:
        """The lifetime deadline of these VIPs was set anew."""
        for v in vips:
            name = self._unit_of.get(v.name)
            if name is not None and name in self.entries:
                self._stirred.add(name)

    def ends_ok(self, lease: int, valid_until: float) -> bool:
        """A keepalive of `lease`, valid until `valid_until`, would pass every unstirred entry that
        is not due by as the full check would (same lease, no deadline moved earlier)."""
        return lease == self._lease and valid_until >= self._need

    def to_check(self, due_before: float) -> tuple[set[str], set[str]]:
        """The entries a keepalive must look at: (stirred ones, to check in full; those whose
        lifetime ends before `due_before` (now + hold) and that were not stirred: due, so the full
        check would only find that again). Stale heap entries are dropped."""
        heap, entries = self._heap, self.entries
        stirred, self._stirred = self._stirred, set()
        due: set[str] = set()
        while heap and heap[0][0] < due_before:
            ends, name = heapq.heappop(heap)
            p = entries.get(name)
            if p is not None and p.ends == ends and name not in stirred:
                due.add(name)
        return stirred, due

"""How many units a host hands to their preferred hosts at once (preemption, `[placement]
handover_batch`).

A unit whose preferred host has been healthy for `preempt_delay` asks this gate before it hands
over (vipd/ownership/tasks.py `_preempt_token`) and gives its place back once its release is done
(the ReturnPreemptToken action). One at a time, as before, a host that took 2,500 of 3,000 VIPs
while the others started handed them back one etcd round trip after another: placement was not
restored after two minutes (bench/scale.py --cluster-vips 3000, vipd's default placement). In
batches, the handovers share the address removals and the key deletions (vipd/coalesce.py) like a
planned stop's. A bounded batch still means no storm: a returning host gets its VIPs back in
waves, and `preempt_delay` still keeps a flapping host from getting any.

The batch is live: a reload that changes it wakes the waiters a larger batch lets in; a smaller
one lets the handovers in flight finish and admits new ones as they drop below it.
"""

from __future__ import annotations

import trio


class HandoverGate:
    """At most `batch` handovers in flight on this host (implements GatePort)."""

    def __init__(self, batch: int) -> None:
        self._batch = batch
        self._held = 0
        self._lot = trio.lowlevel.ParkingLot()

    @property
    def batch(self) -> int:
        return self._batch

    @batch.setter
    def batch(self, n: int) -> None:
        self._batch = n
        self._admit()

    @property
    def in_flight(self) -> int:
        return self._held

    async def acquire(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        while self._held >= self._batch:
            await self._lot.park()
        self._held += 1

    def release(self) -> None:
        self._held -= 1
        self._admit()

    def _admit(self) -> None:
        room = self._batch - self._held
        if room > 0:
            self._lot.unpark(count=room)

"""Host-wide deliveries to the units, paced: about PER_TURN offered per trio scheduler batch.

A host-level event (a placement, the owner keys' listing, a peer suspected, the lease's news, a
health verdict for many units) reaches thousands of units at once. Offered in one go, each unit is
stepped, or its task woken, inside the same trio batch; at 10,000 units such batches ran 0.5-1.7 s
(bench/scale.py with a per-task batch diagnostic: `Controller.run` x 10,000, the heartbeat
deliveries' `run_sync_soon` task, the host directory), no socket or timer was looked at
meanwhile, heartbeats were withheld past `[peers] stall`, and the peers suspected a live host.

The pacer offers up to PER_TURN deliveries directly. Past that, deliveries wait in one FIFO (each
unit still gets its events in the order they were posted: once anything waits, everything
waits) and the pacer's task offers PER_TURN of them per batch, yielding in between, so the units
they wake run in the next batch, PER_TURN at a time, with I/O polled between batches. Under
PER_TURN per burst nothing changes: no task hop and no added latency (a fast takeover's
suspicion reaches its units at once). `pending(unit)`: a delivery for the unit waits here; a
caller that would step the unit in place (vipd/refresh.py) posts behind it instead.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import trio

from vipd.model import Event

PER_TURN = 256  # deliveries per batch (a unit's step took ~94 us at 10,000 VIPs, loop_tasks
# Controller.run=0.935/10000: ~25 ms per batch)


class Pacer:
    def __init__(self, offer: Callable[[str, Event], None], per_turn: int = PER_TURN) -> None:
        self._offer = offer
        self._per_turn = per_turn
        self._direct = 0  # offered directly since the pump's last turn began
        self._backlog: deque[tuple[str, Event]] = deque()
        self._pending: dict[str, int] = {}  # unit -> deliveries of it in the backlog
        self._wake = trio.Event()
        self.deferred = 0  # deliveries that waited in the backlog, since start
        self.turns = 0  # batches in which the pump offered from the backlog

    def post(self, unit: str, ev: Event) -> None:
        if self._backlog or self._direct >= self._per_turn:
            self._backlog.append((unit, ev))
            self._pending[unit] = self._pending.get(unit, 0) + 1
            self.deferred += 1
            self._wake.set()
            return
        if self._direct == 0:
            self._wake.set()  # the pump's next turn (a later batch) starts a new count
        self._direct += 1
        self._offer(unit, ev)

    def pending(self, unit: str) -> bool:
        return unit in self._pending

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            self._direct = 0
            while self._backlog:
                self.turns += 1
                for _ in range(min(self._per_turn, len(self._backlog))):
                    unit, ev = self._backlog.popleft()
                    left = self._pending[unit] - 1
                    if left:
                        self._pending[unit] = left
                    else:
                        del self._pending[unit]
                    self._offer(unit, ev)
                await trio.sleep(0)  # the units just woken run in the next batch; I/O is polled first
                self._direct = 0

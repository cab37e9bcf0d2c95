"""Group commit for trio: many concurrent per-item calls become a few batch calls.

A :class:`Coalescer` turns ``await c.submit(item)`` from many tasks into calls of one batch
function with every item that arrived meanwhile. The first caller of a scheduler pass leads: it
yields once (so every task woken by the same event enqueues first), then takes all pending items,
cuts them into chunks of at most ``max_batch`` and runs each chunk, at most ``parallel`` chunks at
a time across all leaders. Items arriving while chunks are in flight form the next batch: its
leader takes them once a slot is free, so every wave that arrived meanwhile shares it. The other
callers wait for their own result, woken WAKE_SLICE per scheduler batch.

With ``rank``, a batch is taken lowest rank first (stable) and its chunks start in that order: the
items whose result is awaited longest afterwards can go first (trio wakes the tasks of one event
in either order, so submission order alone decides nothing).

The batch function returns one outcome per item, in order: a value, or an exception instance
that is raised in that item's caller. An exception raised by the batch function itself is raised
in every caller of the chunk.

Cancellation: a batch, once taken, always runs to its end (shielded: the other callers wait on
it), so the batch function must bound its own time (etcd request timeouts, netlink jobs). A
cancelled caller stops waiting at once; its item still runs.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Generic, Sequence, TypeVar, Union

import trio

I = TypeVar("I")
R = TypeVar("R")

Outcome = Union[R, BaseException]

# callers of a finished chunk woken per trio batch: a chunk of 500 claims woke its 500 unit tasks
# into one batch (0.25 s at 10,000 VIPs on this machine: bench/scale.py --loop-tasks)
WAKE_SLICE = 128


class _Slot(Generic[I, R]):
    __slots__ = ("item", "done", "result", "error")

    def __init__(self, item: I) -> None:
        self.item = item
        self.done = trio.Event()
        self.result: R | None = None
        self.error: BaseException | None = None


class Coalescer(Generic[I, R]):
    def __init__(self, run_batch: Callable[[list[I]], Awaitable[Sequence[Outcome[R]]]], *,
                 max_batch: int = 0, parallel: int = 1, rank: Callable[[I], int] | None = None) -> None:
        if parallel < 1 or max_batch < 0:
            raise ValueError("parallel must be >= 1 and max_batch >= 0")
        self._run_batch = run_batch
        self.rank = rank
        self._max_batch = max_batch
        self._limit = trio.Semaphore(parallel)
        self._pending: list[_Slot[I, R]] = []
        self._leading = False
        self.batches = 0  # batch calls made (for tests and benchmarks)

    async def submit(self, item: I) -> R:
        slot: _Slot[I, R] = _Slot(item)
        self._pending.append(slot)
        if not self._leading:
            self._leading = True
            try:
                await trio.sleep(0)  # every task woken by the same event enqueues first
            finally:  # even when cancelled: the others wait on this batch, so always run it
                with trio.CancelScope(shield=True):
                    # wait for a free slot first: every wave that arrives meanwhile joins this
                    # batch (not one batch per wave, each waiting for the one before)
                    await self._limit.acquire()
                    self._limit.release()
                    batch, self._pending, self._leading = self._pending, [], False
                    if self.rank is not None:
                        rank = self.rank
                        batch.sort(key=lambda slot: rank(slot.item))
                    await self._run(batch)
        await slot.done.wait()
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]

    async def _run(self, batch: list[_Slot[I, R]]) -> None:
        size = self._max_batch or len(batch)
        chunks = [batch[i:i + size] for i in range(0, len(batch), size)]
        if len(chunks) == 1:
            await self._chunk(chunks[0])
            return
        async with trio.open_nursery() as nursery:
            for chunk in chunks:  # each starts once it has a slot, in order
                await self._limit.acquire()
                nursery.start_soon(self._chunk, chunk, True)

    async def _chunk(self, chunk: list[_Slot[I, R]], held: bool = False) -> None:
        try:
            if not held:
                await self._limit.acquire()
            try:
                self.batches += 1
                try:
                    outcomes = list(await self._run_batch([s.item for s in chunk]))
                    if len(outcomes) != len(chunk):
                        raise RuntimeError(f"batch returned {len(outcomes)} outcomes for {len(chunk)} items")
                except Exception as e:  # noqa: BLE001 - handed to every caller of the chunk
                    outcomes = [e] * len(chunk)
            finally:
                self._limit.release()
            for slot, out in zip(chunk, outcomes):
                if isinstance(out, BaseException):
                    slot.error = out
                else:
                    slot.result = out
            for i in range(0, len(chunk), WAKE_SLICE):  # (shielded: see submit)
                if i:
                    await trio.sleep(0)  # the callers woken so far run in the next batch, I/O first
                for slot in chunk[i:i + WAKE_SLICE]:
                    slot.done.set()
        finally:
            for slot in chunk:
                slot.done.set()

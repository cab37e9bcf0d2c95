"""vipd.coalesce: many concurrent calls become few batch calls."""

from __future__ import annotations

import trio

from vipd.coalesce import Coalescer


async def test_waves_arriving_while_a_batch_runs_share_the_next_batch(autojump_clock):
    batches: list[list[int]] = []

    async def run(items: list[int]) -> list[int]:
        batches.append(items)
        await trio.sleep(1.0)
        return [i * 2 for i in items]

    c: Coalescer[int, int] = Coalescer(run)
    results: dict[int, int] = {}

    async def submit(i: int) -> None:
        results[i] = await c.submit(i)

    async with trio.open_nursery() as n:
        for i in range(3):  # wave 1: one batch
            n.start_soon(submit, i)
        await trio.sleep(0.2)
        for i in range(3, 5):  # wave 2, while wave 1 runs
            n.start_soon(submit, i)
        await trio.sleep(0.2)
        for i in range(5, 8):  # wave 3, still while wave 1 runs: joins wave 2's batch
            n.start_soon(submit, i)
    assert [sorted(b) for b in batches] == [[0, 1, 2], [3, 4, 5, 6, 7]]
    assert results == {i: 2 * i for i in range(8)}


async def test_an_exception_of_the_batch_reaches_every_caller_of_it(autojump_clock):
    async def run(items: list[int]) -> list[int]:
        raise ValueError("boom")

    c: Coalescer[int, int] = Coalescer(run)
    errors: list[str] = []

    async def submit(i: int) -> None:
        try:
            await c.submit(i)
        except ValueError as e:
            errors.append(str(e))

    async with trio.open_nursery() as n:
        for i in range(4):
            n.start_soon(submit, i)
    assert errors == ["boom"] * 4 and c.batches == 1


async def test_a_ranked_batch_goes_lowest_rank_first_chunk_by_chunk(autojump_clock):
    """Items of one wave arrive in whatever order trio wakes their tasks; with `rank` the low ranks
    form the first chunks and those start first (the slots taken in order)."""
    started: list[list[int]] = []

    async def run(items: list[int]) -> list[int]:
        started.append(items)
        await trio.sleep(1.0)
        return items

    c: Coalescer[int, int] = Coalescer(run, max_batch=2, parallel=1, rank=lambda i: i % 2)
    async with trio.open_nursery() as n:
        for i in (5, 2, 7, 4, 1, 6):
            n.start_soon(c.submit, i)
    assert [[x % 2 for x in chunk] for chunk in started] == [[0, 0], [0, 1], [1, 1]]


async def test_the_callers_of_a_large_chunk_are_woken_a_slice_per_scheduler_batch(monkeypatch):
    """Every caller gets its own result; no more than WAKE_SLICE of them resume in one batch."""
    import vipd.coalesce as coalesce
    monkeypatch.setattr(coalesce, "WAKE_SLICE", 10)

    class Batches(trio.abc.Instrument):
        n = 0

        def before_io_wait(self, timeout: float) -> None:
            Batches.n += 1

    async def double(items: list[int]) -> list[int]:
        return [2 * i for i in items]

    c: coalesce.Coalescer[int, int] = coalesce.Coalescer(double)
    resumed: dict[int, list[int]] = {}
    got: dict[int, int] = {}

    async def call(i: int) -> None:
        got[i] = await c.submit(i)
        resumed.setdefault(Batches.n, []).append(i)

    inst = Batches()
    trio.lowlevel.add_instrument(inst)
    try:
        async with trio.open_nursery() as nursery:
            for i in range(45):
                nursery.start_soon(call, i)
    finally:
        trio.lowlevel.remove_instrument(inst)
    assert got == {i: 2 * i for i in range(45)} and c.batches == 1
    assert max(len(v) for v in resumed.values()) <= 10 and len(resumed) >= 5, resumed

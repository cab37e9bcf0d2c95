"""Host-wide deliveries, paced (vipd/pacing.py): a burst under PER_TURN is offered at once; a
larger one is offered in order, a bounded number per trio scheduler batch, with the loop polling
I/O in between; once anything waits, everything waits (each unit's events stay in order)."""

from __future__ import annotations

import trio

from vipd.model import Event, Tick
from vipd.pacing import Pacer


class Batches(trio.abc.Instrument):
    """Counts trio scheduler batches (one per I/O poll)."""

    def __init__(self) -> None:
        self.n = 0

    def before_io_wait(self, timeout: float) -> None:
        self.n += 1


class Mark(Tick):
    def __init__(self, i: int) -> None:
        self.i = i


async def _with_pacer(per_turn: int, body) -> tuple[list[tuple[int, str, int]], Pacer]:  # type: ignore[no-untyped-def]
    batches = Batches()
    trio.lowlevel.add_instrument(batches)
    got: list[tuple[int, str, int]] = []

    def offer(unit: str, ev: Event) -> None:
        got.append((batches.n, unit, ev.i if isinstance(ev, Mark) else -1))

    pacer = Pacer(offer, per_turn=per_turn)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(pacer.run)
            await body(pacer)
            with trio.fail_after(5):
                while pacer.backlog:
                    await trio.sleep(0.001)
            nursery.cancel_scope.cancel()
    finally:
        trio.lowlevel.remove_instrument(batches)
    return got, pacer


async def test_a_small_burst_is_offered_at_once_in_the_callers_batch():
    async def body(pacer: Pacer) -> None:
        for i in range(10):
            pacer.post(f"u{i}", Mark(i))
            assert not pacer.pending(f"u{i}")
        assert pacer.backlog == 0

    got, pacer = await _with_pacer(16, body)
    assert [i for _, _, i in got] == list(range(10))
    assert len({b for b, _, _ in got}) == 1 and pacer.deferred == 0


async def test_a_large_burst_is_offered_in_order_a_bounded_number_per_batch():
    seen_pending: list[bool] = []

    async def body(pacer: Pacer) -> None:
        for i in range(1000):
            pacer.post(f"u{i % 100}", Mark(i))
        seen_pending.append(pacer.pending("u5"))

    got, pacer = await _with_pacer(50, body)
    assert [i for _, _, i in got] == list(range(1000))  # one FIFO: every unit's events in order
    per_batch: dict[int, int] = {}
    for b, _, _ in got:
        per_batch[b] = per_batch.get(b, 0) + 1
    assert max(per_batch.values()) <= 2 * 50, per_batch
    assert len(per_batch) >= 1000 // 100  # spread over many batches, I/O polled between them
    assert seen_pending == [True] and not pacer.pending("u5") and pacer.deferred >= 900


async def test_once_anything_waits_a_later_post_waits_behind_it_even_for_another_unit():
    async def body(pacer: Pacer) -> None:
        for i in range(5):
            pacer.post("a", Mark(i))  # 4 offered at once, the 5th waits
        pacer.post("b", Mark(5))
        assert pacer.pending("a") and pacer.pending("b")

    got, _ = await _with_pacer(4, body)
    assert [(u, i) for _, u, i in got] == [("a", 0), ("a", 1), ("a", 2), ("a", 3), ("a", 4), ("b", 5)]


async def test_the_direct_count_starts_again_in_a_later_batch():
    """Bursts spread over time are each offered at once: the count is per turn, not forever."""
    async def body(pacer: Pacer) -> None:
        for burst in range(5):
            for i in range(8):
                pacer.post("u", Mark(burst * 8 + i))
            assert pacer.backlog == 0
            await trio.sleep(0.01)

    got, pacer = await _with_pacer(10, body)
    assert [i for _, _, i in got] == list(range(40)) and pacer.deferred == 0

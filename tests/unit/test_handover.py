"""HandoverGate (vipd/handover.py): at most `batch` handovers in flight, the batch live."""

from __future__ import annotations

import trio
import trio.testing

from vipd.handover import HandoverGate


async def _holders(gate: HandoverGate, n: int, nursery: trio.Nursery, got: list[int]) -> None:
    for i in range(n):
        async def take(i: int = i) -> None:
            await gate.acquire()
            got.append(i)
        nursery.start_soon(take)
    await trio.testing.wait_all_tasks_blocked()


async def test_at_most_a_batch_is_in_flight_and_a_release_lets_the_next_in() -> None:
    gate, got = HandoverGate(3), []
    async with trio.open_nursery() as n:
        await _holders(gate, 5, n, got)
        assert len(got) == 3 and gate.in_flight == 3
        gate.release()
        await trio.testing.wait_all_tasks_blocked()
        assert len(got) == 4 and gate.in_flight == 3
        gate.release()
        gate.release()
        await trio.testing.wait_all_tasks_blocked()
        assert len(got) == 5 and gate.in_flight == 2


async def test_one_at_a_time_as_before() -> None:
    gate, got = HandoverGate(1), []
    async with trio.open_nursery() as n:
        await _holders(gate, 3, n, got)
        for expect in (1, 2, 3):
            assert len(got) == expect and gate.in_flight == 1
            gate.release()
            await trio.testing.wait_all_tasks_blocked()
    assert gate.in_flight == 0


async def test_a_reload_that_raises_the_batch_lets_waiters_in_at_once_and_one_that_lowers_it_waits() -> None:
    gate, got = HandoverGate(1), []
    async with trio.open_nursery() as n:
        await _holders(gate, 6, n, got)
        assert len(got) == 1
        gate.batch = 4
        await trio.testing.wait_all_tasks_blocked()
        assert len(got) == 4 and gate.in_flight == 4
        gate.batch = 2  # the four in flight finish; none more until under two
        gate.release()
        gate.release()
        await trio.testing.wait_all_tasks_blocked()
        assert len(got) == 4 and gate.in_flight == 2
        gate.release()
        await trio.testing.wait_all_tasks_blocked()
        assert len(got) == 5 and gate.in_flight == 2
        gate.release()
        await trio.testing.wait_all_tasks_blocked()
        assert len(got) == 6 and gate.in_flight == 2


async def test_a_cancelled_waiter_takes_no_place() -> None:
    gate = HandoverGate(1)
    await gate.acquire()
    with trio.move_on_after(0.01):
        await gate.acquire()
    assert gate.in_flight == 1
    gate.release()
    with trio.fail_after(1):
        await gate.acquire()
    assert gate.in_flight == 1

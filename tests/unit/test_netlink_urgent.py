"""Netlink (vipd/dataplane/netlink.py): urgent jobs run before the ordinary jobs still queued, each
kind in submission order; a cancelled urgent job is skipped. The owner thread is real (its IPRoute
in this netns); the jobs only record that they ran."""

from __future__ import annotations

import threading

import trio
import trio.testing

from vipd.dataplane.netlink import Netlink


async def test_urgent_jobs_overtake_the_ordinary_queue_in_their_own_order() -> None:
    ran: list[str] = []
    gate, started = threading.Event(), threading.Event()

    def blocker(_ipr: object) -> None:
        started.set()
        gate.wait(5)
        ran.append("blocker")

    def job(name: str):  # type: ignore[no-untyped-def]
        return lambda _ipr: ran.append(name)

    async with Netlink() as nl:
        async with trio.open_nursery() as n:
            n.start_soon(nl.call, blocker)
            await trio.to_thread.run_sync(started.wait, 5)  # the owner thread is busy with it
            for name, urgent in (("o1", False), ("u1", True), ("o2", False), ("u2", True), ("o3", False)):
                n.start_soon(lambda name=name, urgent=urgent: nl.call(job(name), urgent=urgent))
                await trio.testing.wait_all_tasks_blocked()
            gate.set()
    assert ran == ["blocker", "u1", "u2", "o1", "o2", "o3"]


async def test_an_urgent_job_cancelled_before_it_ran_is_skipped() -> None:
    ran: list[str] = []
    gate, started = threading.Event(), threading.Event()

    def blocker(_ipr: object) -> None:
        started.set()
        gate.wait(5)

    async with Netlink() as nl:
        async with trio.open_nursery() as n:
            n.start_soon(nl.call, blocker)
            await trio.to_thread.run_sync(started.wait, 5)  # the owner thread is busy with it
            with trio.CancelScope() as scope:
                scope.cancel()
                await nl.call(lambda _ipr: ran.append("cancelled"), urgent=True)
            n.start_soon(lambda: nl.call(lambda _ipr: ran.append("after"), urgent=True))
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
    assert ran == ["after"]

"""read_burst (vipd/dataplane/kernel_events.py): the kernel's notifications of one lifetime refresh
round trickle in while it works through the sends; one wake-up takes the burst, not a datagram or
a few at a time. Datagram sockets stand in for the rtnetlink socket; trio's MockClock keeps time."""

from __future__ import annotations

import socket

import trio

from vipd.dataplane import kernel_events
from vipd.dataplane.kernel_events import read_burst


def pair() -> tuple[trio.socket.SocketType, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    return trio.socket.from_stdlib_socket(a), b


async def test_datagrams_that_trickle_in_within_the_wait_come_out_in_one_read(autojump_clock):
    reader, writer = pair()
    with reader, writer:
        async def trickle() -> None:
            for i in range(5):
                writer.send(b"n%d" % i)
                await trio.sleep(0.001)  # each within the wait of the first

        async with trio.open_nursery() as n:
            n.start_soon(trickle)
            assert await read_burst(reader) == [b"n0", b"n1", b"n2", b"n3", b"n4"]


async def test_one_that_comes_after_the_wait_is_the_next_read(autojump_clock):
    reader, writer = pair()
    with reader, writer:
        async def late() -> None:
            writer.send(b"first")
            await trio.sleep(kernel_events.COALESCE * 3)
            writer.send(b"later")

        async with trio.open_nursery() as n:
            n.start_soon(late)
            started = trio.current_time()
            assert await read_burst(reader) == [b"first"]
            assert trio.current_time() - started <= kernel_events.COALESCE * 1.01  # waited once, not more
            assert await read_burst(reader) == [b"later"]


async def test_a_full_queue_is_read_at_once_without_waiting(autojump_clock, monkeypatch):
    """More queued than one read takes (DRAIN): that read returns without waiting, the next one
    takes the rest."""
    monkeypatch.setattr(kernel_events, "DRAIN", 3)
    reader, writer = pair()
    with reader, writer:
        for i in range(6):
            writer.send(b"q%d" % i)
        started = trio.current_time()
        assert await read_burst(reader) == [b"q0", b"q1", b"q2", b"q3"]
        assert trio.current_time() == started
        assert await read_burst(reader) == [b"q4", b"q5"]


async def test_a_socket_error_in_the_burst_reaches_the_caller(autojump_clock, monkeypatch):
    """ENOBUFS (notifications lost) while the burst is read, after the wait: raised to the reader,
    whose caller re-lists (kernel_events: Overflowed), not swallowed with the datagrams so far."""
    import errno
    import os

    import pytest

    reader, writer = pair()
    real = os.read
    calls = []

    def read(fd: int, n: int) -> bytes:
        calls.append(fd)
        if len(calls) > 1:  # the read after the wait
            raise OSError(errno.ENOBUFS, "No buffer space available")
        return real(fd, n)

    monkeypatch.setattr(kernel_events.os, "read", read)
    with reader, writer:
        writer.send(b"first")
        with pytest.raises(OSError) as e:
            await read_burst(reader)
        assert e.value.errno == errno.ENOBUFS

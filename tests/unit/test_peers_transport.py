"""The heartbeat transport's decision (vipd/peers/transport.py), without sockets: a yes from
suspect() has always opened a new suspicion generation before anything else is sent."""

from __future__ import annotations

from vipd.peers import wire
from vipd.peers.protocol import Acked, Params, Peers, Recovered, Suspected
from vipd.peers.transport import PeerTransport

KEY = b"k" * 32


def test_a_yes_opens_the_generation_even_before_the_periodic_check() -> None:
    now = [100.0]
    s = Peers("s", 1, KEY, Params())
    t = PeerTransport(s, ("127.0.0.1", 0), clock=lambda: now[0])
    t.set_peers({"o": ("127.0.0.1", 9)})
    link = s.links["o"]
    assert not t.suspect("o") and link.suspect_gen == 0  # the grace has not run since the link began
    now[0] += Params().grace  # the thread has not ticked (not running here): no suspicion yet
    assert t.suspect("o") and link.suspect_gen == 1 and link.suspected
    assert t._events == [Suspected("o", 1)]  # reported like one found by the thread
    assert t.suspect("o") and link.suspect_gen == 1  # asked again: the same suspicion
    m = wire.Receiver(wire.auth_key(KEY), wire.node_id("o"))
    m.known = {wire.node_id("s")}
    assert m.accept(s.build("o", now[0])).suspect_gen == 1  # every later echo carries it


def test_a_suspected_peer_leaving_the_directory_reaches_the_daemon_as_recovered() -> None:
    """set_peers hands the protocol's Recovered to on_event (as validate does): the units drop
    the suspicion of a host whose presence lapsed, which comes back with a fresh link."""
    now, seen = [100.0], []
    s = Peers("s", 1, KEY, Params())
    t = PeerTransport(s, ("127.0.0.1", 0), on_event=seen.append, clock=lambda: now[0])
    t.set_peers({"o": ("127.0.0.1", 9)})
    now[0] += Params().grace
    assert t.suspect("o")
    t.set_peers({})
    assert seen == [Recovered("o")]
    t.set_peers({"o": ("127.0.0.1", 9)})
    assert seen == [Recovered("o")] and not s.links["o"].suspected


class Datagrams:
    """A socket whose receive queue holds these datagrams."""

    def __init__(self, *data: bytes) -> None:
        self.data = list(data)

    def recv(self, n: int) -> bytes:
        if not self.data:
            raise BlockingIOError
        return self.data.pop(0)


def test_an_ack_the_loop_does_not_want_moves_the_grant_without_waking_the_loop() -> None:
    """wants_ack (vipd/succession_tokens.py): an echo still moves the link's grant (the thread
    re-arms grants from it), but its Acked reaches the loop only when the loop wants it."""
    now, wanted = [100.0], [False]
    o, s = Peers("o", 1, KEY, Params()), Peers("s", 2, KEY, Params())
    t = PeerTransport(o, ("127.0.0.1", 0), clock=lambda: now[0], wants_ack=lambda peer: wanted[0])
    t.set_peers({"s": ("127.0.0.1", 9)})
    s.set_peers(["o"], now[0])

    def echoed() -> None:
        """o heartbeats, s echoes it at once, o's thread drains the echo."""
        s.receive(o.build("s", now[0]), now[0])
        t._sock = Datagrams(s.build("o", now[0], reply=True))  # type: ignore[assignment]
        t._drain(wake=False)
        now[0] += Params().interval

    echoed()  # the first message from s: its generation is challenged, then validated
    gen = o.links["s"].peer_gen
    assert gen is not None and t._events
    t._events.clear()
    t.validate("s", gen)
    echoed()
    first = o.granted_until("s")
    assert first is not None and t._events == []  # the grant moved; the loop was not woken
    wanted[0] = True
    echoed()
    after = o.granted_until("s")
    assert after is not None and after > first and t._events == [Acked("s", after)]


async def test_a_dead_heartbeat_thread_ends_run_loudly() -> None:
    """A bug in the thread must not leave a daemon that looks alive to itself and dead to its peers."""
    import pytest
    import trio

    t = PeerTransport(Peers("s", 1, KEY, Params()), ("127.0.0.1", 0))  # bound, never sends: no peers

    def broken() -> None:
        raise ValueError("boom")

    t._loop = broken  # type: ignore[method-assign]
    with pytest.raises(Exception) as e:  # (an ExceptionGroup: trio nurseries are strict)
        async with trio.open_nursery() as nursery:
            await nursery.start(t.run)
    assert e.group_contains(RuntimeError, match="heartbeat thread ended: ValueError")


async def test_a_dead_heartbeat_thread_ends_run_loudly_when_the_loop_instrument_replaces_check_ins() -> None:
    """With `loop_busy_since` the run task sleeps until the thread ends (no periodic check-in):
    the thread's end still wakes it."""
    import pytest
    import trio

    t = PeerTransport(Peers("s", 1, KEY, Params()), ("127.0.0.1", 0), loop_busy_since=lambda: None)

    def broken() -> None:
        raise ValueError("boom")

    t._loop = broken  # type: ignore[method-assign]
    with trio.fail_after(5), pytest.raises(Exception) as e:
        async with trio.open_nursery() as nursery:
            await nursery.start(t.run)
    assert e.group_contains(RuntimeError, match="heartbeat thread ended: ValueError")


async def test_heartbeats_stop_while_the_loops_batch_runs_past_the_stall_and_resume_after_it() -> None:
    """The thread reads the loop instrument: a loop waiting for I/O is alive (heartbeats go out),
    a batch that began more than `stall` ago is a hung loop (none go out, `withholding`), and
    once the loop waits for I/O again they resume."""
    import socket
    import time

    import trio

    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.setblocking(False)
    busy: list[float | None] = [None]
    t = PeerTransport(Peers("s", 1, KEY, Params()), ("127.0.0.1", 0), stall=0.2,
                      loop_busy_since=lambda: busy[0])

    async def received(seconds: float) -> int:
        n, end = 0, trio.current_time() + seconds
        while trio.current_time() < end:
            await trio.sleep(0.01)
            try:
                while peer.recv(512):
                    n += 1
            except BlockingIOError:
                pass
        return n

    with peer:
        async with trio.open_nursery() as nursery:
            await nursery.start(t.run)
            t.set_peers({"o": peer.getsockname()})
            assert await received(0.3) > 0 and not t.withholding  # waiting for I/O: alive
            busy[0] = time.monotonic() - 0.5  # one batch running for 0.5 s, past the 0.2 s stall
            await received(0.1)  # (what was in flight)
            assert await received(0.3) == 0 and t.withholding
            busy[0] = None
            assert await received(0.3) > 0 and not t.withholding
            nursery.cancel_scope.cancel()

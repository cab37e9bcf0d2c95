"""The heartbeat transport's decision (vipd/peers/transport.py), without sockets: a yes from
suspect() has always opened a new suspicion generation before anything else is sent."""

from __future__ import annotations

from vipd.peers import wire
from vipd.peers.protocol import Params, Peers, Recovered, Suspected
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

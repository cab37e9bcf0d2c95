"""The heartbeat thread's grant writer (vipd/peers/grants.py) with the real peer protocol state and
the kernel write replaced: which grants are due, and what deadline each write carries."""

from __future__ import annotations

import time
from typing import Any

import pytest

from vipd.peers import grants as grants_mod
from vipd.peers import wire
from vipd.peers.grants import GrantWriter
from vipd.peers.protocol import Params, PeerLink

L, G, H = 0.090, 0.130, 0.010
MY_INC, S_INC = 5, 7


class Peers:
    def __init__(self, now: float) -> None:
        self.links = {"h2": PeerLink("h2", MY_INC, Params(H, L, G), now)}

    def echo(self, sent: float, gen: int = 0, rtt: float = 0.001) -> None:
        link = self.links["h2"]
        m = link.on_send(sent)
        link.on_receive(wire.Message(0, 0, S_INC, link.peer_seq + 1, MY_INC, m.seq, gen), sent + rtt)


def heard(handed: bool = True) -> tuple[Peers, GrantWriter]:
    """h2 validated and heard once; with `handed`, its grant (id 1) handed and written once."""
    clock = time.perf_counter  # (the transport's clock: here perf_counter itself, offset 0)
    peers = Peers(clock())
    peers.links["h2"].validate((S_INC, 0))
    w = GrantWriter(None, True, clock, step=2 * H)
    peers.echo(clock())
    if handed:
        w.hand({"h2": 1})
        w.write(w.due(peers))
    return peers, w


@pytest.fixture
def written(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    out: list[Any] = []

    class Socks:
        def __init__(self, netns: Any) -> None:
            self.created: set[int] = set()

        def close(self) -> None:
            pass

    monkeypatch.setattr(grants_mod, "Sockets", Socks)
    monkeypatch.setattr(grants_mod, "write", lambda s, ops, rebuilt, table, tu: out.append((time.perf_counter(), ops)))
    return out


def test_only_handed_grants_are_written_each_time_they_move_a_step(written: list[Any]) -> None:
    clock = time.perf_counter  # (the transport's clock: here perf_counter itself, offset 0)
    peers = Peers(clock())
    peers.links["h2"].validate((S_INC, 0))
    w = GrantWriter(None, True, clock, step=2 * H)
    peers.echo(clock())
    assert w.due(peers) == []  # nothing handed yet: the trio side still writes it
    w.hand({"h2": 3})
    due = w.due(peers)
    assert [(p, gid) for p, gid, _ in due] == [("h2", 3)]
    assert due[0][2] == peers.links["h2"].granted_until()
    w.write(due)
    assert len(written) == 1
    at, ops = written[0]
    (gid, deadline), = ops.grants
    assert gid == 3 and deadline <= due[0][2] + 1e-6  # on perf_counter's clock: not one tick later
    assert w.due(peers) == []  # written: not due again until it moves a step
    t = clock()
    peers.echo(t - L + H)  # an echo of a heartbeat sent earlier than the grant's: no move
    assert w.due(peers) == []
    peers.echo(t + 3 * H)
    assert [p for p, _, _ in w.due(peers)] == ["h2"]


def test_a_grant_that_ends_is_removed_once(written: list[Any]) -> None:
    peers, w = heard()
    del peers.links["h2"]  # the peer left the directory: no grant
    due = w.due(peers)
    assert due and due[0][2] == float("-inf")
    w.write(due)
    (_, deadline), = written[-1][1].grants
    assert deadline < written[-1][0]  # already over: the kernel removes the element
    assert w.due(peers) == []


def test_a_newer_suspicion_generation_moves_nothing_until_validated(written: list[Any]) -> None:
    """Echoes in messages of a generation the trio side has not validated (the successor suspected
    us since) count for nothing here either: the grant stays where the old generation left it."""
    peers, w = heard()
    before = peers.links["h2"].granted_until()
    peers.echo(time.perf_counter() + 5 * H, gen=1)
    assert peers.links["h2"].granted_until() == before
    assert w.due(peers) == []


def test_a_failed_write_is_counted_and_tried_again(monkeypatch: pytest.MonkeyPatch, written: list[Any]) -> None:
    peers, w = heard(handed=False)
    w.hand({"h2": 1})

    def refused(*a: Any) -> None:
        raise OSError(2, "No such file or directory")

    monkeypatch.setattr(grants_mod, "write", refused)
    w.write(w.due(peers))
    assert w.failures == 1 and w.writes == 0
    assert w.due(peers)  # not recorded as written: due again


def test_nothing_is_written_once_the_daemon_drops_its_tables(written: list[Any]) -> None:
    """A stop drops the fence tables after the revoke (vipd/app.py sets `stopped` first): a write
    then would only fail against a table that is gone, and be counted as a failure."""
    peers, w = heard()
    assert len(written) == 1 and w.writes == 1
    w.stopped = True
    peers.echo(time.perf_counter() + 0.05)  # the grant moved well past a step
    w.write(w.due(peers))
    assert len(written) == 1 and w.writes == 1 and w.failures == 0

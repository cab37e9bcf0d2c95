"""Wire format of the host-to-host heartbeat: round trip, and every rejection changing nothing."""

from __future__ import annotations

import copy

import pytest

from vipd.peers import wire
from vipd.peers.protocol import Params, Peers

KEY = wire.auth_key(b"0123456789abcdef")
A, B, C = wire.node_id("a"), wire.node_id("b"), wire.node_id("c")


def msg(seq: int, inc: int = 5, src: int = A, dst: int = B, **kw: int) -> wire.Message:
    return wire.Message(src, dst, inc, seq, kw.get("echo_inc", 7), kw.get("echo_seq", 3), kw.get("gen", 0),
                        bool(kw.get("reply", 0)))


def receiver() -> wire.Receiver:
    r = wire.Receiver(KEY, B)
    r.known = {A, C}
    return r


def test_round_trip_keeps_every_field_in_72_bytes() -> None:
    m = wire.Message(A, B, 2**63 + 5, 2**64 - 1, 17, 2**40, 2**32 - 1, True)
    data = wire.encode(KEY, m)
    assert len(data) == wire.SIZE == 72
    assert data[:4] == b"VP\x01\x01"
    assert wire.decode(KEY, data) == m
    assert wire.decode(KEY, wire.encode(KEY, msg(1))).reply is False


def test_out_of_range_fields_are_refused_when_encoding() -> None:
    with pytest.raises(ValueError):
        wire.encode(KEY, msg(2**64))
    with pytest.raises(ValueError):
        wire.encode(KEY, msg(1, gen=2**32))


def test_short_cluster_key_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        wire.auth_key(b"short")


def test_node_ids_are_stable_and_distinct() -> None:
    assert wire.node_id("a") == A and len({A, B, C}) == 3


def reject(r: wire.Receiver, data: bytes) -> wire.Reason:
    before = copy.deepcopy(r.__dict__)
    with pytest.raises(wire.Rejected) as e:
        r.accept(data)
    assert r.__dict__ == before  # a rejected datagram changes nothing
    return e.value.reason


def test_malformed_datagrams() -> None:
    r = receiver()
    good = wire.encode(KEY, msg(1))
    assert reject(r, good[:-1]) == wire.Reason.MALFORMED
    assert reject(r, good + b"x") == wire.Reason.MALFORMED
    assert reject(r, b"XX" + good[2:]) == wire.Reason.MALFORMED
    assert reject(r, good[:2] + b"\x02" + good[3:]) == wire.Reason.MALFORMED


def test_forgeries_are_rejected_by_tag() -> None:
    r = receiver()
    good = wire.encode(KEY, msg(1))
    for i in range(4, 56):  # every body byte after magic/version flipped
        bad = bytearray(good)
        bad[i] ^= 0x01
        assert reject(r, bytes(bad)) == wire.Reason.BAD_TAG
    other = wire.auth_key(b"another-cluster-key!")
    assert reject(r, wire.encode(other, msg(1))) == wire.Reason.BAD_TAG
    assert reject(r, good[:-1] + bytes([good[-1] ^ 1])) == wire.Reason.BAD_TAG


def test_wrong_destination_and_unknown_source() -> None:
    r = receiver()
    assert reject(r, wire.encode(KEY, msg(1, dst=C))) == wire.Reason.WRONG_DST
    assert reject(r, wire.encode(KEY, msg(1, src=wire.node_id("stranger")))) == wire.Reason.UNKNOWN_SRC


def test_replay_duplicate_reorder_and_old_incarnation() -> None:
    r = receiver()
    first, second, third = (wire.encode(KEY, msg(s)) for s in (1, 2, 3))
    assert r.accept(first).seq == 1
    assert r.accept(third).seq == 3
    assert reject(r, third) == wire.Reason.REPLAY  # duplicate
    assert reject(r, second) == wire.Reason.REPLAY  # reordered: older than the newest
    assert reject(r, first) == wire.Reason.REPLAY  # replayed capture
    newer = wire.encode(KEY, msg(1, inc=6))  # a restart: seq starts again in a higher incarnation
    assert r.accept(newer).src_inc == 6
    assert reject(r, wire.encode(KEY, msg(99, inc=5))) == wire.Reason.OLD_INCARNATION
    assert r.highest(A) == (6, 1)
    # another source has its own counters
    assert r.accept(wire.encode(KEY, msg(1, src=C))).src == C


def test_forged_and_replayed_datagrams_change_no_peer_state() -> None:
    a = Peers("a", 10, b"0123456789abcdef", Params())
    b = Peers("b", 20, b"0123456789abcdef", Params())
    a.set_peers(["a", "b"], 0.0)
    b.set_peers(["a", "b"], 0.0)
    d1 = a.build("b", 0.0)
    assert b.receive(d1, 0.001)[0] == "a"
    state = copy.deepcopy(b.links["a"].__dict__)
    forged = Peers("a", 10**12, b"not-the-cluster-key", Params())
    forged.set_peers(["b"], 0.0)
    assert b.receive(forged.build("b", 0.0), 0.002) == (None, False, [])
    assert b.receive(d1, 0.003) == (None, False, [])
    after = copy.deepcopy(b.links["a"].__dict__)
    rejected = after["stats"].rejected
    # the forgery claims to come from a, but an unauthenticated src is not trusted: counted unattributed
    assert rejected == {"replay": 1} and b.unattributed == {"bad_tag": 1}
    after["stats"].rejected = {}
    assert after == state
    assert b.receive(b"x" * 72, 0.004)[0] is None
    assert b.unattributed == {"bad_tag": 1, "malformed": 1}

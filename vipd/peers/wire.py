"""The host-to-host heartbeat on the wire: one fixed 72-byte datagram, HMAC-authenticated, replay-proof.

Layout (network byte order, version 1)::

    offset size field
         0    2 magic        b"VP"
         2    1 version      1
         3    1 flags        bit 0 REPLY: an answer sent at once (never itself answered at once)
         4    8 src          node id of the sender   (node_id(name): 8 bytes of BLAKE2b of the name)
        12    8 dst          node id of the receiver
        20    8 src_inc      sender's incarnation (grows across restarts of the sender)
        28    8 seq          sender's counter toward dst, strictly increasing within an incarnation
        36    8 echo_inc     incarnation of dst that echo_seq refers to (0 with echo_seq 0: none)
        44    8 echo_seq     highest seq of dst's messages the sender has received
        52    4 suspect_gen  how many times the sender has suspected dst (in this incarnation)
        56   16 tag          HMAC-SHA256(auth key, bytes 0..55), first 16 bytes

The auth key is HMAC-SHA256(cluster key, b"vipd-peers-v1"), so the cluster key is never used raw.

`Receiver.accept` is the only way in: it checks length, magic, version, tag (constant time), dst,
src and anti-replay (incarnation not lower than the highest seen from src; within one incarnation
seq strictly above the highest seen), and only then updates the replay state. A datagram that fails
any check raises `Rejected(reason)` and changes nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from enum import Enum

MAGIC = b"VP"
VERSION = 1
FLAG_REPLY = 0x01
_BODY = struct.Struct("!2sBBQQQQQQI")
TAG_LEN = 16
SIZE = _BODY.size + TAG_LEN  # 72
MIN_KEY_LEN = 16
U64 = (1 << 64) - 1
U32 = (1 << 32) - 1


def node_id(name: str) -> int:
    """The 64-bit id of a node name on the wire (collisions among a cluster's names are refused by Peers)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8, person=b"vipd-node").digest(), "big")


def auth_key(cluster_key: bytes) -> bytes:
    if len(cluster_key) < MIN_KEY_LEN:
        raise ValueError(f"cluster key must be at least {MIN_KEY_LEN} bytes, got {len(cluster_key)}")
    return hmac.new(cluster_key, b"vipd-peers-v1", hashlib.sha256).digest()


@dataclass(frozen=True)
class Message:
    src: int
    dst: int
    src_inc: int
    seq: int
    echo_inc: int
    echo_seq: int
    suspect_gen: int
    reply: bool = False


class Reason(str, Enum):
    MALFORMED = "malformed"  # wrong length, magic or version
    BAD_TAG = "bad_tag"
    WRONG_DST = "wrong_dst"
    UNKNOWN_SRC = "unknown_src"
    OLD_INCARNATION = "old_incarnation"
    REPLAY = "replay"  # same incarnation, seq not above the highest seen (duplicate, replay, reorder)


class Rejected(Exception):
    def __init__(self, reason: Reason, src: int | None = None) -> None:
        super().__init__(reason.value)
        self.reason = reason
        self.src = src  # the claimed sender when it is a known node (for per-peer counters), else None


def tag(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()[:TAG_LEN]


def encode(key: bytes, m: Message) -> bytes:
    for name in ("src", "dst", "src_inc", "seq", "echo_inc", "echo_seq"):
        if not 0 <= getattr(m, name) <= U64:
            raise ValueError(f"{name} out of range: {getattr(m, name)}")
    if not 0 <= m.suspect_gen <= U32:
        raise ValueError(f"suspect_gen out of range: {m.suspect_gen}")
    body = _BODY.pack(MAGIC, VERSION, FLAG_REPLY if m.reply else 0, m.src, m.dst, m.src_inc, m.seq,
                      m.echo_inc, m.echo_seq, m.suspect_gen)
    return body + tag(key, body)


def decode(key: bytes, data: bytes) -> Message:
    """Parse and authenticate one datagram (no replay check). Raises Rejected."""
    if len(data) != SIZE:
        raise Rejected(Reason.MALFORMED)
    body, got = data[:_BODY.size], data[_BODY.size:]
    magic, version, flags, src, dst, inc, seq, echo_inc, echo_seq, gen = _BODY.unpack(body)
    if magic != MAGIC or version != VERSION:
        raise Rejected(Reason.MALFORMED)
    if not hmac.compare_digest(tag(key, body), got):
        raise Rejected(Reason.BAD_TAG)
    return Message(src, dst, inc, seq, echo_inc, echo_seq, gen, bool(flags & FLAG_REPLY))


class Receiver:
    """Authentication and anti-replay for one node: what may reach the protocol core."""

    def __init__(self, key: bytes, me: int) -> None:
        self._key = key
        self.me = me
        self.known: set[int] = set()
        self._highest: dict[int, tuple[int, int]] = {}  # src -> (incarnation, seq)

    def forget(self, src: int) -> None:
        self._highest.pop(src, None)

    def highest(self, src: int) -> tuple[int, int] | None:
        return self._highest.get(src)

    def accept(self, data: bytes) -> Message:
        m = decode(self._key, data)
        if m.dst != self.me:
            raise Rejected(Reason.WRONG_DST, m.src if m.src in self.known else None)
        if m.src not in self.known:
            raise Rejected(Reason.UNKNOWN_SRC)
        prev = self._highest.get(m.src)
        if prev is not None:
            if m.src_inc < prev[0]:
                raise Rejected(Reason.OLD_INCARNATION, m.src)
            if m.src_inc == prev[0] and m.seq <= prev[1]:
                raise Rejected(Reason.REPLAY, m.src)
        self._highest[m.src] = (m.src_inc, m.seq)
        return m

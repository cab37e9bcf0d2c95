"""The pure half of DSR: the flow hash (a byte-exact reference of bpf/dsr.c's) and Maglev tables.

Every director computes the same table from the same backend names, and the same hash from the same
packet, so any director sends a flow to the same backend: no connection state to share.

Flow key (what bpf/dsr.c hashes), bytes in wire order:
    source address (4 or 16) | destination address (4 or 16) | source port (2) | destination port (2)
    | protocol (1) | three zero bytes
Hash: MurmurHash3 x86_32 of that key with FLOW_SEED (the key is a whole number of 32-bit words).
Slot: hash % table size. Never skb->hash: it is seeded per boot, so two hosts would disagree.
"""

from __future__ import annotations

import hashlib
import ipaddress
import struct
from typing import Sequence, Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

TABLE_SIZE = 65537  # a prime: every skip in 1..M-1 visits every slot
FLOW_SEED = 0x56495044  # "VIPD"
EMPTY = 0xFFFFFFFF  # a slot with no backend (only while the backend set is empty)
_M32 = 0xFFFFFFFF


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _M32


def murmur3_32(data: bytes, seed: int = FLOW_SEED) -> int:
    """MurmurHash3 x86_32 of a key whose length is a multiple of 4 (the C program's loop)."""
    if len(data) % 4:
        raise ValueError("the flow key is a whole number of 32-bit words")
    h = seed & _M32
    for (k,) in struct.iter_unpack("<I", data):
        k = (k * 0xCC9E2D51) & _M32
        k = _rotl(k, 15)
        k = (k * 0x1B873593) & _M32
        h ^= k
        h = _rotl(h, 13)
        h = (h * 5 + 0xE6546B64) & _M32
    h ^= len(data)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    h ^= h >> 16
    return h


def flow_key(src: IPAddress, dst: IPAddress, sport: int, dport: int, proto: int) -> bytes:
    if src.version != dst.version:
        raise ValueError("source and destination must be of one family")
    return src.packed + dst.packed + struct.pack("!HHB3x", sport, dport, proto)


def flow_hash(src: IPAddress, dst: IPAddress, sport: int, dport: int, proto: int) -> int:
    return murmur3_32(flow_key(src, dst, sport, dport, proto))


def _permutation(name: str, size: int) -> tuple[int, int]:
    """(offset, skip) of one backend: from its name only, the same on every host."""
    d = hashlib.blake2b(name.encode(), digest_size=16, person=b"vipd-maglev").digest()
    h1, h2 = struct.unpack("<QQ", d[:16])
    return h1 % size, h2 % (size - 1) + 1


def build(names: Sequence[str], size: int = TABLE_SIZE) -> list[int]:
    """The Maglev lookup table: slot -> index into sorted(set(names)), or EMPTY for every slot when
    there is no backend. Depends only on the set of names (their order in `names` does not matter)."""
    backends = sorted(set(names))
    if not backends:
        return [EMPTY] * size
    perms = [_permutation(n, size) for n in backends]
    nxt = [0] * len(backends)
    table = [EMPTY] * size
    filled = 0
    while True:
        for i, (offset, skip) in enumerate(perms):
            c = (offset + nxt[i] * skip) % size
            while table[c] != EMPTY:
                nxt[i] += 1
                c = (offset + nxt[i] * skip) % size
            table[c] = i
            nxt[i] += 1
            filled += 1
            if filled == size:
                return table


def lookup(table: Sequence[int], names: Sequence[str], h: int) -> str | None:
    """The backend name a flow hash maps to (the C program's lookup, on the Python side)."""
    slot = table[h % len(table)]
    return None if slot == EMPTY else sorted(set(names))[slot]

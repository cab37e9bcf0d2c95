"""The fence's token batches, encoded by hand straight to bytes (split from fence_build.py, whose
docstring describes the table): one batch of O(elements) bytes, ~1 ms for 1,000 elements, where
pyroute2's message classes take ~60 ms; and the acks read back the same way."""

from __future__ import annotations

import struct
from typing import Optional, Sequence

from pyroute2.netlink import NLM_F_CREATE
from pyroute2.netlink.nfnetlink import nftsocket as nfts

from vipd.dataplane.fence_build import ETH_P, GROUP, MANAGED, NFPROTO_NETDEV, TABLE, TOKEN, IPAddress, chunks, grant_name

# The kernel keeps element timeouts in jiffies rounded down; a timeout under one jiffy becomes 0,
# which the kernel reads as "no timeout" (a permanent element). 10 ms covers HZ >= 100: anything
# shorter is not armed at all (the element is removed instead).
MIN_TOKEN_MS = 10
_NFT_JUMP = -3
_BATCH_BEGIN, _BATCH_END = 0x10, 0x11

# -- token batches, encoded by hand ---------------------------------------------------------

_NLA_F_NESTED = 0x8000
_NLM_F_REQUEST, _NLM_F_ACK = 0x1, 0x4
_NFNL_SUBSYS_NFTABLES = 10
_NEWSETELEM = (_NFNL_SUBSYS_NFTABLES << 8) | nfts.NFT_MSG_NEWSETELEM
_DELSETELEM = (_NFNL_SUBSYS_NFTABLES << 8) | nfts.NFT_MSG_DELSETELEM
# NFTA_SET_ELEM_LIST_{TABLE,SET,ELEMENTS}, NFTA_LIST_ELEM, NFTA_SET_ELEM_{KEY,DATA,TIMEOUT,EXPIRATION}, NFTA_DATA_VALUE
_L_TABLE, _L_SET, _L_ELEMENTS, _LIST_ELEM, _E_KEY, _E_DATA, _E_TIMEOUT, _E_EXPIRATION, _D_VALUE = 1, 2, 3, 1, 1, 2, 4, 5, 1
_D_VERDICT, _V_CODE, _V_CHAIN = 2, 1, 2  # NFTA_DATA_VERDICT, NFTA_VERDICT_{CODE,CHAIN}


def _nla(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * (-n & 3)


_KEY_ATTR: dict[IPAddress, bytes] = {}  # VIP -> its NFTA_SET_ELEM_KEY attribute (a refresh re-encodes only times)
_TIMES = struct.Struct("=HH8sHH8s")


def _key_attr(ip: IPAddress) -> bytes:
    attr = _KEY_ATTR.get(ip)
    if attr is None:
        if len(_KEY_ATTR) > 100_000:
            _KEY_ATTR.clear()
        attr = _KEY_ATTR[ip] = _nla(_E_KEY | _NLA_F_NESTED, _nla(_D_VALUE, ip.packed))
    return attr


# a grant set's elements: one per protocol the fence rules match (meta protocol, big-endian)
_GRANT_KEYS = [_nla(_E_KEY | _NLA_F_NESTED, _nla(_D_VALUE, struct.pack("!H", p))) for p in ETH_P.values()]


def _jump(gid: int) -> bytes:
    """NFTA_SET_ELEM_DATA of a group element: jump to the grant's chain."""
    verdict = _nla(_V_CODE, struct.pack("!i", _NFT_JUMP)) + _nla(_V_CHAIN, grant_name(gid).encode() + b"\0")
    return _nla(_E_DATA | _NLA_F_NESTED, _nla(_D_VERDICT | _NLA_F_NESTED, verdict))


def _elem(key: bytes, ms: Optional[int], data: bytes = b"") -> bytes:
    """One NFTA_LIST_ELEM: the key attribute, with ``timeout ms expires ms`` (ms None: none), then
    `data` (a map element's NFTA_SET_ELEM_DATA)."""
    extra = b"" if ms is None else _TIMES.pack(12, _E_TIMEOUT, ms.to_bytes(8, "big"), 12, _E_EXPIRATION,
                                              ms.to_bytes(8, "big"))
    return struct.pack("=HH", 4 + len(key) + len(extra) + len(data), _LIST_ELEM | _NLA_F_NESTED) + key + extra + data


def _msg(kind: int, flags: int, seq: int, payload: bytes, res_id: int = 0) -> bytes:
    body = struct.pack("!BBH", NFPROTO_NETDEV if res_id == 0 else 0, 0, res_id) + payload
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


_TABLE_ATTR = _nla(_L_TABLE, TABLE.encode() + b"\0")
_SET_ATTR = {name: _nla(_L_SET, name.encode() + b"\0") for name in (*TOKEN.values(), *MANAGED.values(), *GROUP.values())}


def _set_attr(name: str) -> bytes:
    attr = _SET_ATTR.get(name)
    if attr is None:
        attr = _SET_ATTR[name] = _nla(_L_SET, name.encode() + b"\0")
    return attr


Part = tuple[int, bytes]  # (message type, attributes) of one message of a batch


def _elements(kind: int, set_name: str, elems: Sequence[bytes]) -> list[Part]:
    head = _TABLE_ATTR + _set_attr(set_name)
    return [(kind, head + _nla(_L_ELEMENTS | _NLA_F_NESTED, b"".join(part))) for part in chunks(elems)]


def _timed(set_name: str, arm: Sequence[tuple[bytes, int]], remove: Sequence[bytes], timeout_update: bool) -> list[Part]:
    """Arm each (key, ms) of a timeout set, remove each key of `remove`; absent elements are no
    error: a removal is "add, then delete"; an arm on a kernel without element timeout update
    (< 6.11) is "add, delete, add"."""
    parts: list[Part] = []
    if remove or (arm and not timeout_update):
        keys = [k for k, _ in arm] + list(remove)
        parts += _elements(_NEWSETELEM, set_name, [_elem(k, MIN_TOKEN_MS) for k in keys])
        parts += _elements(_DELSETELEM, set_name, [_elem(k, None) for k in keys])
    return parts + _elements(_NEWSETELEM, set_name, [_elem(k, ms) for k, ms in arm])


def token_batch(arm: Sequence[tuple[IPAddress, int]], remove: Sequence[IPAddress], seq: int,
                timeout_update: bool = True, *, grants: Sequence[tuple[int, int]] = (), ungrant: Sequence[int] = (),
                join: Sequence[tuple[IPAddress, int]] = (), leave: Sequence[IPAddress] = ()) -> tuple[bytes, int]:
    """One nfnetlink batch (atomic: the kernel applies all of it or nothing): arm each (VIP, ms) in
    its token set and remove each VIP of ``remove``; arm each (grant id, ms) of ``grants`` and remove
    each of ``ungrant`` (their chains and sets exist: :func:`grant_ops`); take each VIP of ``leave``
    out of its group (it must be in one), then put each (VIP, grant id) of ``join`` in that group
    (it must be in none). Returns (bytes, sequence number of the one message that asks for an
    ack: the last)."""
    parts: list[Part] = []
    for v in (4, 6):
        parts += _elements(_DELSETELEM, GROUP[v], [_elem(_key_attr(ip), None) for ip in leave if ip.version == v])
        parts += _elements(_NEWSETELEM, GROUP[v], [_elem(_key_attr(ip), None, _jump(gid)) for ip, gid in join
                                                   if ip.version == v])
        parts += _timed(TOKEN[v], [(_key_attr(ip), ms) for ip, ms in arm if ip.version == v],
                        [_key_attr(ip) for ip in remove if ip.version == v], timeout_update)
    for g, ms in grants:
        parts += _timed(grant_name(g), [(k, ms) for k in _GRANT_KEYS], [], timeout_update)
    for g in ungrant:
        parts += _timed(grant_name(g), [], _GRANT_KEYS, timeout_update)
    out = [_msg(_BATCH_BEGIN, _NLM_F_REQUEST, seq, b"", _NFNL_SUBSYS_NFTABLES)]
    for i, (kind, attrs) in enumerate(parts):
        flags = _NLM_F_REQUEST | (_NLM_F_ACK if i == len(parts) - 1 else 0)
        flags |= NLM_F_CREATE if kind == _NEWSETELEM else 0
        out.append(_msg(kind, flags, seq + 1 + i, attrs))
    last = seq + len(parts)
    out.append(_msg(_BATCH_END, _NLM_F_REQUEST, last + 1, b"", _NFNL_SUBSYS_NFTABLES))
    return b"".join(out), (last if parts else -1)


def parse_acks(data: bytes) -> list[tuple[int, int]]:
    """(sequence number, errno) of every NLMSG_ERROR in ``data`` (errno 0: an ack)."""
    out: list[tuple[int, int]] = []
    off = 0
    while off + 16 <= len(data):
        length, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", data, off)
        if length < 16:
            break
        if kind == 2 and length >= 20:  # NLMSG_ERROR
            out.append((seq, -struct.unpack_from("=i", data, off + 16)[0]))
        off += (length + 3) & ~3
    return out


def token_ms(until: float, now: float) -> int:
    """Whole milliseconds from ``now`` to ``until``, rounded down (0 when under MIN_TOKEN_MS)."""
    ms = int((until - now) * 1000.0)  # truncation == floor for positive values
    return ms if ms >= MIN_TOKEN_MS else 0

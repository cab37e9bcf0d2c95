"""What the nftables token fence puts in the kernel, as pure data (no kernel access here).

One table of vipd's own, ``netdev vipd_fence`` (comment "managed by vipd; do not edit"), holds
four sets and one pair of base chains per device that carries a fenced VIP::

    set managed4 { type ipv4_addr }                 the configured VIPs (IPv4)
    set token4   { type ipv4_addr; flags timeout }  the VIPs whose ownership is proven, until a deadline
    set managed6 / token6                           the same for IPv6
    set l2only4 / l2only6                           managed VIPs gated for ARP/ND only (DSR, below)
    map group4 { type ipv4_addr : verdict }         a VIP -> "jump grant_<id>": the grant it depends on
    map group6 { type ipv6_addr : verdict }         (the same for IPv6)
    set grant_<id> { type ether_type; flags timeout }   ip, arp and ip6 while grant <id> is alive
    chain grant_<id> { meta protocol != @grant_<id> drop }
    chain in_<dev>  { type filter hook ingress device <dev> priority -500; policy accept;
        ip daddr @managed4 ip daddr != @token4 drop
        arp daddr ip @managed4 arp daddr ip != @token4 drop              (requests/replies *to* the VIP)
        ip6 daddr @managed6 ip6 daddr != @token6 drop
        icmpv6 type nd-neighbor-solicit  <target> @managed6 <target> != @token6 drop
        ... and the same four again ending "ip daddr vmap @group4" (and so on) }
    chain out_<dev> { type filter hook egress device <dev> priority -500; policy accept;
        ip saddr ... / arp saddr ip ... / ip6 saddr ...                  (anything *from* the VIP)
        icmpv6 type nd-neighbor-advert <target> @managed6 <target> != @token6 drop }

A VIP is served only while its own token is alive AND, if it is in a group (group4/group6 send its
packets through chain grant_<id>), while that grant is alive too. A grant is three elements (one
per protocol) for any number of VIPs: the fast takeover's successor grant (vipd/succession.py)
bounds every VIP that successor may take over, so an ack re-arms one grant per peer, not one token
per VIP. (A lookup on a map's result, the shorter form, is valid for the kernel but crashes nft
1.0.6's `nft list`: everything here is what nft itself writes and prints.) Grant chains and sets
are created on first use (:func:`grant_ops`) and live as long as the table.

A DSR VIP (one with services) is in l2only4/6 too: its IPv4/IPv6 rules let it pass (the director
forwards frames to the VIP unchanged to every backend, which answers from the VIP itself, owner
or not), while ARP/ND stay gated, so only the owner's kernel claims the address on the segment.
The director's forwarding has a fence of its own (the BPF deadline, vipd/dsr).

(<target> is the ND target address, 16 bytes at transport offset 8; nft 1.0.6 prints it as a raw
payload.) ARP probes (sender 0.0.0.0), DAD probes (source ::), and neighbour advertisements *to* us
stay untouched, so conflict detection works while a VIP is fenced.

Setup (:func:`setup_ops`) is pyroute2 message data, one atomic batch that converges from any
state (create-if-missing, then flush and refill what vipd owns). Token refreshes are encoded
here by hand (:func:`token_batch`), straight to bytes: one batch of O(elements) bytes, ~1 ms for
1,000 elements, where pyroute2's message classes take ~60 ms.
"""

from __future__ import annotations

import ipaddress
import os
import re
import struct
from typing import Any, Iterable, NamedTuple, Optional, Sequence, TypeVar, Union

from pyroute2.netlink import NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES
from pyroute2.netlink.nfnetlink import nftsocket as nfts

from vipd.dataplane.nft_build import Op, encode_batch  # one batch encoder and op type for both tables

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

TABLE = "vipd_fence"
TABLE_COMMENT = "managed by vipd; do not edit"
NFPROTO_NETDEV = 5
PRIORITY = -500  # before anything else on the device
MANAGED = {4: "managed4", 6: "managed6"}
TOKEN = {4: "token4", 6: "token6"}
L2ONLY = {4: "l2only4", 6: "l2only6"}
GROUP = {4: "group4", 6: "group6"}  # verdict maps: VIP -> jump to its grant's chain
GRANT_PREFIX = "grant_"  # grant_<id>: a grant's chain and set
# The kernel keeps element timeouts in jiffies rounded down; a timeout under one jiffy becomes 0,
# which the kernel reads as "no timeout" (a permanent element). 10 ms covers HZ >= 100: anything
# shorter is not armed at all (the element is removed instead).
MIN_TOKEN_MS = 10
MAX_TOKEN_MS = 1 << 40

_KEY = {4: (7, 4), 6: (8, 16)}  # nft datatypes ipv4_addr / ipv6_addr: (type, length)
_ETHERTYPE = (10, 2)  # nft datatype ether_type: a grant set's key
_NFT_DATA_VERDICT = 0xFFFFFF00
_NFT_JUMP = -3
_HOOK_INGRESS, _HOOK_EGRESS = 0, 1
_NF_ACCEPT = 1
_NF_DROP = 0
_META_PROTOCOL, _META_L4PROTO = 1, 16
_BASE_NETWORK, _BASE_TRANSPORT = 1, 2
_BATCH_BEGIN, _BATCH_END = 0x10, 0x11
_ETH_P = {"ip": 0x0800, "arp": 0x0806, "ip6": 0x86DD}
_ICMPV6, _ND_NS, _ND_NA = 58, 135, 136


def chain_names(dev: str) -> tuple[str, str]:
    """(ingress chain, egress chain) of device ``dev``."""
    return f"in_{dev}", f"out_{dev}"


# -- rule expressions -----------------------------------------------------------------------


def _expr(name: str, **fields: Any) -> dict[str, Any]:
    data = [(f"NFTA_{name.upper()}_{k.upper()}", v) for k, v in fields.items()]
    return {"attrs": [("NFTA_EXPR_NAME", name), ("NFTA_EXPR_DATA", {"attrs": data})]}


def _value(b: bytes) -> dict[str, Any]:
    return {"attrs": [("NFTA_DATA_VALUE", b)]}


def _cmp(b: bytes) -> dict[str, Any]:
    return _expr("cmp", sreg=1, op=0, data=_value(b))


def _meta(key: int) -> dict[str, Any]:
    return _expr("meta", dreg=1, key=key)


def _payload(base: int, offset: int, length: int) -> dict[str, Any]:
    return _expr("payload", dreg=1, base=base, offset=offset, len=length)


def _proto(eth: str) -> list[dict[str, Any]]:
    return [_meta(_META_PROTOCOL), _cmp(struct.pack("!H", _ETH_P[eth]))]


def _fenced(load: dict[str, Any], version: int, l2: bool = False) -> list[dict[str, Any]]:
    """Address in register 1 is managed (and, unless `l2`, not gated for ARP/ND only) and has no
    live token -> drop."""
    exempt = [] if l2 else [load, _expr("lookup", set=L2ONLY[version], sreg=1, flags={"NFT_LOOKUP_F_INV"})]
    return [load, _expr("lookup", set=MANAGED[version], sreg=1), *exempt,
            load, _expr("lookup", set=TOKEN[version], sreg=1, flags={"NFT_LOOKUP_F_INV"}),
            _expr("immediate", dreg=0, data={"attrs": [("NFTA_DATA_VERDICT", {"attrs": [
                ("NFTA_VERDICT_CODE", _NF_DROP)]})]})]


def _grouped(load: dict[str, Any], version: int, l2: bool = False) -> list[dict[str, Any]]:
    """Address in register 1 is managed (and, unless `l2`, not gated for ARP/ND only) and in a
    group -> jump to its grant's chain (which drops unless the grant is alive)."""
    exempt = [] if l2 else [load, _expr("lookup", set=L2ONLY[version], sreg=1, flags={"NFT_LOOKUP_F_INV"})]
    return [load, _expr("lookup", set=MANAGED[version], sreg=1), *exempt,
            load, _expr("lookup", set=GROUP[version], sreg=1, dreg=0)]


def grant_name(gid: int) -> str:
    """The chain and set of grant `gid`."""
    return f"{GRANT_PREFIX}{gid}"


def grant_ops(gids: Iterable[int]) -> list[Op]:
    """Create each grant's set (empty: the grant is not alive) and chain with its one rule, or
    leave them as they are (idempotent; its elements are kept)."""
    ops: list[Op] = []
    for gid in gids:
        name = grant_name(gid)
        ops.append(Op(nfts.NFT_MSG_NEWSET, (
            ("NFTA_SET_TABLE", TABLE), ("NFTA_SET_NAME", name), ("NFTA_SET_FLAGS", {"NFT_SET_TIMEOUT"}),
            ("NFTA_SET_KEY_TYPE", _ETHERTYPE[0]), ("NFTA_SET_KEY_LEN", _ETHERTYPE[1]), ("NFTA_SET_ID", gid)),
            NLM_F_CREATE))
        ops.append(Op(nfts.NFT_MSG_NEWCHAIN, (("NFTA_CHAIN_TABLE", TABLE), ("NFTA_CHAIN_NAME", name)), NLM_F_CREATE))
        ops.append(Op(nfts.NFT_MSG_DELRULE, (("NFTA_RULE_TABLE", TABLE), ("NFTA_RULE_CHAIN", name))))
        exprs = [_meta(_META_PROTOCOL), _expr("lookup", set=name, sreg=1, flags={"NFT_LOOKUP_F_INV"}),
                 _expr("immediate", dreg=0, data={"attrs": [("NFTA_DATA_VERDICT", {"attrs": [
                     ("NFTA_VERDICT_CODE", _NF_DROP)]})]})]
        ops.append(Op(nfts.NFT_MSG_NEWRULE, (("NFTA_RULE_TABLE", TABLE), ("NFTA_RULE_CHAIN", name),
                                             ("NFTA_RULE_EXPRESSIONS", exprs), ("NFTA_RULE_USERDATA", "vipd grant")),
                      NLM_F_CREATE | NLM_F_APPEND))
    return ops


def rule_exprs(direction: str) -> list[tuple[str, list[dict[str, Any]]]]:
    """(comment, expressions) of every rule of an ``"in"`` or ``"out"`` chain."""
    inbound = direction == "in"
    ip4 = 16 if inbound else 12  # daddr / saddr
    arp = 24 if inbound else 14  # target / sender protocol address (Ethernet + IPv4 ARP)
    ip6 = 24 if inbound else 8
    nd = _ND_NS if inbound else _ND_NA
    nd_match = _proto("ip6") + [_meta(_META_L4PROTO), _cmp(bytes([_ICMPV6])),
                                _payload(_BASE_TRANSPORT, 0, 1), _cmp(bytes([nd]))]
    matches = [("ipv4", _proto("ip"), _payload(_BASE_NETWORK, ip4, 4), 4, False),
               ("arp", _proto("arp"), _payload(_BASE_NETWORK, arp, 4), 4, True),
               ("ipv6", _proto("ip6"), _payload(_BASE_NETWORK, ip6, 16), 6, False),
               ("nd", nd_match, _payload(_BASE_TRANSPORT, 8, 16), 6, True)]
    return ([(f"vipd fence {name}", match + _fenced(load, v, l2)) for name, match, load, v, l2 in matches]
            + [(f"vipd fence {name} grant", match + _grouped(load, v, l2)) for name, match, load, v, l2 in matches])


# -- setup batch ----------------------------------------------------------------------------


def _elems(set_name: str, elems: Optional[Sequence[dict[str, Any]]], msg_type: int) -> Op:
    attrs: list[tuple[str, Any]] = [("NFTA_SET_ELEM_LIST_TABLE", TABLE), ("NFTA_SET_ELEM_LIST_SET", set_name)]
    if elems is not None:
        attrs.append(("NFTA_SET_ELEM_LIST_ELEMENTS", list(elems)))
    return Op(msg_type, tuple(attrs), NLM_F_CREATE if msg_type == nfts.NFT_MSG_NEWSETELEM else 0)


def _key(ip: IPAddress) -> dict[str, Any]:
    return {"attrs": [("NFTA_SET_ELEM_KEY", _value(ip.packed))]}


def drop_table_ops() -> list[Op]:
    """Delete the fence table whether or not it exists (add-if-missing, then delete)."""
    name = (("NFTA_TABLE_NAME", TABLE),)
    return [Op(nfts.NFT_MSG_NEWTABLE, name, NLM_F_CREATE), Op(nfts.NFT_MSG_DELTABLE, name)]


def setup_ops(managed: Iterable[tuple[IPAddress, str]], stale_devs: Iterable[str] = (),
              l2only: Iterable[IPAddress] = (), hooked: Iterable[str] = ()) -> list[Op]:
    """One batch that makes the table exactly: sets (managed = the given VIPs, l2only = those of
    them gated for ARP/ND only), a chain pair with its rules per device of the given (VIP, device)
    pairs; chains of ``stale_devs`` are deleted. Tokens, groups and grants stay as they are (their
    sets are created if missing, never flushed). Devices in ``hooked`` already have their chain
    pair: their chains and rules are left as they are. Rewriting them made a reload's batch take
    23-27 ms (median; up to 52) instead of 4 ms at 4 VIPs, under the fence's lock, and the
    successors' grant re-arms lapsed behind it (`bench/fence.py`, "a reload's table update").
    verify() repairs a damaged chain at the next tick."""
    managed, l2only, hooked = list(managed), list(l2only), set(hooked)
    ops = [Op(nfts.NFT_MSG_NEWTABLE, (("NFTA_TABLE_NAME", TABLE), ("NFTA_TABLE_FLAGS", 0),
                                      ("NFTA_TABLE_USERDATA", TABLE_COMMENT)), NLM_F_CREATE)]
    for v in (4, 6):
        for name, flags in ((MANAGED[v], set()), (TOKEN[v], {"NFT_SET_TIMEOUT"}), (L2ONLY[v], set())):
            ops.append(Op(nfts.NFT_MSG_NEWSET, (
                ("NFTA_SET_TABLE", TABLE), ("NFTA_SET_NAME", name), ("NFTA_SET_FLAGS", flags),
                ("NFTA_SET_KEY_TYPE", _KEY[v][0]), ("NFTA_SET_KEY_LEN", _KEY[v][1]),
                ("NFTA_SET_ID", len(ops))), NLM_F_CREATE))
        ops.append(Op(nfts.NFT_MSG_NEWSET, (
            ("NFTA_SET_TABLE", TABLE), ("NFTA_SET_NAME", GROUP[v]), ("NFTA_SET_FLAGS", {"NFT_SET_MAP"}),
            ("NFTA_SET_KEY_TYPE", _KEY[v][0]), ("NFTA_SET_KEY_LEN", _KEY[v][1]),
            ("NFTA_SET_DATA_TYPE", _NFT_DATA_VERDICT), ("NFTA_SET_ID", len(ops))), NLM_F_CREATE))
        ops.append(_elems(MANAGED[v], None, nfts.NFT_MSG_DELSETELEM))  # flush, then refill: atomic
        keys = [_key(ip) for ip, _ in managed if ip.version == v]
        ops += [_elems(MANAGED[v], part, nfts.NFT_MSG_NEWSETELEM) for part in _chunks(keys)]
        ops.append(_elems(L2ONLY[v], None, nfts.NFT_MSG_DELSETELEM))
        keys = [_key(ip) for ip in l2only if ip.version == v]
        ops += [_elems(L2ONLY[v], part, nfts.NFT_MSG_NEWSETELEM) for part in _chunks(keys)]
    for dev in sorted(set(stale_devs) - {d for _, d in managed}):
        for chain in chain_names(dev):
            ops.append(Op(nfts.NFT_MSG_DELRULE, (("NFTA_RULE_TABLE", TABLE), ("NFTA_RULE_CHAIN", chain))))
            ops.append(Op(nfts.NFT_MSG_DELCHAIN, (("NFTA_CHAIN_TABLE", TABLE), ("NFTA_CHAIN_NAME", chain))))
    for dev in sorted({d for _, d in managed} - hooked):
        for chain, hook, direction in zip(chain_names(dev), (_HOOK_INGRESS, _HOOK_EGRESS), ("in", "out")):
            hook_attr = {"attrs": [("NFTA_HOOK_HOOKNUM", hook), ("NFTA_HOOK_PRIORITY", PRIORITY),
                                   ("NFTA_HOOK_DEV", dev)]}
            ops.append(Op(nfts.NFT_MSG_NEWCHAIN, (("NFTA_CHAIN_TABLE", TABLE), ("NFTA_CHAIN_NAME", chain),
                                                  ("NFTA_CHAIN_HOOK", hook_attr), ("NFTA_CHAIN_POLICY", _NF_ACCEPT),
                                                  ("NFTA_CHAIN_TYPE", "filter")), NLM_F_CREATE))
            ops.append(Op(nfts.NFT_MSG_DELRULE, (("NFTA_RULE_TABLE", TABLE), ("NFTA_RULE_CHAIN", chain))))
            for comment, exprs in rule_exprs(direction):
                ops.append(Op(nfts.NFT_MSG_NEWRULE, (("NFTA_RULE_TABLE", TABLE), ("NFTA_RULE_CHAIN", chain),
                                                     ("NFTA_RULE_EXPRESSIONS", exprs),
                                                     ("NFTA_RULE_USERDATA", comment)),
                              NLM_F_CREATE | NLM_F_APPEND))
    return ops


def encode_setup(ops: Sequence[Op]) -> list[Any]:
    """pyroute2 messages (for ``nlm_request_batch``): one begin ... end batch of the fence table."""
    return encode_batch(ops, NFPROTO_NETDEV)


def rules_per_chain() -> int:
    """Rules in each device chain (read on every reconcile tick: counted once)."""
    global _RULES_PER_CHAIN
    if _RULES_PER_CHAIN is None:
        _RULES_PER_CHAIN = len(rule_exprs("in"))
    return _RULES_PER_CHAIN


_RULES_PER_CHAIN: Optional[int] = None


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
_GRANT_KEYS = [_nla(_E_KEY | _NLA_F_NESTED, _nla(_D_VALUE, struct.pack("!H", p))) for p in _ETH_P.values()]


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


ELEMS_PER_MSG = 500  # set elements per message: a netlink attribute's length is 16 bits (~50 bytes each)

T = TypeVar("T")


def _chunks(items: Sequence[T]) -> list[Sequence[T]]:
    return [items[i:i + ELEMS_PER_MSG] for i in range(0, len(items), ELEMS_PER_MSG)]


Part = tuple[int, bytes]  # (message type, attributes) of one message of a batch


def _elements(kind: int, set_name: str, elems: Sequence[bytes]) -> list[Part]:
    head = _TABLE_ATTR + _set_attr(set_name)
    return [(kind, head + _nla(_L_ELEMENTS | _NLA_F_NESTED, b"".join(part))) for part in _chunks(elems)]


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


def kernel_has_timeout_update(release: Optional[str] = None) -> bool:
    """Element timeout update (``timeout T expires T`` on an existing element): Linux >= 6.11."""
    m = re.match(r"(\d+)\.(\d+)", release or os.uname().release)
    return m is not None and (int(m[1]), int(m[2])) >= (6, 11)

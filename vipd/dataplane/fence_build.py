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
state (create-if-missing, then flush and refill what vipd owns, or, on a reload, write the sets'
difference from what the kernel holds). Token refreshes are encoded by hand
(vipd/dataplane/fence_wire.py).
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any, Iterable, Mapping, Optional, Sequence, TypeVar, Union

from pyroute2.netlink import NLM_F_APPEND, NLM_F_CREATE
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

_KEY = {4: (7, 4), 6: (8, 16)}  # nft datatypes ipv4_addr / ipv6_addr: (type, length)
_ETHERTYPE = (10, 2)  # nft datatype ether_type: a grant set's key
_NFT_DATA_VERDICT = 0xFFFFFF00
_HOOK_INGRESS, _HOOK_EGRESS = 0, 1
_NF_ACCEPT = 1
_NF_DROP = 0
_META_PROTOCOL, _META_L4PROTO = 1, 16
_BASE_NETWORK, _BASE_TRANSPORT = 1, 2
ETH_P = {"ip": 0x0800, "arp": 0x0806, "ip6": 0x86DD}
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
    return [_meta(_META_PROTOCOL), _cmp(struct.pack("!H", ETH_P[eth]))]


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


def _key(packed: bytes) -> dict[str, Any]:
    return {"attrs": [("NFTA_SET_ELEM_KEY", _value(packed))]}


def drop_table_ops() -> list[Op]:
    """Delete the fence table whether or not it exists (add-if-missing, then delete)."""
    name = (("NFTA_TABLE_NAME", TABLE),)
    return [Op(nfts.NFT_MSG_NEWTABLE, name, NLM_F_CREATE), Op(nfts.NFT_MSG_DELTABLE, name)]


def _fill(name: str, want: Sequence[bytes], present: Optional[Mapping[str, set[bytes]]]) -> list[Op]:
    """Make set `name` hold exactly `want`: flush and refill (atomic in the batch), or, when
    `present` has its current keys, delete and add only the difference."""
    have = present.get(name) if present is not None else None
    if have is None:
        ops = [_elems(name, None, nfts.NFT_MSG_DELSETELEM)]
        add: Sequence[bytes] = want
    else:
        wanted = set(want)
        gone = sorted(have - wanted)
        ops = [_elems(name, part, nfts.NFT_MSG_DELSETELEM) for part in chunks([_key(k) for k in gone])]
        add = [k for k in want if k not in have]
    return ops + [_elems(name, part, nfts.NFT_MSG_NEWSETELEM) for part in chunks([_key(k) for k in add])]


def setup_ops(managed: Iterable[tuple[IPAddress, str]], stale_devs: Iterable[str] = (),
              l2only: Iterable[IPAddress] = (), hooked: Iterable[str] = (),
              present: Optional[Mapping[str, set[bytes]]] = None) -> list[Op]:
    """One batch that makes the table exactly: sets (managed = the given VIPs, l2only = those of
    them gated for ARP/ND only), a chain pair with its rules per device of the given (VIP, device)
    pairs; chains of ``stale_devs`` are deleted. Tokens, groups and grants stay as they are (their
    sets are created if missing, never flushed). Devices in ``hooked`` already have their chain
    pair: their chains and rules are left as they are. Rewriting them made a reload's batch take
    23-27 ms (median; up to 52) instead of 4 ms at 4 VIPs, under the fence's lock, and the
    successors' grant re-arms lapsed behind it (`bench/fence.py`, "a reload's table update").
    verify() repairs a damaged chain at the next tick. ``present``: the managed and ARP/ND-only
    sets' keys as the kernel holds them now (read in the same thread just before): only the
    difference is written: at 1,000 VIPs a reload's update then takes 8-10 ms instead of 42
    (`bench/fence.py`, "a reload's table update")."""
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
        ops += _fill(MANAGED[v], [ip.packed for ip, _ in managed if ip.version == v], present)
        ops += _fill(L2ONLY[v], [ip.packed for ip in l2only if ip.version == v], present)
    for dev in sorted(set(stale_devs) - {d for _, d in managed}):
        for chain in chain_names(dev):
            ops.append(Op(nfts.NFT_MSG_DELRULE, (("NFTA_RULE_TABLE", TABLE), ("NFTA_RULE_CHAIN", chain))))
            ops.append(Op(nfts.NFT_MSG_DELCHAIN, (("NFTA_CHAIN_TABLE", TABLE), ("NFTA_CHAIN_NAME", chain))))
    return ops + hook_ops(sorted({d for _, d in managed} - hooked))


def hook_ops(devs: Iterable[str]) -> list[Op]:
    """The chain pair of each device (ingress, egress) with its rules, made anew (the chains
    created if missing, their rules replaced). The sets they look up must exist."""
    ops: list[Op] = []
    for dev in devs:
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


def prebuild(ops: Sequence[Op]) -> list[bytes]:
    """The batch of `ops` (`encode_setup`), every message encoded now, sequence number 0: sent by
    fence_send.send_prebuilt, which numbers them. Encoding a device's chain pair with pyroute2 is
    most of a reload's table update for a new device (bench/fence.py, "a VIP on a new device in or
    out": the whole update against the lock held); done here, before the fence's lock and in a worker thread, the successors'
    grant re-arms no longer wait for it (a reload adding a VIP on a new device)."""
    out = []
    for m in encode_setup(ops):
        m["header"]["sequence_number"] = 0
        m["header"]["pid"] = 0
        m.encode()
        out.append(bytes(m.data))
    return out


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


ELEMS_PER_MSG = 500  # set elements per message: a netlink attribute's length is 16 bits (~50 bytes each)

T = TypeVar("T")


def chunks(items: Sequence[T]) -> list[Sequence[T]]:
    return [items[i:i + ELEMS_PER_MSG] for i in range(0, len(items), ELEMS_PER_MSG)]

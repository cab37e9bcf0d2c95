"""What vipd puts in its nftables table, as pure data: rules, sets, elements and batches.

Everything lives in ``table inet vipd`` (IPv4 and IPv6; vipd never touches another table): one
nat chain ``postrouting`` with the BGP rule, then one rule per egress rule::

    ip daddr @bgp_peers tcp dport 179 snat ip to SOURCE
    ip daddr @eg_web_dst ip saddr @eg_web_src tcp dport @eg_web_ports oifname "eth0" snat ip to VIP

The lease-bound part is the set ``eg_<name>_dst`` of the rule's destination prefixes (``flags
interval,timeout``; ``0.0.0.0/0`` / ``::/0`` when the rule names none). It is empty unless the
VIP is armed: :func:`lease_ops` puts the prefixes in with ``timeout T expires T`` (an element
timeout update, kernel >= 6.11, so a refresh really restarts the countdown; older kernels get a
flush + add in the same batch).

The base is rebuilt as "add table; delete table; add table ..." (:func:`base_ops`), so a restart
converges without duplicates. Messages are pyroute2's nftables message classes
(:func:`encode_batch` wraps them in one begin ... end batch). Nothing here touches the kernel;
:mod:`vipd.dataplane.nft` sends these batches.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, NamedTuple, Optional, Sequence, Union

from pyroute2.netlink import NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, nfgen_msg
from pyroute2.netlink.nfnetlink import nftsocket as nfts

from vipd.errors import NftError

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

TABLE = "vipd"
CHAIN = "postrouting"
BGP_SET = "bgp_peers"
TABLE_COMMENT = "managed by vipd; do not edit"
NFPROTO_INET, NFPROTO_IPV4, NFPROTO_IPV6 = 1, 2, 10
_NFPROTO = {4: NFPROTO_IPV4, 6: NFPROTO_IPV6}
_KEY = {4: (7, 4), 6: (8, 16)}  # nft datatypes ipv4_addr / ipv6_addr: (type, length)
_INET_SERVICE = (13, 2)
_L4 = {"tcp": 6, "udp": 17}
_DADDR = {4: (16, 4), 6: (24, 16)}  # network header offset, length
_SADDR = {4: (12, 4), 6: (8, 16)}
_META_IIFNAME, _META_OIFNAME, _META_NFPROTO, _META_L4PROTO = 6, 7, 15, 16
_HOOK_POSTROUTING, _PRIO_SRCNAT, _NF_ACCEPT = 4, 100, 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_BATCH_BEGIN, _BATCH_END = 0x10, 0x11


@dataclass(frozen=True)
class EgressRule:
    """While the host owns ``vip``, new connections matching every selector leave with ``vip`` as
    their source. Empty selectors match anything; ``dports`` needs ``proto``. Interface names
    may end in ``*`` (prefix match)."""

    name: str
    vip: IPAddress
    dst: tuple[IPNetwork, ...] = ()
    proto: Optional[str] = None  # "tcp" | "udp" | None
    dports: tuple[int, ...] = ()
    src: tuple[IPNetwork, ...] = ()
    oifname: Optional[str] = None
    iifname: Optional[str] = None  # forwarded traffic (e.g. from containers) entering here

    def __post_init__(self) -> None:
        if not isinstance(self.vip, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            why = f"vip must be an IP address, got {self.vip!r}"
        elif not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            why = f"name must match {_NAME_RE.pattern}"
        elif any(net.version != self.vip.version for net in self.dst + self.src):
            why = f"prefixes must be IPv{self.vip.version} like the VIP {self.vip}"
        elif self.proto not in (None, *_L4):
            why = f"proto must be tcp, udp or unset, got {self.proto!r}"
        elif self.dports and self.proto is None:
            why = "dports need proto tcp or udp"
        elif any(isinstance(p, bool) or not isinstance(p, int) or not 0 < p < 65536 for p in self.dports):
            why = f"ports must be 1-65535, got {self.dports!r}"
        elif any(n is not None and not 0 < len(n.rstrip("*")) <= 15 for n in (self.oifname, self.iifname)):
            why = f"bad interface name {self.oifname!r} / {self.iifname!r}"
        else:
            return
        raise NftError(f"egress rule {self.name!r}: {why}")

    def set_name(self, kind: str = "dst") -> str:
        """``eg_<name>_dst`` (the lease set), ``eg_<name>_src``, ``eg_<name>_ports``."""
        return f"eg_{self.name}_{kind}"

    def destinations(self) -> list[IPNetwork]:
        """Non-overlapping destination prefixes (the whole address space when none is given)."""
        nets = self.dst or (ipaddress.ip_network("0.0.0.0/0" if self.vip.version == 4 else "::/0"),)
        return list(ipaddress.collapse_addresses(nets))  # type: ignore[arg-type,type-var]


@dataclass(frozen=True)
class BgpSnat:
    """tcp dport 179 to ``peers`` leaves from ``source`` (the host's own fixed address: not
    lease-bound). For BGP speakers that cannot be told their update-source."""

    source: IPAddress
    peers: tuple[IPAddress, ...]

    def __post_init__(self) -> None:
        if any(p.version != self.source.version for p in self.peers):
            raise NftError(f"bgp snat: peers must be IPv{self.source.version} like {self.source}")


class Op(NamedTuple):
    """One message of a batch: its nf_tables type, attributes and extra netlink flags."""
    msg_type: int
    attrs: tuple[tuple[str, Any], ...]
    flags: int = 0


# -- pure builders --------------------------------------------------------------------------


def expr(name: str, **fields: Any) -> dict[str, Any]:
    """One netlink expression, as pyroute2 encodes it (enum fields are plain ints)."""
    data = [(f"NFTA_{name.upper()}_{k.upper()}", v) for k, v in fields.items()]
    return {"attrs": [("NFTA_EXPR_NAME", name), ("NFTA_EXPR_DATA", {"attrs": data})]}


def _value(b: bytes) -> dict[str, Any]:
    return {"attrs": [("NFTA_DATA_VALUE", b)]}


def _match(load: dict[str, Any], b: bytes) -> list[dict[str, Any]]:
    """Load into register 1, then compare it with ``b``."""
    return [load, expr("cmp", sreg=1, op=0, data=_value(b))]


def _lookup(load: dict[str, Any], set_name: str) -> list[dict[str, Any]]:
    return [load, expr("lookup", set=set_name, sreg=1)]


def _meta(key: int) -> dict[str, Any]:
    return expr("meta", dreg=1, key=key)


def _payload(base: int, offset_len: tuple[int, int]) -> dict[str, Any]:
    return expr("payload", dreg=1, base=base, offset=offset_len[0], len=offset_len[1])


def _ifname(key: int, name: str) -> list[dict[str, Any]]:
    return _match(_meta(key), name[:-1].encode() if name.endswith("*") else name.encode().ljust(16, b"\0"))


def _snat(to: IPAddress) -> list[dict[str, Any]]:
    return [expr("immediate", dreg=1, data=_value(to.packed)),
            expr("nat", type=0, family=_NFPROTO[to.version], reg_addr_min=1)]


def rule_exprs(rule: EgressRule) -> list[dict[str, Any]]:
    """The expressions of ``rule``'s line in the chain (see the module docstring)."""
    v = rule.vip.version
    out = _match(_meta(_META_NFPROTO), bytes([_NFPROTO[v]])) + _lookup(_payload(1, _DADDR[v]), rule.set_name())
    if rule.src:
        out += _lookup(_payload(1, _SADDR[v]), rule.set_name("src"))
    if rule.proto:
        out += _match(_meta(_META_L4PROTO), bytes([_L4[rule.proto]]))
    if rule.dports:
        out += _lookup(_payload(2, (2, 2)), rule.set_name("ports"))
    if rule.iifname:
        out += _ifname(_META_IIFNAME, rule.iifname)
    if rule.oifname:
        out += _ifname(_META_OIFNAME, rule.oifname)
    return out + _snat(rule.vip)


def bgp_exprs(bgp: BgpSnat) -> list[dict[str, Any]]:
    v = bgp.source.version
    return (_match(_meta(_META_NFPROTO), bytes([_NFPROTO[v]])) + _lookup(_payload(1, _DADDR[v]), BGP_SET)
            + _match(_meta(_META_L4PROTO), bytes([_L4["tcp"]])) + _match(_payload(2, (2, 2)), b"\x00\xb3")
            + _snat(bgp.source))


def interval_elems(nets: Iterable[IPNetwork], timeout_ms: Optional[int] = None) -> list[dict[str, Any]]:
    """Elements of an interval set, as nft encodes prefixes: a start element (carrying the
    timeout) and an interval-end element at the first address past the prefix; a prefix that
    reaches the top of the address space has no end (flagged open, so nft prints it as a prefix)."""
    out: list[dict[str, Any]] = []
    for net in nets:
        start: list[Any] = [("NFTA_SET_ELEM_KEY", _value(net.network_address.packed))]
        if timeout_ms is not None:
            start += [("NFTA_SET_ELEM_TIMEOUT", timeout_ms), ("NFTA_SET_ELEM_EXPIRATION", timeout_ms)]
        out.append({"attrs": start})
        end = int(net.broadcast_address) + 1
        if end >> net.max_prefixlen:  # NFTNL_SET_ELEM_F_INTERVAL_OPEN
            start.append(("NFTA_SET_ELEM_USERDATA", [("NFTNL_UDATA_SET_ELEM_FLAGS", (1).to_bytes(4, "little"))]))
        else:  # flags bit 0: NFT_SET_ELEM_INTERVAL_END
            out.append({"attrs": [("NFTA_SET_ELEM_KEY", _value(end.to_bytes(net.max_prefixlen // 8, "big"))),
                                  ("NFTA_SET_ELEM_FLAGS", frozenset({1}))]})
    return out


def _elems(set_name: str, elems: list[dict[str, Any]], msg_type: int = nfts.NFT_MSG_NEWSETELEM) -> Op:
    attrs: list[tuple[str, Any]] = [("NFTA_SET_ELEM_LIST_TABLE", TABLE), ("NFTA_SET_ELEM_LIST_SET", set_name)]
    if elems or msg_type != nfts.NFT_MSG_DELSETELEM:
        attrs.append(("NFTA_SET_ELEM_LIST_ELEMENTS", elems))
    return Op(msg_type, tuple(attrs), NLM_F_CREATE if msg_type == nfts.NFT_MSG_NEWSETELEM else 0)


def _rule(exprs: list[dict[str, Any]], comment: str) -> Op:
    # NFTA_RULE_USERDATA: pyroute2 encodes the string as a 16-bit big-endian length + text + NUL,
    # which is byte for byte nftnl's comment TLV (type 0, 8-bit length) for comments < 256 bytes.
    return Op(nfts.NFT_MSG_NEWRULE, (("NFTA_RULE_TABLE", TABLE), ("NFTA_RULE_CHAIN", CHAIN),
                                     ("NFTA_RULE_EXPRESSIONS", exprs), ("NFTA_RULE_USERDATA", comment[:200])),
              NLM_F_CREATE | NLM_F_APPEND)


def lease_ops(rules: Iterable[EgressRule], lifetime_ms: int, timeout_update: bool = True) -> list[Op]:
    """Arm (or refresh) ``rules`` until now + lifetime_ms."""
    ops: list[Op] = []
    for r in rules:
        if not timeout_update:  # kernel < 6.11: re-adding does not reset a timeout
            ops.append(_elems(r.set_name(), [], nfts.NFT_MSG_DELSETELEM))
        ops.append(_elems(r.set_name(), interval_elems(r.destinations(), lifetime_ms)))
    return ops


def disarm_ops(rules: Iterable[EgressRule]) -> list[Op]:
    """Flush ``rules``' lease sets (a flush cannot fail on elements that already expired)."""
    return [_elems(r.set_name(), [], nfts.NFT_MSG_DELSETELEM) for r in rules]


def drop_table_ops() -> list[Op]:
    """Delete vipd's table whether or not it exists (add-if-missing, then delete)."""
    name = (("NFTA_TABLE_NAME", TABLE),)
    return [Op(nfts.NFT_MSG_NEWTABLE, name, NLM_F_CREATE), Op(nfts.NFT_MSG_DELTABLE, name)]


def base_ops(rules: Sequence[EgressRule], bgp: Optional[BgpSnat],
             armed: Mapping[IPAddress, int] = {}) -> list[Op]:
    """The whole table from scratch, replacing any previous one; ``armed`` (VIP -> ms left)
    re-arms those VIPs' rules for the time they had left."""
    names = [r.name for r in rules]
    if len(set(names)) != len(names):
        raise NftError(f"egress rule names must be unique: {names}")
    ops = drop_table_ops() + [Op(nfts.NFT_MSG_NEWTABLE, (
        ("NFTA_TABLE_NAME", TABLE), ("NFTA_TABLE_FLAGS", 0), ("NFTA_TABLE_USERDATA", TABLE_COMMENT)), NLM_F_CREATE)]

    def new_set(name: str, key: tuple[int, int], flags: Iterable[str] = (), comment: str = "") -> Op:
        attrs = [("NFTA_SET_TABLE", TABLE), ("NFTA_SET_NAME", name), ("NFTA_SET_FLAGS", set(flags)),
                 ("NFTA_SET_KEY_TYPE", key[0]), ("NFTA_SET_KEY_LEN", key[1]), ("NFTA_SET_ID", len(ops))]
        if comment:
            attrs.append(("NFTA_SET_USERDATA", [("NFTNL_UDATA_SET_COMMENT", comment)]))
        return Op(nfts.NFT_MSG_NEWSET, tuple(attrs), NLM_F_CREATE)

    rule_ops = []
    if bgp is not None and bgp.peers:
        ops += [new_set(BGP_SET, _KEY[bgp.source.version]),
                _elems(BGP_SET, [{"attrs": [("NFTA_SET_ELEM_KEY", _value(p.packed))]} for p in bgp.peers])]
        rule_ops.append(_rule(bgp_exprs(bgp), "vipd bgp source"))
    for r in rules:
        key = _KEY[r.vip.version]
        ops.append(new_set(r.set_name(), key, flags=("NFT_SET_INTERVAL", "NFT_SET_TIMEOUT"), comment=f"vip {r.vip}"))
        if r.vip in armed and armed[r.vip] > 0:
            ops += lease_ops([r], armed[r.vip])
        if r.src:
            src = interval_elems(ipaddress.collapse_addresses(r.src))  # type: ignore[arg-type,type-var]
            ops += [new_set(r.set_name("src"), key, flags=("NFT_SET_INTERVAL",)), _elems(r.set_name("src"), src)]
        if r.dports:
            ports = [{"attrs": [("NFTA_SET_ELEM_KEY", _value(p.to_bytes(2, "big")))]} for p in sorted(set(r.dports))]
            ops += [new_set(r.set_name("ports"), _INET_SERVICE), _elems(r.set_name("ports"), ports)]
        rule_ops.append(_rule(rule_exprs(r), f"vipd egress {r.name}"))
    hook = {"attrs": [("NFTA_HOOK_HOOKNUM", _HOOK_POSTROUTING), ("NFTA_HOOK_PRIORITY", _PRIO_SRCNAT)]}
    ops.append(Op(nfts.NFT_MSG_NEWCHAIN, (("NFTA_CHAIN_TABLE", TABLE), ("NFTA_CHAIN_NAME", CHAIN),
                                          ("NFTA_CHAIN_HOOK", hook), ("NFTA_CHAIN_POLICY", _NF_ACCEPT),
                                          ("NFTA_CHAIN_TYPE", "nat")), NLM_F_CREATE))
    return ops + rule_ops


def encode_batch(ops: Sequence[Op], family: int = NFPROTO_INET) -> list[Any]:
    """pyroute2 messages: batch begin, every op (each asks for an ack), batch end. Shared by vipd's
    inet table (nft.py) and its netdev fence table (fence_nft.py, family NFPROTO_NETDEV)."""

    def marker(t: int) -> nfgen_msg:
        m = nfgen_msg()
        m["res_id"] = NFNL_SUBSYS_NFTABLES
        m["header"]["type"] = t
        m["header"]["flags"] = NLM_F_REQUEST
        return m

    msgs = [marker(_BATCH_BEGIN)]
    for op in ops:
        m = nfts.AsyncNFTSocket.policy[op.msg_type]()
        m["attrs"] = [list(a) for a in op.attrs]
        m["nfgen_family"] = family
        m["header"]["type"] = (NFNL_SUBSYS_NFTABLES << 8) | op.msg_type
        m["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | op.flags
        msgs.append(m)
    return msgs + [marker(_BATCH_END)]


def kernel_has_timeout_update(release: Optional[str] = None) -> bool:
    """Element timeout update (``timeout T expires T`` on an existing element): Linux >= 6.11."""
    m = re.match(r"(\d+)\.(\d+)", release or os.uname().release)
    return m is not None and (int(m[1]), int(m[2])) >= (6, 11)

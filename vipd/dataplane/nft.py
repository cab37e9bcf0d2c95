"""Egress SNAT that follows ownership, and the BGP source SNAT, in vipd's own nftables table.

Everything lives in ``table inet vipd`` (IPv4 and IPv6; vipd never touches another table): one
nat chain ``postrouting`` with the BGP rule, then one rule per egress rule::

    ip daddr @bgp_peers tcp dport 179 snat ip to SOURCE
    ip daddr @eg_web_dst ip saddr @eg_web_src tcp dport @eg_web_ports oifname "eth0" snat ip to VIP

The lease-bound part is the set ``eg_<name>_dst`` of the rule's destination prefixes (``flags
interval,timeout``; ``0.0.0.0/0`` / ``::/0`` when the rule names none). It is empty unless the
VIP is armed: :meth:`NftManager.arm` puts the prefixes in with ``timeout T expires T`` (an element
timeout update, kernel >= 6.11, so a refresh really restarts the countdown; older kernels get a
flush + add in the same batch). If vipd stops refreshing, the kernel expires the elements and the
rule stops matching by itself - the same fence as the address lifetime, in milliseconds.

Every change is ONE atomic nfnetlink batch (begin ... end). The base is rebuilt as "add table;
delete table; add table ...", so a restart converges without duplicates; armed elements are
carried over with their remaining time (never extended). Messages are pyroute2's nftables message
classes, sent on an ``NFTables`` socket opened and used only in the Netlink owner thread, in its
netns. The builders (``rule_exprs``, ``base_ops``, ...) are pure and unit-tested.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, NamedTuple, Optional, Sequence, Union

from pyroute2.netlink import NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, nfgen_msg
from pyroute2.netlink.nfnetlink import nftsocket as nfts
from pyroute2.nftables.main import NFTables

from vipd.dataplane.netlink import Netlink, _setns, netlink_error_text, netns_path
from vipd.errors import DataplaneError

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
_ENOENT = 2
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_BATCH_BEGIN, _BATCH_END = 0x10, 0x11


class NftError(DataplaneError):
    """Programming vipd's nftables table failed, or an egress rule cannot be expressed."""


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
        return list(ipaddress.collapse_addresses(nets))  # type: ignore[arg-type]


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
            src = interval_elems(ipaddress.collapse_addresses(r.src))  # type: ignore[arg-type]
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


def encode_batch(ops: Sequence[Op]) -> list[Any]:
    """pyroute2 messages: batch begin, every op (each asks for an ack), batch end."""

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
        m["nfgen_family"] = NFPROTO_INET
        m["header"]["type"] = (NFNL_SUBSYS_NFTABLES << 8) | op.msg_type
        m["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | op.flags
        msgs.append(m)
    return msgs + [marker(_BATCH_END)]


def kernel_has_timeout_update(release: Optional[str] = None) -> bool:
    """Element timeout update (``timeout T expires T`` on an existing element): Linux >= 6.11."""
    m = re.match(r"(\d+)\.(\d+)", release or os.uname().release)
    return bool(m) and (int(m[1]), int(m[2])) >= (6, 11)


# -- the manager ----------------------------------------------------------------------------


def _open_nft(netns: Optional[str]) -> NFTables:
    """An nfnetlink socket in ``netns`` (None: this thread's netns). Owner thread only."""
    if netns is None:
        return NFTables(nfgen_family=NFPROTO_INET)
    with open("/proc/thread-self/ns/net", "rb") as home, open(netns_path(netns), "rb") as target:
        _setns(target.fileno())
        try:
            return NFTables(nfgen_family=NFPROTO_INET)
        finally:
            _setns(home.fileno())


class NftManager:
    """vipd's nftables table in ``nl``'s netns; every call is one job in ``nl``'s owner thread.

    Use as ``async with NftManager(nl) as nft:`` inside ``async with Netlink(...)`` (the socket
    is opened at first use and closed on exit). ``arm``/``disarm`` act on the rules given to the
    last successful :meth:`ensure_base`.
    """

    def __init__(self, nl: Netlink, *, timeout_update: Optional[bool] = None) -> None:
        self.nl = nl
        self.timeout_update = kernel_has_timeout_update() if timeout_update is None else timeout_update
        self._nft: Optional[NFTables] = None  # touched only in the owner thread
        self._rules: Optional[tuple[EgressRule, ...]] = None
        self._bgp: Optional[BgpSnat] = None

    async def __aenter__(self) -> "NftManager":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the socket (in the owner thread; here if that thread is already gone)."""

        def job(_ipr: Any = None) -> None:
            nft, self._nft = self._nft, None
            if nft is not None:
                nft.close()

        try:
            await self.nl.call(job)
        except DataplaneError:  # the Netlink was closed first
            job()

    async def _run(self, what: str, fn: Any) -> Any:
        def job(_ipr: Any) -> Any:
            if self._nft is None:
                self._nft = _open_nft(self.nl.netns)
            return fn(self._nft)

        try:
            return await self.nl.call(job)
        except NetlinkError as e:
            raise NftError(f"{what}: {netlink_error_text(e)}") from None
        except OSError as e:
            raise NftError(f"{what}: {e}") from None

    def _vip_rules(self, vips: tuple[IPAddress, ...]) -> list[EgressRule]:
        if self._rules is None:
            raise NftError("nftables: ensure_base() has not run yet")
        return [r for r in self._rules if r.vip in vips]

    async def ensure_base(self, rules: Sequence[EgressRule], bgp: Optional[BgpSnat] = None) -> None:
        """(Re)build the whole table in one batch; VIPs armed now stay armed for their time left."""
        rules = tuple(rules)
        base_ops(rules, bgp)  # validate before touching the kernel

        def job(nft: NFTables) -> None:
            left = _armed(nft)
            nft.nlm_request_batch(encode_batch(base_ops(rules, bgp, left)))
            self._rules, self._bgp = rules, bgp

        await self._run(f"build table inet {TABLE}", job)

    async def arm(self, vip: Union[IPAddress, Iterable[IPAddress]], lifetime_ms: int) -> None:
        """The egress rules of ``vip`` (one VIP, or several in one batch: a group) apply until
        now + lifetime_ms; a refresh restarts the countdown, never keeps a longer one. A deleted
        table is rebuilt (from the last ensure_base) in one batch. No rules for it: nothing to do."""
        vips, shown = _vips(vip)
        if isinstance(lifetime_ms, bool) or not isinstance(lifetime_ms, int) or not 0 < lifetime_ms < 1 << 40:
            raise NftError(f"arm {shown}: lifetime must be whole milliseconds >= 1, got {lifetime_ms!r}")

        def job(nft: NFTables) -> None:
            rules = self._vip_rules(vips)
            if not rules:
                return
            try:
                nft.nlm_request_batch(encode_batch(lease_ops(rules, lifetime_ms, self.timeout_update)))
            except NetlinkError as e:
                if e.code != _ENOENT:  # table or set gone (e.g. `nft flush ruleset`): rebuild
                    raise
                left = {**_armed(nft), **{v: lifetime_ms for v in vips}}
                nft.nlm_request_batch(encode_batch(base_ops(self._rules or (), self._bgp, left)))

        await self._run(f"arm egress rules of {shown}", job)

    async def disarm(self, vip: Union[IPAddress, Iterable[IPAddress]]) -> None:
        """The egress rules of ``vip`` (one or several) stop applying to new connections at once
        (connections already translated keep their conntrack entry). A missing table or set
        counts as disarmed."""
        vips, shown = _vips(vip)

        def job(nft: NFTables) -> None:
            rules = self._vip_rules(vips)
            if rules:
                try:
                    nft.nlm_request_batch(encode_batch(disarm_ops(rules)))
                except NetlinkError as e:
                    if e.code != _ENOENT:
                        raise

        await self._run(f"disarm egress rules of {shown}", job)

    async def remove_all(self) -> None:
        """Delete vipd's table (cleanup). Never touches another table; absent is fine."""

        def job(nft: NFTables) -> None:
            nft.nlm_request_batch(encode_batch(drop_table_ops()))
            self._rules = None

        await self._run(f"delete table inet {TABLE}", job)

    async def armed(self) -> dict[IPAddress, int]:
        """VIP -> milliseconds until its first armed element expires, read from the kernel."""
        return await self._run("read armed egress rules", _armed)


def _vips(vip: Union[IPAddress, Iterable[IPAddress]]) -> tuple[tuple[IPAddress, ...], str]:
    vips = (vip,) if isinstance(vip, (ipaddress.IPv4Address, ipaddress.IPv6Address)) else tuple(vip)
    return vips, ", ".join(map(str, vips))


def _armed(nft: NFTables) -> dict[IPAddress, int]:
    msg = nfts.nft_set_msg()
    msg["attrs"] = [("NFTA_SET_TABLE", TABLE)]
    try:
        sets = nft.request_get(msg, nfts.NFT_MSG_GETSET)
    except NetlinkError as e:
        if e.code == _ENOENT:
            return {}
        raise
    out: dict[IPAddress, int] = {}
    for s in sets:
        name = s.get_attr("NFTA_SET_NAME")
        comment = dict(s.get_attr("NFTA_SET_USERDATA") or []).get("NFTNL_UDATA_SET_COMMENT", b"")
        if s.get_attr("NFTA_SET_TABLE") != TABLE or not name.startswith("eg_") or not name.endswith("_dst"):
            continue
        try:
            vip = ipaddress.ip_address(bytes(comment).decode().removeprefix("vip "))
        except ValueError:
            continue
        req = nfts.nft_set_elem_list_msg()
        req["attrs"] = [("NFTA_SET_ELEM_LIST_TABLE", TABLE), ("NFTA_SET_ELEM_LIST_SET", name)]
        for m in nft.request_get(req, nfts.NFT_MSG_GETSETELEM):
            for el in m.get_attr("NFTA_SET_ELEM_LIST_ELEMENTS") or []:
                left = el.get_attr("NFTA_SET_ELEM_EXPIRATION")
                if left is not None:
                    out[vip] = min(left, out.get(vip, left))
    return out

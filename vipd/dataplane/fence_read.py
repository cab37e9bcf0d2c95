"""Reading the fence table back: which chains exist, and whether the table is whole.

Both run in the Netlink owner thread with its pyroute2 ``NFTables`` socket (the caller's); a
missing table reads as "not whole", never as an error.
"""

from __future__ import annotations

import socket
import struct
from typing import Iterable, Iterator, Optional

from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES
from pyroute2.netlink.nfnetlink import nftsocket as nfts
from pyroute2.nftables.main import NFTables

from vipd.dataplane import nldump
from vipd.dataplane.fence_build import (GROUP, L2ONLY, MANAGED, TABLE, TOKEN, IPAddress, chain_names, grant_name,
                                        rules_per_chain)

_ENOENT = 2


def dump_chains(nft: NFTables) -> dict[str, Optional[str]]:
    """Chain name -> hooked device (None: a grant's chain), for the fence table's chains."""
    msg = nfts.nft_chain_msg()
    msg["attrs"] = [("NFTA_CHAIN_TABLE", TABLE)]
    out: dict[str, Optional[str]] = {}
    for c in nft.request_get(msg, nfts.NFT_MSG_GETCHAIN):
        if c.get_attr("NFTA_CHAIN_TABLE") != TABLE:
            continue
        hook = c.get_attr("NFTA_CHAIN_HOOK")
        out[c.get_attr("NFTA_CHAIN_NAME")] = hook.get_attr("NFTA_HOOK_DEV") if hook is not None else None
    return out


_NFT_GETSETELEM, _NFT_NEWSETELEM = (NFNL_SUBSYS_NFTABLES << 8) | 13, (NFNL_SUBSYS_NFTABLES << 8) | 12
_NFPROTO_NETDEV = 5
_RTA = struct.Struct("=HH")
_L_TABLE, _L_SET, _L_ELEMENTS, _LIST_ELEM = 1, 2, 3, 1
_E_KEY, _D_VALUE = 1, 1  # NFTA_SET_ELEM_KEY, NFTA_DATA_VALUE


def _nla(kind: int, payload: bytes) -> bytes:
    n = _RTA.size + len(payload)
    return _RTA.pack(n, kind) + payload + b"\0" * (-n & 3)


def _element_lists(sock: socket.socket, seq: int, set_name: str) -> Iterator[tuple[bytes, int, int]]:
    """(data, start, end) of every NFTA_SET_ELEM_LIST_ELEMENTS attribute of one raw
    NFT_MSG_GETSETELEM dump of the fence table's set. OSError (ENOENT: no table or set) as the
    kernel answers."""
    body = (struct.pack("!BBH", _NFPROTO_NETDEV, 0, 0) + _nla(_L_TABLE, TABLE.encode() + b"\0")
            + _nla(_L_SET, set_name.encode() + b"\0"))
    request = lambda n: nldump.header(len(body), _NFT_GETSETELEM, nldump.NLM_F_REQUEST | nldump.NLM_F_DUMP, n) + body  # noqa: E731
    for kind, data, start, end in nldump.dump(sock, request, f"NFT_MSG_GETSETELEM {set_name}", seq=seq):
        if kind != _NFT_NEWSETELEM:
            continue
        for atype, a0, a1 in nldump.attrs(data, start + 4, end):  # after struct nfgenmsg
            if atype == _L_ELEMENTS:
                yield data, a0, a1


def count_elements(sock: socket.socket, seq: int, set_name: str) -> int:
    """How many elements the fence table's set holds, counted with struct (pyroute2 decodes every
    element: ~20 us each, thousands every reconcile tick)."""
    return sum(1 for data, a0, a1 in _element_lists(sock, seq, set_name)
               for etype, _, _ in nldump.attrs(data, a0, a1) if etype == _LIST_ELEM)


def element_keys(sock: socket.socket, seq: int, set_name: str) -> set[bytes]:
    """The keys (packed addresses) of the fence table's set `set_name`."""
    out: set[bytes] = set()
    for data, a0, a1 in _element_lists(sock, seq, set_name):
        for etype, e0, e1 in nldump.attrs(data, a0, a1):
            if etype != _LIST_ELEM:
                continue
            for ktype, k0, k1 in nldump.attrs(data, e0, e1):
                if ktype == _E_KEY:
                    out.update(data[v0:v1] for vtype, v0, v1 in nldump.attrs(data, k0, k1) if vtype == _D_VALUE)
    return out


def is_whole(nft: NFTables, vips: Iterable[tuple[IPAddress, str]], l2only: Iterable[IPAddress] = (),
             raw: Optional[tuple[socket.socket, int]] = None, grants: Iterable[int] = (),
             members: Iterable[IPAddress] = ()) -> bool:
    """Every chain hooked to its device with every rule, the managed and ARP/ND-only sets complete,
    the token set present and the group maps holding exactly `members`' count, for these (VIP,
    device) pairs; each grant of `grants` with its chain, rule and set. `raw`: a plain NETLINK_NETFILTER socket of the same
    netns and a first sequence number, to count set elements without pyroute2's decoding."""
    managed = dict(vips)
    l2, grouped = list(l2only), list(members)
    try:
        chains = dump_chains(nft)
        want = {c: dev for dev in set(managed.values()) for c in chain_names(dev)}
        if any(chains.get(c) != dev for c, dev in want.items()):
            return False
        granted = [grant_name(g) for g in grants]
        if any(name not in chains for name in granted):
            return False
        msg = nfts.nft_rule_msg()
        msg["attrs"] = [("NFTA_RULE_TABLE", TABLE)]
        count: dict[str, int] = {}
        for r in nft.request_get(msg, nfts.NFT_MSG_GETRULE):
            if r.get_attr("NFTA_RULE_TABLE") == TABLE:
                name = r.get_attr("NFTA_RULE_CHAIN")
                count[name] = count.get(name, 0) + 1
        if any(count.get(c, 0) != rules_per_chain() for c in want) or any(count.get(c, 0) != 1 for c in granted):
            return False
        for v in (4, 6):
            for i, (name, want_n) in enumerate(((MANAGED[v], sum(1 for ip in managed if ip.version == v)),
                                                (L2ONLY[v], sum(1 for ip in l2 if ip.version == v)),
                                                (GROUP[v], sum(1 for ip in grouped if ip.version == v)))):
                got = _count(nft, raw, 12 * (v == 6) + 4 * i, name)
                if got != want_n:  # (None: no such set)
                    return False
        for i, name in enumerate((TOKEN[4], TOKEN[6], *granted)):  # must exist (may be empty)
            if _count(nft, raw, 24 + 4 * i, name) is None:
                return False
    except NetlinkError as e:
        if e.code == _ENOENT:
            return False
        raise
    return True


def read_sets(sock: socket.socket, first: int, names: Iterable[str]) -> dict[str, set[bytes]]:
    """The keys of each fence set of `names` that exists (sequence numbers from `first`, 4 per
    dump)."""
    out = {}
    for i, name in enumerate(names):
        try:
            out[name] = element_keys(sock, first + 4 * i, name)
        except OSError as e:
            if e.errno != _ENOENT:
                raise
    return out


def _count(nft: NFTables, raw: Optional[tuple[socket.socket, int]], offset: int, name: str) -> Optional[int]:
    """Elements in the fence table's set `name` (None: no such set or table): counted raw on
    `raw`'s socket at sequence number first + `offset`, else through pyroute2."""
    if raw is not None:
        try:
            return count_elements(raw[0], raw[1] + offset, name)
        except OSError as e:
            if e.errno == _ENOENT:
                return None
            raise
    req = nfts.nft_set_elem_list_msg()
    req["attrs"] = [("NFTA_SET_ELEM_LIST_TABLE", TABLE), ("NFTA_SET_ELEM_LIST_SET", name)]
    try:
        return sum(len(m.get_attr("NFTA_SET_ELEM_LIST_ELEMENTS") or [])
                   for m in nft.request_get(req, nfts.NFT_MSG_GETSETELEM))
    except NetlinkError as e:
        if e.code == _ENOENT:
            return None
        raise

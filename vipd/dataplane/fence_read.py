"""Reading the fence table back: which chains exist, and whether the table is whole.

Both run in the Netlink owner thread with its pyroute2 ``NFTables`` socket (the caller's); a
missing table reads as "not whole", never as an error.
"""

from __future__ import annotations

from typing import Iterable, Optional

from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink import nftsocket as nfts
from pyroute2.nftables.main import NFTables

from vipd.dataplane.fence_build import L2ONLY, MANAGED, TABLE, TOKEN, IPAddress, chain_names, rules_per_chain

_ENOENT = 2


def dump_chains(nft: NFTables) -> dict[str, Optional[str]]:
    """Chain name -> hooked device, for the fence table's chains."""
    msg = nfts.nft_chain_msg()
    msg["attrs"] = [("NFTA_CHAIN_TABLE", TABLE)]
    out: dict[str, Optional[str]] = {}
    for c in nft.request_get(msg, nfts.NFT_MSG_GETCHAIN):
        if c.get_attr("NFTA_CHAIN_TABLE") != TABLE:
            continue
        hook = c.get_attr("NFTA_CHAIN_HOOK")
        out[c.get_attr("NFTA_CHAIN_NAME")] = hook.get_attr("NFTA_HOOK_DEV") if hook is not None else None
    return out


def is_whole(nft: NFTables, vips: Iterable[tuple[IPAddress, str]], l2only: Iterable[IPAddress] = ()) -> bool:
    """Every chain hooked to its device with every rule, and the managed and ARP/ND-only sets
    complete, for these (VIP, device) pairs."""
    managed = dict(vips)
    l2 = list(l2only)
    try:
        chains = dump_chains(nft)
        want = {c: dev for dev in set(managed.values()) for c in chain_names(dev)}
        if any(chains.get(c) != dev for c, dev in want.items()):
            return False
        msg = nfts.nft_rule_msg()
        msg["attrs"] = [("NFTA_RULE_TABLE", TABLE)]
        count: dict[str, int] = {}
        for r in nft.request_get(msg, nfts.NFT_MSG_GETRULE):
            if r.get_attr("NFTA_RULE_TABLE") == TABLE:
                name = r.get_attr("NFTA_RULE_CHAIN")
                count[name] = count.get(name, 0) + 1
        if any(count.get(c, 0) != rules_per_chain() for c in want):
            return False
        for v in (4, 6):
            for name, want_n in ((MANAGED[v], sum(1 for ip in managed if ip.version == v)),
                                 (L2ONLY[v], sum(1 for ip in l2 if ip.version == v))):
                req = nfts.nft_set_elem_list_msg()
                req["attrs"] = [("NFTA_SET_ELEM_LIST_TABLE", TABLE), ("NFTA_SET_ELEM_LIST_SET", name)]
                got = sum(len(m.get_attr("NFTA_SET_ELEM_LIST_ELEMENTS") or [])
                          for m in nft.request_get(req, nfts.NFT_MSG_GETSETELEM))
                if got != want_n:
                    return False
            req = nfts.nft_set_elem_list_msg()  # the token set must exist (it may be empty)
            req["attrs"] = [("NFTA_SET_ELEM_LIST_TABLE", TABLE), ("NFTA_SET_ELEM_LIST_SET", TOKEN[v])]
            nft.request_get(req, nfts.NFT_MSG_GETSETELEM)
    except NetlinkError as e:
        if e.code == _ENOENT:
            return False
        raise
    return True

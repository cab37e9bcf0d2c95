"""Egress SNAT that follows ownership, and the BGP source SNAT, in vipd's own nftables table.

The table layout and every message are built in :mod:`vipd.dataplane.nft_build`; this module
sends them. :meth:`NftManager.arm` puts a VIP's egress destinations in its lease set with a
timeout: if vipd stops refreshing, the kernel expires the elements and the rule stops matching by
itself - the same fence as the address lifetime, in milliseconds.

Every change is ONE atomic nfnetlink batch (begin ... end); a rebuild carries armed elements over
with their remaining time (never extended). The ``NFTables`` socket is opened and used only in
the Netlink owner thread, in its netns.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Iterable, Optional, Sequence, Union

from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink import nftsocket as nfts
from pyroute2.nftables.main import NFTables

from vipd.dataplane.netlink import Netlink, enter_netns
from vipd.dataplane.nft_build import (NFPROTO_INET, TABLE, BgpSnat, EgressRule, IPAddress, base_ops, disarm_ops,
                                     drop_table_ops, encode_batch, kernel_has_timeout_update, lease_ops)
from vipd.errors import DataplaneError, NftError

__all__ = ["BgpSnat", "EgressRule", "NftError", "NftManager"]  # the builders: vipd.dataplane.nft_build

_ENOENT = 2


def _open_nft(netns: Optional[str]) -> NFTables:
    """An nfnetlink socket in ``netns`` (None: this thread's netns). Owner thread only."""
    with enter_netns(netns):
        return NFTables(nfgen_family=NFPROTO_INET)


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

        return await self.nl.call_checked(what, job, NftError)

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

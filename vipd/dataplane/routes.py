"""Host routes to the BGP peers with ``prefsrc`` = the host's fixed BGP source address.

``route replace PEER/32 [via GW] dev DEV prefsrc SOURCE proto 0x56`` in the main table makes the
kernel pick SOURCE for sockets that connect to PEER without binding (so the speaker's own socket
is bound to it, which TCP-MD5/AO and update-source checks need; an SNAT would not be). The
gateway and device are copied from the route the main table resolves PEER with, ignoring vipd's
own routes (longest prefix, then lowest metric; multipath next hops are copied as they are).

Ownership: every route vipd installs carries rtm_protocol ROUTE_PROTO; vipd never replaces or
deletes a route without it (deletes name the protocol, so the kernel itself skips others). A
foreign route to exactly PEER/32 is refused, not overwritten.

The kernel refuses (EINVAL) a prefsrc that is not on a local interface, and deletes these routes
when SOURCE goes away without restoring them: call :meth:`SourceRoutes.ensure` again after the
address is (re)added, and from the periodic reconcile (:meth:`SourceRoutes.missing` is the
cheap check). ``ensure`` runs as one job in the Netlink owner thread.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from vipd.dataplane.netlink import Netlink, netlink_error_text
from vipd.errors import RouteError

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

ROUTE_PROTO = 0x56  # the same tag as vipd's addresses (IFA_PROTO); `ip route` prints "proto 86"
MAIN_TABLE = 254
_RTN_UNICAST = 1
_SCOPE_UNIVERSE, _SCOPE_LINK = 0, 253
_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
_ENOENT, _ESRCH, _EINVAL, _ENETUNREACH = 2, 3, 22, 101


@dataclass(frozen=True)
class SourceRoute:
    """One of vipd's routes as found in the kernel."""

    peer: IPAddress
    source: Optional[IPAddress]  # its prefsrc
    gateway: Optional[IPAddress]
    oif: Optional[int]


@dataclass(frozen=True)
class _Route:
    """One main-table route, reduced to what matters here."""

    dst: Any  # ip_network
    proto: int
    metric: int
    scope: int
    gateway: Optional[str]
    oif: Optional[int]
    prefsrc: Optional[str]
    multipath: Optional[tuple[tuple[Optional[str], int, int], ...]]  # (gateway, oif, hops)

    @property
    def ours(self) -> bool:
        return self.proto == ROUTE_PROTO

    def nexthop(self) -> tuple[Any, ...]:
        return (self.gateway, self.oif, self.multipath)


def _parse(msg: Any) -> Optional[_Route]:
    if msg["type"] != _RTN_UNICAST or (msg.get_attr("RTA_TABLE") or msg["table"]) != MAIN_TABLE:
        return None
    family = msg["family"]
    dst = msg.get_attr("RTA_DST") or ("0.0.0.0" if family == socket.AF_INET else "::")
    mp = msg.get_attr("RTA_MULTIPATH")
    return _Route(
        dst=ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False),
        proto=msg["proto"],
        metric=msg.get_attr("RTA_PRIORITY") or 0,
        scope=msg["scope"],
        gateway=msg.get_attr("RTA_GATEWAY"),
        oif=msg.get_attr("RTA_OIF"),
        prefsrc=msg.get_attr("RTA_PREFSRC"),
        multipath=tuple((nh.get_attr("RTA_GATEWAY"), nh["oif"], nh["hops"]) for nh in mp) if mp else None,
    )


def _main_routes(ipr: IPRoute, version: int) -> list[_Route]:
    out = [_parse(m) for m in ipr.route("dump", family=_FAMILY[version])]
    return [r for r in out if r is not None]


def _host(peer: IPAddress) -> Any:
    return ipaddress.ip_network(f"{peer}/{peer.max_prefixlen}")


def _resolve(routes: list[_Route], peer: IPAddress) -> Optional[_Route]:
    """The main table's route to ``peer`` when vipd's own routes are left out."""
    cands = [r for r in routes if not r.ours and peer in r.dst]
    if not cands:
        return None
    return max(cands, key=lambda r: (r.dst.prefixlen, -r.metric))


class SourceRoutes:
    """Installs, checks and removes vipd's prefsrc routes through one Netlink owner thread."""

    def __init__(self, nl: Netlink) -> None:
        self.nl = nl

    async def ensure(self, peers: Iterable[IPAddress], source: IPAddress) -> None:
        """Make vipd's routes exactly: one per peer, via what the main table resolves, prefsrc
        ``source``. Routes already right are left alone; vipd's routes to other destinations (of
        either family) are deleted. Every peer is tried; then RouteError names the failures
        (no route to a peer, a foreign route to PEER/32, ``source`` not on a local interface)."""
        wanted = sorted(set(peers), key=lambda p: (p.version, p.packed))
        if any(p.version != source.version for p in wanted):
            raise RouteError(f"source routes: peers must be IPv{source.version} like the source {source}")

        def job(ipr: IPRoute) -> None:
            failures: list[str] = []
            for version in (4, 6):
                routes = _main_routes(ipr, version)
                keep = {_host(p) for p in wanted if p.version == version}
                for r in routes:
                    if r.ours and r.dst not in keep:
                        _delete(ipr, r)
                for peer in (p for p in wanted if p.version == version):
                    try:
                        _install(ipr, routes, peer, source)
                    except RouteError as e:
                        failures.append(str(e))
            if failures:
                raise RouteError("; ".join(failures))

        await self.nl.call_checked(f"source routes via {source}", job, RouteError)

    async def missing(self, peers: Iterable[IPAddress], source: IPAddress) -> list[IPAddress]:
        """The peers that have no route of vipd's with prefsrc ``source`` (e.g. after the kernel
        deleted them with the address). Next hops are not compared: ``ensure`` does that."""
        have = {(r.peer, r.source) for r in await self.installed()}
        return [p for p in peers if (p, source) not in have]

    async def installed(self) -> list[SourceRoute]:
        """Every route vipd installed (main table, both families)."""

        def job(ipr: IPRoute) -> list[SourceRoute]:
            out = []
            for version in (4, 6):
                for r in _main_routes(ipr, version):
                    if r.ours and r.dst.prefixlen == r.dst.max_prefixlen:
                        out.append(SourceRoute(
                            peer=r.dst.network_address,
                            source=ipaddress.ip_address(r.prefsrc) if r.prefsrc else None,
                            gateway=ipaddress.ip_address(r.gateway) if r.gateway else None,
                            oif=r.oif,
                        ))
            return out

        return await self.nl.call_checked("list source routes", job, RouteError)

    async def remove_all(self) -> None:
        """Delete every route vipd installed in the main table; nothing else."""

        def job(ipr: IPRoute) -> None:
            for version in (4, 6):
                for r in _main_routes(ipr, version):
                    if r.ours:
                        _delete(ipr, r)

        await self.nl.call_checked("remove source routes", job, RouteError)


def _install(ipr: IPRoute, routes: list[_Route], peer: IPAddress, source: IPAddress) -> None:
    host = _host(peer)
    foreign = [r for r in routes if r.dst == host and not r.ours]
    if foreign:
        raise RouteError(f"{peer}: a route to {host} without vipd's tag exists (proto {foreign[0].proto}); "
                         "refusing to replace it")
    base = _resolve(routes, peer)
    if base is None:
        raise RouteError(f"{peer}: the main table has no route to it")
    current = [r for r in routes if r.dst == host and r.ours]
    if (len(current) == 1 and current[0].nexthop() == base.nexthop()
            and current[0].prefsrc is not None and ipaddress.ip_address(current[0].prefsrc) == source):
        return  # already right
    kwargs: dict[str, Any] = {}
    if base.multipath:
        kwargs["multipath"] = [{"gateway": gw, "oif": oif, "hops": hops} if gw else {"oif": oif, "hops": hops}
                               for gw, oif, hops in base.multipath]
    else:
        kwargs["oif"] = base.oif
        if base.gateway:
            kwargs["gateway"] = base.gateway
    scope = _SCOPE_UNIVERSE if base.gateway or base.multipath else _SCOPE_LINK
    try:
        ipr.route("replace", dst=str(peer), dst_len=peer.max_prefixlen, table=MAIN_TABLE, proto=ROUTE_PROTO,
                  scope=scope, prefsrc=str(source), type=_RTN_UNICAST, **kwargs)
    except NetlinkError as e:
        if e.code == _EINVAL:
            raise RouteError(f"{peer}: the kernel refused prefsrc {source} (is it on a local interface?): "
                             f"{netlink_error_text(e)}") from None
        raise RouteError(f"{peer}: {netlink_error_text(e)}") from None


def _delete(ipr: IPRoute, r: _Route) -> None:
    """Delete one of our routes; the protocol in the request makes the kernel skip any other."""
    try:
        ipr.route("del", dst=str(r.dst.network_address), dst_len=r.dst.prefixlen, table=MAIN_TABLE,
                  proto=ROUTE_PROTO, priority=r.metric, scope=r.scope, family=_FAMILY[r.dst.version])
    except NetlinkError as e:
        if e.code not in (_ENOENT, _ESRCH, _ENETUNREACH):  # already gone
            raise

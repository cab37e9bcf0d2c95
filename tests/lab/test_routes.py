"""vipd's prefsrc routes to BGP peers against a real kernel (namespaces from test_nft's ``pair``):
the speaker's own socket is bound to the source, routes come back after the source address
does, and routes without vipd's protocol are never touched."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest

from tests.lab.test_nft import Pair, pair, sh  # noqa: F401 - pair is a fixture
from vipd.dataplane.netlink import Netlink
from vipd.dataplane.routes import ROUTE_PROTO, RouteError, SourceRoutes
from vipd.lab import netns

IP = ipaddress.ip_address
FAR = IP("10.88.0.2")  # on the server's lo, reached through the gateway 10.77.0.2
FAR6 = IP("fd88::2")
SOURCE6 = IP("fd99::1")


def routes(p: Pair, *args: str) -> list[dict[str, Any]]:
    return json.loads(sh("ip", "-n", p.host, "-j", "route", "show", *args) or "[]")


def ours(p: Pair, family: str = "-4") -> dict[str, dict[str, Any]]:
    return {r["dst"]: r for r in json.loads(sh("ip", "-n", p.host, "-j", family, "route", "show", "proto",
                                               str(ROUTE_PROTO)) or "[]")}


def foreign(p: Pair) -> list[dict[str, Any]]:
    return [r for r in routes(p) if r.get("protocol") != str(ROUTE_PROTO)]


@pytest.fixture
async def sr(pair: Pair) -> Any:
    netns.ip_batch([f"addr add {FAR}/32 dev lo", f"addr add {FAR6}/128 dev lo",
                    f"route add {SOURCE6}/128 via {pair.host6}"], ns=pair.server)
    netns.ip_batch([f"route add 10.88.0.0/24 via {pair.server4} proto static",
                    f"route add fd88::/64 via {pair.server6}", f"addr add {SOURCE6}/128 dev lo"], ns=pair.host)
    async with Netlink(pair.host) as nl:
        yield SourceRoutes(nl)


async def test_prefsrc_routes_bind_the_speakers_socket(pair: Pair, sr: SourceRoutes) -> None:
    src = pair.bgp_source
    before = foreign(pair)
    await sr.ensure([pair.server4, FAR], src)
    got = ours(pair)
    assert set(got) == {str(pair.server4), str(FAR)}
    assert got[str(pair.server4)]["dev"] == pair.hnic and "gateway" not in got[str(pair.server4)]
    assert got[str(pair.server4)]["scope"] == "link"
    assert got[str(FAR)]["gateway"] == str(pair.server4)
    assert all(r["prefsrc"] == str(src) for r in got.values())
    for peer in (pair.server4, FAR):
        assert pair.connect(peer, 179) == (src, src)  # the client socket itself has the source
    assert foreign(pair) == before  # the main table's own routes are as they were

    await sr.ensure([pair.server4, FAR], src)  # already right: nothing changes
    assert ours(pair) == got
    assert await sr.missing([pair.server4, FAR], src) == []
    assert {(r.peer, r.source, r.gateway) for r in await sr.installed()} == {
        (pair.server4, src, None), (FAR, src, pair.server4)}

    await sr.ensure([FAR], src)  # a peer dropped from the config loses its route
    assert set(ours(pair)) == {str(FAR)}
    await sr.remove_all()
    assert ours(pair) == {} and foreign(pair) == before


async def test_routes_come_back_after_the_source_address(pair: Pair, sr: SourceRoutes) -> None:
    src = pair.bgp_source
    await sr.ensure([pair.server4, FAR], src)
    sh("ip", "-n", pair.host, "addr", "del", f"{src}/32", "dev", "lo")
    assert ours(pair) == {}  # the kernel dropped them with the address
    assert await sr.missing([pair.server4, FAR], src) == [pair.server4, FAR]
    with pytest.raises(RouteError, match="prefsrc 10.99.0.1"):
        await sr.ensure([pair.server4, FAR], src)
    sh("ip", "-n", pair.host, "addr", "add", f"{src}/32", "dev", "lo")
    await sr.ensure([pair.server4, FAR], src)
    assert set(ours(pair)) == {str(pair.server4), str(FAR)}
    assert pair.connect(FAR, 179) == (src, src)


async def test_foreign_routes_are_never_touched(pair: Pair, sr: SourceRoutes) -> None:
    sh("ip", "-n", pair.host, "route", "add", "10.88.0.7/32", "via", str(pair.server4), "proto", "static")
    before = foreign(pair)
    with pytest.raises(RouteError, match="10.88.0.7: a route to 10.88.0.7/32 without vipd's tag"):
        await sr.ensure([IP("10.88.0.7"), FAR], pair.bgp_source)
    assert set(ours(pair)) == {str(FAR)}  # every peer is tried; the others are installed
    assert foreign(pair) == before
    with pytest.raises(RouteError, match="no route"):
        await sr.ensure([IP("192.0.2.1")], pair.bgp_source)
    await sr.remove_all()
    assert foreign(pair) == before


async def test_ipv6_prefsrc_route(pair: Pair, sr: SourceRoutes) -> None:
    await sr.ensure([FAR6], SOURCE6)
    got = ours(pair, "-6")
    assert got[str(FAR6)]["gateway"] == str(pair.server6) and got[str(FAR6)]["prefsrc"] == str(SOURCE6)
    assert pair.connect(FAR6, 179) == (SOURCE6, SOURCE6)
    with pytest.raises(RouteError, match="IPv4"):
        await sr.ensure([FAR6], pair.bgp_source)
    await sr.remove_all()
    assert ours(pair, "-6") == {}

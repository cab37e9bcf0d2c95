"""Config for routed setups: `[bgp]` (a fixed source address for the host's BGP sessions) and
`[[egress]]` (outbound traffic that leaves with a VIP as source while this host owns it)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Union

from vipd.configlib import IFNAME_RE, NAME_RE, Table, positive
from vipd.errors import ConfigError

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


@dataclass(frozen=True)
class BgpConfig:
    source: ipaddress.IPv4Address | None = None  # this host's fixed source address
    source_pool: ipaddress.IPv4Network | None = None  # ... or allocate one once, through etcd
    peers: tuple[ipaddress.IPv4Address, ...] = ()
    snat: bool = False  # also SNAT tcp/179 to the peers (speakers that cannot bind a source)

    @property
    def enabled(self) -> bool:
        return self.source is not None or self.source_pool is not None


@dataclass(frozen=True)
class EgressConfig:
    name: str
    vip: str  # name of the VIP whose address becomes the source
    destinations: tuple[IPNetwork, ...] = ()  # empty: any destination
    protocol: str | None = None  # tcp | udp
    ports: tuple[int, ...] = ()
    sources: tuple[IPNetwork, ...] = ()
    out_interface: str | None = None


def _ip4(t: Table, key: str, raw: Any) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(raw)
    except ValueError:
        raise ConfigError(t.key(key), f"{raw!r} is not an IPv4 address") from None


def parse_bgp(t: Table) -> BgpConfig:
    source = t.get("source", str)
    pool = t.get("source_pool", str)
    if source is not None and pool is not None:
        raise ConfigError(t.key("source_pool"), "give source or source_pool, not both")
    src = _ip4(t, "source", source) if source is not None else None
    net = None
    if pool is not None:
        try:
            net = ipaddress.IPv4Network(pool)
        except ValueError as e:
            raise ConfigError(t.key("source_pool"), f"not an IPv4 network: {e}") from None
    peers = []
    for i, p in enumerate(t.get("peers", list, [])):
        try:
            peers.append(ipaddress.IPv4Address(p))
        except (ValueError, TypeError):
            raise ConfigError(f"{t.key('peers')}[{i}]", f"{p!r} is not an IPv4 address") from None
    snat = t.get("snat", bool, False)
    if (src or net) and not peers:
        raise ConfigError(t.key("peers"), "name the BGP peers whose sessions must leave from the source address")
    t.done()
    return BgpConfig(src, net, tuple(peers), snat)


def _networks(t: Table, key: str) -> tuple[IPNetwork, ...]:
    out = []
    for i, raw in enumerate(t.get(key, list, [])):
        try:
            out.append(ipaddress.ip_network(raw, strict=False))
        except (ValueError, TypeError):
            raise ConfigError(f"{t.key(key)}[{i}]", f"{raw!r} is not an IP prefix") from None
    return tuple(out)


def parse_egress(t: Table) -> EgressConfig:
    name = t.require("name", str)
    if not NAME_RE.match(name) or len(name) > 24:
        raise ConfigError(t.key("name"), f"{name!r} is not a valid rule name (letters, digits, '_', '.', '-'; <= 24)")
    vip = t.require("vip", str)
    dst = _networks(t, "destinations")
    proto = t.get("protocol", str)
    if proto is not None and proto not in ("tcp", "udp"):
        raise ConfigError(t.key("protocol"), f"must be tcp or udp, got {proto!r}")
    ports = tuple(int(positive(f"{t.key('ports')}[{i}]", p, 1, 65535)) if isinstance(p, int) and not isinstance(p, bool)
                  else _bad_port(t, i, p) for i, p in enumerate(t.get("ports", list, [])))
    if ports and proto is None:
        raise ConfigError(t.key("ports"), "ports need a protocol (tcp or udp)")
    src = _networks(t, "sources")
    oif = t.get("out_interface", str)
    if oif is not None and not IFNAME_RE.match(oif.rstrip("*") or "x"):
        raise ConfigError(t.key("out_interface"), f"{oif!r} is not a valid interface name")
    t.done()
    return EgressConfig(name, vip, dst, proto, ports, src, oif)


def _bad_port(t: Table, i: int, p: Any) -> int:
    raise ConfigError(f"{t.key('ports')}[{i}]", f"expected a port number, got {p!r}")


def check_egress(rules: tuple[EgressConfig, ...], vips: dict[str, IPAddress]) -> None:
    """Cross-checks against the VIPs: every rule names a VIP, families agree, names are unique."""
    seen: set[str] = set()
    for i, r in enumerate(rules):
        if r.name in seen:
            raise ConfigError(f"egress[{i}].name", f"duplicate rule name {r.name!r}")
        seen.add(r.name)
        if r.vip not in vips:
            raise ConfigError(f"egress[{i}].vip", f"no VIP named {r.vip!r}")
        for key, nets in (("destinations", r.destinations), ("sources", r.sources)):
            for j, n in enumerate(nets):
                if n.version != vips[r.vip].version:
                    raise ConfigError(f"egress[{i}].{key}[{j}]", f"{n} is IPv{n.version} but VIP {r.vip!r} is "
                                                                 f"IPv{vips[r.vip].version}")

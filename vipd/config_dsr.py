"""`[[vip.service]]`: the DSR services of a VIP (protocol, port, backends). Parsed into frozen types;
host-independent checks only.

    [[vip.service]]
    protocol = "tcp"            # tcp or udp
    port = 80
    interface = "eth0"          # where the director listens; default: the VIP's interface (required on lo)
    backends = [
      { node = "web1", address = "10.0.0.11" },  # a cluster host: in the table while present and healthy in etcd
      { address = "10.0.0.50" },                 # a static backend: MAC resolved on the segment, health-checked
    ]
    check_interval = 1.0        # static backends: TCP connect to address:port (udp: the MAC must resolve)
    check_timeout = 0.5

Several services may share one VIP only on distinct (protocol, port) pairs.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Union

from vipd.configlib import IFNAME_RE, NAME_RE, Table, positive
from vipd.errors import ConfigError

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


@dataclass(frozen=True)
class BackendSpec:
    address: IPAddress  # the backend's own address on the director's segment (its MAC is resolved from it)
    node: str | None = None  # cluster host: follows etcd presence and health; None: static

    @property
    def name(self) -> str:
        """What the Maglev table hashes: the node name, or the static address. The same on every director."""
        return self.node if self.node is not None else str(self.address)


@dataclass(frozen=True)
class ServiceSpec:
    protocol: str  # "tcp" or "udp"
    port: int
    backends: tuple[BackendSpec, ...]
    interface: str | None = None  # None: the VIP's interface
    check_interval: float = 1.0
    check_timeout: float = 0.5

    @property
    def label(self) -> str:
        return f"{self.protocol}/{self.port}"


def parse_services(t: Table, vip_ip: IPAddress, vip_interface: str) -> tuple[ServiceSpec, ...]:
    """The `service` list of one [[vip]] table (t), with the sharing rule checked."""
    raw = t.get("service", list, [])
    out: list[ServiceSpec] = []
    seen: dict[tuple[str, int], int] = {}
    for i, item in enumerate(raw):
        key = f"{t.key('service')}[{i}]"
        s = _parse_service(Table(item, key), vip_ip, vip_interface)
        j = seen.get((s.protocol, s.port))
        if j is not None:
            raise ConfigError(f"{key}.port", f"{s.label} on {vip_ip} is also {t.key('service')}[{j}]: services "
                                             "sharing a VIP need distinct (protocol, port) pairs")
        seen[(s.protocol, s.port)] = i
        out.append(s)
    return tuple(out)


def _parse_service(t: Table, vip_ip: IPAddress, vip_interface: str) -> ServiceSpec:
    proto = t.require("protocol", str)
    if proto not in ("tcp", "udp"):
        raise ConfigError(t.key("protocol"), f"must be tcp or udp, got {proto!r}")
    port = t.require("port", int)
    if not 1 <= port <= 65535:
        raise ConfigError(t.key("port"), f"must be between 1 and 65535, got {port}")
    interface = t.get("interface", str)
    if interface is not None and not IFNAME_RE.match(interface):
        raise ConfigError(t.key("interface"), f"{interface!r} is not a valid interface name")
    if interface is None and vip_interface == "lo":
        raise ConfigError(t.key("interface"), "the VIP lives on lo: name the interface the director listens on")
    if interface == "lo":
        raise ConfigError(t.key("interface"), "the director needs an Ethernet interface, not lo")
    interval = float(positive(t.key("check_interval"), t.get("check_interval", (int, float), 1.0), 0, 3600))
    timeout = float(positive(t.key("check_timeout"), t.get("check_timeout", (int, float), 0.5), 0, 60))
    if timeout > interval:
        raise ConfigError(t.key("check_timeout"), f"must not exceed check_interval ({interval:g})")
    raw = t.require("backends", list)
    if not raw:
        raise ConfigError(t.key("backends"), "needs at least one backend")
    backends: list[BackendSpec] = []
    names: dict[str, int] = {}
    addrs: dict[Any, int] = {}
    for i, item in enumerate(raw):
        b = _parse_backend(Table(item, f"{t.key('backends')}[{i}]"), vip_ip)
        for seen, what, value in ((names, "backend", b.name), (addrs, "address", b.address)):
            if value in seen:
                raise ConfigError(f"{t.key('backends')}[{i}]", f"duplicate {what} {value} "
                                                              f"(also {t.key('backends')}[{seen[value]}])")  # type: ignore[index]
            seen[value] = i  # type: ignore[index]
        backends.append(b)
    t.done()
    return ServiceSpec(proto, port, tuple(backends), interface, interval, timeout)


def _parse_backend(t: Table, vip_ip: IPAddress) -> BackendSpec:
    node = t.get("node", str)
    if node is not None and not NAME_RE.match(node):
        raise ConfigError(t.key("node"), f"{node!r} is not a valid node name")
    raw = t.require("address", str)
    try:
        address = ipaddress.ip_address(raw)
    except ValueError:
        raise ConfigError(t.key("address"), f"{raw!r} is not an IP address") from None
    if address.version != vip_ip.version:
        raise ConfigError(t.key("address"), f"{address} is not of the VIP's family (IPv{vip_ip.version}): "
                                            "the director resolves the backend's MAC on the VIP's segment")
    if address == vip_ip or address.is_unspecified or address.is_multicast or address.is_loopback:
        raise ConfigError(t.key("address"), f"{address} cannot be a backend address")
    t.done()
    return BackendSpec(address, node)


def check_services_host(vips: Any, sys_class_net: str = "/sys/class/net") -> None:
    """Read-only: every director interface a service names exists here."""
    import os

    for i, v in enumerate(vips):
        for j, s in enumerate(v.services):
            if s.interface is not None and not os.path.exists(os.path.join(sys_class_net, s.interface)):
                raise ConfigError(f"vip[{i}].service[{j}].interface", f"no interface {s.interface!r} on this host")

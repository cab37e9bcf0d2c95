"""TOML -> frozen config types. Parsed once; unknown keys and bad values are rejected with the key path."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

from vipd.configlib import IFNAME_RE as _IFNAME_RE
from vipd.configlib import NAME_RE as _NAME_RE
from vipd.configlib import Table
from vipd.configlib import Table as _Table
from vipd.configlib import positive as _positive
from vipd.config_dsr import ServiceSpec, check_services_host, parse_services  # DSR hook (issue 10)
from vipd.config_routing import BgpConfig, EgressConfig, check_egress, parse_bgp, parse_egress
from vipd.errors import ConfigError
from vipd.health.spec import CheckSpec, parse_check
from vipd.health.spec import check_host as check_check_host
from vipd.hooks import HooksConfig, check_hooks_host, parse_hooks

IPInterface = Union[ipaddress.IPv4Interface, ipaddress.IPv6Interface]

DEFAULT_PATH = "/etc/vipd/vipd.toml"
# The kernel removes an expired address up to ~1.25 s late (check_lifetime runs at most once a second
# and rounds up to a whole second); the fence margin must cover that plus slack.
MIN_FENCE_MARGIN = 1.25


@dataclass(frozen=True)
class VipSpec:
    """One virtual IP: where it lives and how it is announced."""

    name: str
    address: IPInterface  # address with prefix length, e.g. 10.0.0.10/24
    interface: str
    announce_count: int = 3
    announce_interval: float = 0.2
    announce_reply: bool = False
    group: str | None = None  # VIPs of one group always have the same owner
    prefer: tuple[str, ...] = ()  # placement: hosts to prefer, best first
    avoid: tuple[str, ...] = ()  # placement: hosts to use only when nothing else is healthy
    checks: tuple[CheckSpec, ...] = ()  # failing any releases the VIP (its whole group)
    conflict_check: bool = True  # ARP probe / DAD before the first claim on a NIC
    mode: str = "single"  # single: one owner (elected); anycast: every fit host holds it (routed VIPs)
    services: tuple[ServiceSpec, ...] = ()  # DSR hook (issue 10): [[vip.service]], see vipd/config_dsr.py

    @property
    def unit(self) -> str:
        """The election unit this VIP belongs to: its group, or itself."""
        return self.group or self.name

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return self.address.ip

    @property
    def version(self) -> int:
        return self.address.version

    @property
    def on_loopback(self) -> bool:
        return self.interface == "lo"


@dataclass(frozen=True)
class Unit:
    """What one owner key elects: a single VIP, or every VIP of a group (they move together)."""

    name: str
    vips: tuple[VipSpec, ...]

    @property
    def checks(self) -> tuple[CheckSpec, ...]:
        return tuple(c for v in self.vips for c in v.checks)

    @property
    def prefer(self) -> tuple[str, ...]:
        return self.vips[0].prefer

    @property
    def anycast(self) -> bool:
        return self.vips[0].mode == "anycast"

    @property
    def avoid(self) -> tuple[str, ...]:
        return self.vips[0].avoid


@dataclass(frozen=True)
class HostConfig:
    weight: float = 1.0  # placement weight (0: take VIPs only when no other host can)
    checks: tuple[CheckSpec, ...] = ()  # failing any releases every VIP of this host


@dataclass(frozen=True)
class PlacementConfig:
    preempt: bool = True  # hand units back to their preferred host
    preempt_delay: float = 5.0  # ... once it has been preferred and healthy this long
    campaign_stagger: float = 0.2  # seconds per place behind in the ranking before campaigning


@dataclass(frozen=True)
class EtcdConfig:
    endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    prefix: str = "/vipd/default/"
    lease_ttl: int = 3
    request_timeout: float = 0.5
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class TimingConfig:
    # The address lifetime ends this long before the lease can expire in etcd. It must cover how late
    # the kernel removes an expired address (up to ~1.25 s: its lifetime check runs at most once a
    # second, rounded up), so that a dead daemon's VIP is gone before another host can win.
    fence_margin: float = 1.5
    # Keepalives per granted TTL (6 means one every TTL/6).
    keepalives_per_ttl: int = 6
    # Level-triggered reconcile of kernel state.
    reconcile_interval: float = 1.0
    # After a voluntary release this host does not campaign for that VIP for this long.
    release_holdoff: float = 3.0


@dataclass(frozen=True)
class Config:
    node: str
    etcd: EtcdConfig
    timing: TimingConfig
    vips: tuple[VipSpec, ...]
    host: HostConfig = HostConfig()
    placement: PlacementConfig = PlacementConfig()
    hooks: HooksConfig = HooksConfig()
    bgp: BgpConfig = BgpConfig()
    egress: tuple[EgressConfig, ...] = ()
    metrics_listen: str = "127.0.0.1:9654"  # "" disables the endpoint
    state_dir: str = "/run/vipd"
    log_level: str = "info"

    @property
    def control_socket(self) -> str:
        return os.path.join(self.state_dir, "control.sock")

    @property
    def units(self) -> tuple[Unit, ...]:
        order: dict[str, list[VipSpec]] = {}
        for v in self.vips:
            order.setdefault(v.unit, []).append(v)
        return tuple(Unit(name, tuple(vs)) for name, vs in order.items())

    def unit_of(self, name: str) -> str:
        """Unit name for a VIP or group name; KeyError if neither."""
        for v in self.vips:
            if name in (v.name, v.group):
                return v.unit
        raise KeyError(name)


def _parse_etcd(t: _Table) -> EtcdConfig:
    endpoints = t.get("endpoints", list, ["http://127.0.0.1:2379"])
    if not endpoints:
        raise ConfigError(t.key("endpoints"), "needs at least one endpoint")
    for i, ep in enumerate(endpoints):
        if not isinstance(ep, str) or not re.match(r"^https?://[^/\s]+(:\d+)?/?$", ep):
            raise ConfigError(f"{t.key('endpoints')}[{i}]", f"not an http(s)://host:port URL: {ep!r}")
    prefix = t.get("prefix", str, "/vipd/default/")
    if not prefix.startswith("/"):
        raise ConfigError(t.key("prefix"), "must start with '/'")
    if not prefix.endswith("/"):
        prefix += "/"
    ttl = int(_positive(t.key("lease_ttl"), t.get("lease_ttl", int, 3), 1, 3600))
    timeout = float(_positive(t.key("request_timeout"), t.get("request_timeout", (int, float), 0.5), 0, 30))
    files = {}
    for k in ("ca_file", "cert_file", "key_file"):
        files[k] = t.get(k, str)
    if (files["cert_file"] is None) != (files["key_file"] is None):
        raise ConfigError(t.key("cert_file" if files["cert_file"] is None else "key_file"),
                          "cert_file and key_file go together")
    username = t.get("username", str)
    password = t.get("password", str)
    password_file = t.get("password_file", str)
    if password is not None and password_file is not None:
        raise ConfigError(t.key("password_file"), "give password or password_file, not both")
    if password_file is not None:
        try:
            password = Path(password_file).read_text().strip()
        except OSError as e:
            raise ConfigError(t.key("password_file"), f"cannot read: {e.strerror}") from None
    if (username is None) != (password is None):
        raise ConfigError(t.key("username" if username is None else "password"), "username and password go together")
    t.done()
    return EtcdConfig(tuple(endpoints), prefix, ttl, timeout, files["ca_file"], files["cert_file"],
                      files["key_file"], username, password)


def _parse_timing(t: _Table) -> TimingConfig:
    margin = float(_positive(t.key("fence_margin"), t.get("fence_margin", (int, float), 1.5), MIN_FENCE_MARGIN, 10))
    per_ttl = int(_positive(t.key("keepalives_per_ttl"), t.get("keepalives_per_ttl", int, 6), 2, 20))
    reconcile = float(_positive(t.key("reconcile_interval"), t.get("reconcile_interval", (int, float), 1.0), 0, 60))
    holdoff = float(_positive(t.key("release_holdoff"), t.get("release_holdoff", (int, float), 3.0), 0, 3600))
    t.done()
    return TimingConfig(margin, per_ttl, reconcile, holdoff)


def _parse_vip(t: _Table) -> VipSpec:
    name = t.require("name", str)
    if not _NAME_RE.match(name):
        raise ConfigError(t.key("name"), f"{name!r} is not a valid name (letters, digits, '_', '.', '-')")
    raw = t.require("address", str)
    try:
        address = ipaddress.ip_interface(raw)
    except ValueError:
        raise ConfigError(t.key("address"), f"{raw!r} is not an IP address with optional /prefix") from None
    ip = address.ip
    if "/" not in raw:
        address = ipaddress.ip_interface(f"{ip}/{ip.max_prefixlen}")
    if ip.is_unspecified or ip.is_multicast or ip.is_loopback or ip.is_link_local:
        raise ConfigError(t.key("address"), f"{ip} cannot be a VIP (unspecified, multicast, loopback or link-local)")
    if address.version == 4 and address.network.prefixlen < 31 and ip in (address.network.network_address,
                                                                          address.network.broadcast_address):
        raise ConfigError(t.key("address"), f"{ip} is the network or broadcast address of {address.network}")
    interface = t.get("interface", str, "lo")
    if not _IFNAME_RE.match(interface):
        raise ConfigError(t.key("interface"), f"{interface!r} is not a valid interface name")
    count = t.get("announce_count", int, 3)
    if not 0 <= count <= 100:
        raise ConfigError(t.key("announce_count"), f"must be between 0 and 100, got {count}")
    interval = float(_positive(t.key("announce_interval"), t.get("announce_interval", (int, float), 0.2), 0, 60))
    reply = t.get("announce_reply", bool, False)
    group = t.get("group", str)
    if group is not None and not _NAME_RE.match(group):
        raise ConfigError(t.key("group"), f"{group!r} is not a valid group name")
    prefer = _names(t, "prefer")
    avoid = _names(t, "avoid")
    both = set(prefer) & set(avoid)
    if both:
        raise ConfigError(t.key("avoid"), f"{sorted(both)[0]!r} is also in prefer")
    checks = _checks(t, "check")
    conflict = t.get("conflict_check", bool, True)
    mode = t.get("mode", str, "single")
    if mode not in ("single", "anycast"):
        raise ConfigError(t.key("mode"), f"must be single or anycast, got {mode!r}")
    if mode == "anycast" and interface != "lo":
        raise ConfigError(t.key("mode"), "anycast VIPs live on lo (a BGP speaker announces them): set interface = \"lo\"")
    services = parse_services(t, ip, interface)  # DSR hook (issue 10)
    t.done()
    return VipSpec(name, address, interface, count, interval, reply, group, prefer, avoid, checks, conflict, mode,
                   services)


def _names(t: _Table, key: str) -> tuple[str, ...]:
    names = t.get(key, list, [])
    for i, n in enumerate(names):
        if not isinstance(n, str) or not _NAME_RE.match(n):
            raise ConfigError(f"{t.key(key)}[{i}]", f"{n!r} is not a valid node name")
    return tuple(names)


def _checks(t: _Table, key: str) -> tuple[CheckSpec, ...]:
    raw = t.get(key, list, [])
    return tuple(parse_check(c, f"{t.key(key)}[{i}]") for i, c in enumerate(raw))


def _parse_host(t: _Table) -> HostConfig:
    weight = float(t.get("weight", (int, float), 1.0))
    if not 0 <= weight <= 1000:
        raise ConfigError(t.key("weight"), f"must be between 0 and 1000, got {weight}")
    checks = _checks(t, "check")
    t.done()
    return HostConfig(weight, checks)


def _parse_placement(t: _Table) -> PlacementConfig:
    preempt = t.get("preempt", bool, True)
    delay = float(_positive(t.key("preempt_delay"), t.get("preempt_delay", (int, float), 5.0), 0, 3600))
    stagger = float(_positive(t.key("campaign_stagger"), t.get("campaign_stagger", (int, float), 0.2), 0, 10))
    t.done()
    return PlacementConfig(preempt, delay, stagger)


def parse(data: dict[str, Any], *, hostname: str | None = None) -> Config:
    """Build a Config from already-decoded TOML data. Host-independent: touches nothing."""
    root = _Table(data, "")
    node = root.get("node", str) or hostname or socket.gethostname()
    if not _NAME_RE.match(node):
        raise ConfigError("node", f"{node!r} is not a valid node name")
    etcd = _parse_etcd(root.table("etcd"))
    timing = _parse_timing(root.table("timing"))
    host = _parse_host(root.table("host"))
    placement = _parse_placement(root.table("placement"))
    root.used.add("hooks")
    hooks = parse_hooks(root.data.get("hooks", {}), "hooks")
    metrics = root.table("metrics")
    listen = metrics.get("listen", str, "127.0.0.1:9654")
    if listen and not re.match(r"^(\[[0-9a-fA-F:]+\]|[^:\s]+):\d{1,5}$", listen):
        raise ConfigError(metrics.key("listen"), f"expected host:port or '' to disable, got {listen!r}")
    metrics.done()
    state_dir = root.get("state_dir", str, "/run/vipd")
    log_level = root.get("log_level", str, "info")
    if log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError("log_level", "must be one of debug, info, warning, error")
    raw_vips = root.get("vip", list, [])
    vips = []
    for i, item in enumerate(raw_vips):
        vips.append(_parse_vip(_Table(item, f"vip[{i}]")))
    names: dict[str, int] = {}
    addrs: dict[Any, int] = {}
    for i, v in enumerate(vips):
        if v.name in names:
            raise ConfigError(f"vip[{i}].name", f"duplicate name {v.name!r} (also vip[{names[v.name]}])")
        names[v.name] = i
        if v.ip in addrs:
            raise ConfigError(f"vip[{i}].address", f"duplicate address {v.ip} (also vip[{addrs[v.ip]}])")
        addrs[v.ip] = i
    first_of: dict[str, int] = {}
    for i, v in enumerate(vips):
        if v.group is not None and v.group in names and vips[names[v.group]].group != v.group:
            raise ConfigError(f"vip[{i}].group", f"{v.group!r} is also the name of vip[{names[v.group]}], "
                                                 "which is not in that group")
        if v.group is not None:
            j = first_of.setdefault(v.group, i)
            if (v.prefer, v.avoid) != (vips[j].prefer, vips[j].avoid):
                raise ConfigError(f"vip[{i}].prefer", f"members of group {v.group!r} must have the same "
                                                      f"prefer/avoid lists as vip[{j}]")
            if v.mode != vips[j].mode:
                raise ConfigError(f"vip[{i}].mode", f"members of group {v.group!r} must have the same mode")
    bgp = parse_bgp(root.table("bgp"))
    egress = tuple(parse_egress(Table(e, f"egress[{i}]")) for i, e in enumerate(root.get("egress", list, [])))
    check_egress(egress, {v.name: v.ip for v in vips})
    if etcd.lease_ttl - timing.fence_margin < 1:
        raise ConfigError("etcd.lease_ttl", f"must exceed timing.fence_margin by at least 1 s "
                                            f"(address lifetimes are whole seconds)")
    root.done()
    return Config(node, etcd, timing, tuple(vips), host, placement, hooks, bgp, egress, listen, state_dir, log_level)


def load(path: str | os.PathLike[str], *, hostname: str | None = None) -> Config:
    """Read and parse a TOML file. Raises ConfigError (never a bare OSError or TOML error)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError("<file>", f"cannot read {path}: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError("<file>", f"{path} is not valid TOML: {e}") from None
    return parse(data, hostname=hostname)


def check_host(cfg: Config, sys_class_net: str = "/sys/class/net") -> None:
    """Read-only checks against this host: every VIP interface exists. Changes nothing."""
    for i, v in enumerate(cfg.vips):
        if not os.path.exists(os.path.join(sys_class_net, v.interface)):
            raise ConfigError(f"vip[{i}].interface", f"no interface {v.interface!r} on this host")
    for k in ("ca_file", "cert_file", "key_file"):
        f = getattr(cfg.etcd, k)
        if f is not None and not os.access(f, os.R_OK):
            raise ConfigError(f"etcd.{k}", f"cannot read {f}")
    for i, c in enumerate(cfg.host.checks):
        check_check_host(c, f"host.check[{i}]", sys_class_net)
    for i, v in enumerate(cfg.vips):
        for j, c in enumerate(v.checks):
            check_check_host(c, f"vip[{i}].check[{j}]", sys_class_net)
    check_hooks_host(cfg.hooks)
    check_services_host(cfg.vips, sys_class_net)  # DSR hook (issue 10)

"""TOML -> frozen config types. Parsed once; unknown keys and bad values are rejected with the key path."""

from __future__ import annotations

import functools
import ipaddress
import os
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
from vipd.configlib import absolute_path, check_unicast, host_port, http_url
from vipd.configlib import positive as _positive
from vipd.config_rules import check_rules
from vipd.config_peers import PeersConfig, parse_peers  # [peers] (fast takeover)
from vipd.config_dsr import ServiceSpec, check_services_host, parse_services  # DSR hook (issue 10)
from vipd.config_routing import BgpConfig, EgressConfig, check_egress, parse_bgp, parse_egress
from vipd.errors import ConfigError
from vipd.health.spec import CheckSpec, parse_check
from vipd.hooks_config import HooksConfig, parse_hooks
from vipd.model import IPInterface, Unit, VipSpec  # re-exported: shared value types live in model.py

DEFAULT_PATH = "/etc/vipd/vipd.toml"
# The kernel removes an expired address up to ~1.25 s late (check_lifetime runs at most once a second
# and rounds up to a whole second); the fence margin must cover that plus slack.
MIN_FENCE_MARGIN = 1.25


@dataclass(frozen=True)
class HostConfig:
    weight: float = 1.0  # placement weight (0: take VIPs only when no other host can)
    checks: tuple[CheckSpec, ...] = ()  # failing any releases every VIP of this host


@dataclass(frozen=True)
class PlacementConfig:
    preempt: bool = True  # hand units back to their preferred host
    preempt_delay: float = 5.0  # ... once it has been preferred and healthy this long
    campaign_stagger: float = 0.2  # seconds per place behind in the ranking before campaigning
    join_grace: float = 5.0  # seconds a host that just joined has to campaign for its share first
    handover_batch: int = 256  # units this host hands to their preferred hosts at once (vipd/handover.py)


# Defaults that ride out an etcd leader change with etcd's default flags (heartbeat 100 ms, election
# 1000 ms: an election leaves keepalives unanswered for up to ~3 s, a rejoining cut-off leader forces
# a second one): the owner's fence deadline is TTL - fence_margin = 8.5 s after its last acknowledged
# keepalive, one keepalive a second. Host loss is detected by peer heartbeats, not by the lease, so a
# long TTL costs only the failover time of a host lost without that fast path (~TTL).
DEFAULT_LEASE_TTL = 10
DEFAULT_REQUEST_TIMEOUT = 1.0
DEFAULT_KEEPALIVES_PER_TTL = 10


@dataclass(frozen=True)
class EtcdConfig:
    endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    prefix: str = "/vipd/default/"
    lease_ttl: int = DEFAULT_LEASE_TTL
    # Per request and member: the last member that answered is asked first, the others after half
    # of this (hedged), so one call takes at most 2 x request_timeout.
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
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
    # Keepalives per granted TTL (10 means one every TTL/10).
    keepalives_per_ttl: int = DEFAULT_KEEPALIVES_PER_TTL
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
    peers: PeersConfig = PeersConfig()  # [peers]: host-to-host heartbeats (vipd/peers)

    @property
    def control_socket(self) -> str:
        return os.path.join(self.state_dir, "control.sock")

    @functools.cached_property  # (frozen: computed once per Config; thousands of VIPs)
    def units(self) -> tuple[Unit, ...]:
        order: dict[str, list[VipSpec]] = {}
        for v in self.vips:
            order.setdefault(v.unit, []).append(v)
        return tuple(Unit(name, tuple(vs)) for name, vs in order.items())

    @functools.cached_property
    def by_address(self) -> dict[tuple[str, Any], VipSpec]:
        """(interface, ip) -> the VIP configured there."""
        return {(v.interface, v.ip): v for v in self.vips}

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
        if not isinstance(ep, str):
            raise ConfigError(f"{t.key('endpoints')}[{i}]", f"expected a string, got {type(ep).__name__}")
        http_url(f"{t.key('endpoints')}[{i}]", ep, path_allowed=False)
    if len(set(endpoints)) != len(endpoints):
        raise ConfigError(t.key("endpoints"), "lists an endpoint twice")
    prefix = t.get("prefix", str, "/vipd/default/")
    if not prefix.startswith("/"):
        raise ConfigError(t.key("prefix"), "must start with '/'")
    if not prefix.endswith("/"):
        prefix += "/"
    ttl = int(_positive(t.key("lease_ttl"), t.get("lease_ttl", int, DEFAULT_LEASE_TTL), 1, 3600))
    timeout = float(_positive(t.key("request_timeout"),
                              t.get("request_timeout", (int, float), DEFAULT_REQUEST_TIMEOUT), 0, 30))
    files = {}
    for k in ("ca_file", "cert_file", "key_file"):
        files[k] = t.get(k, str)
        if files[k] is not None:
            files[k] = absolute_path(t.key(k), files[k])
    if (files["cert_file"] is None) != (files["key_file"] is None):
        raise ConfigError(t.key("cert_file" if files["cert_file"] is None else "key_file"),
                          "cert_file and key_file go together")
    username = t.get("username", str)
    password = t.get("password", str)
    password_file = t.get("password_file", str)
    if password is not None and password_file is not None:
        raise ConfigError(t.key("password_file"), "give password or password_file, not both")
    if password_file is not None:
        password_file = absolute_path(t.key("password_file"), password_file)
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
    per_ttl = int(_positive(t.key("keepalives_per_ttl"),
                            t.get("keepalives_per_ttl", int, DEFAULT_KEEPALIVES_PER_TTL), 2, 20))
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
    check_unicast(t.key("address"), ip, "a VIP")
    if address.network.prefixlen == 0:
        raise ConfigError(t.key("address"), f"{address}: a /0 prefix puts every address on the link; give the "
                                            f"subnet's prefix length (or none: /{ip.max_prefixlen})")
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
    join = float(t.get("join_grace", (int, float), 5.0))
    if not 0 <= join <= 60:  # (0: a host's campaigns do not wait for hosts that just joined)
        raise ConfigError(t.key("join_grace"), f"must be between 0 and 60, got {join}")
    batch = int(_positive(t.key("handover_batch"), t.get("handover_batch", int, 256), 1, 100000))
    t.done()
    return PlacementConfig(preempt, delay, stagger, join, batch)


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
    if listen:
        host_port(metrics.key("listen"), listen)
    metrics.done()
    state_dir = absolute_path("state_dir", root.get("state_dir", str, "/run/vipd"))
    if state_dir == "/":
        raise ConfigError("state_dir", "must be a directory of vipd's own, not /")
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
    # A keepalive that finds every member dead or slow must still leave room for the next one before
    # the fence deadline: one request timeout per member, after one keepalive interval.
    budget = etcd.lease_ttl - timing.fence_margin - etcd.lease_ttl / timing.keepalives_per_ttl
    if etcd.request_timeout * len(etcd.endpoints) > budget:
        raise ConfigError("etcd.request_timeout", f"{etcd.request_timeout:g} s x {len(etcd.endpoints)} endpoints "
                                                  f"does not fit in lease_ttl - fence_margin - one keepalive "
                                                  f"interval ({budget:.2f} s): lower it or raise etcd.lease_ttl")
    peers = parse_peers(root.table("peers"))  # [peers] (fast takeover)
    root.done()
    cfg = Config(node, etcd, timing, tuple(vips), host, placement, hooks, bgp, egress, listen, state_dir, log_level,
                 peers)
    check_rules(cfg)
    return cfg


def load(path: str | os.PathLike[str], *, hostname: str | None = None) -> Config:
    """Read and parse a TOML file. Raises ConfigError (never a bare OSError or TOML error)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError("<file>", f"cannot read {path}: {e.strerror}") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte order mark (some editors add one): not part of the TOML
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError("<file>", f"{path} is not valid TOML: {e}") from None
    return parse(data, hostname=hostname)


from vipd.config_host import check_host  # noqa: E402  (re-exported: config.check_host)

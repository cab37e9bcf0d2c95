"""`vipd check`'s host-dependent rules: read-only checks of a parsed config against this host
(interfaces, files, programs, the state directory, the metrics address, addresses the host already
has). Changes nothing. Each raises ConfigError(key, reason)."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from typing import TYPE_CHECKING, Iterable, NamedTuple

from vipd.errors import ConfigError
from vipd.health.spec import check_host as check_check_host
from vipd.hooks_config import check_hooks_host
from vipd.hostchecks import check_state_dir, tls_context

if TYPE_CHECKING:
    from vipd.config import Config

VIPD_PROTO = 0x56  # vipd.dataplane.address's tag: addresses vipd added itself


class HostAddress(NamedTuple):
    interface: str
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    ours: bool  # tagged by vipd (a VIP or the BGP source left by an earlier run)


def check_host(cfg: "Config", sys_class_net: str = "/sys/class/net",
               addresses: Iterable[HostAddress] | None = None, *,
               allow_missing_interfaces: bool = False) -> list[str]:
    """Every host-dependent rule; `addresses` (default: read from the kernel) for tests.

    With allow_missing_interfaces (what `vipd run`, a reload and the unit's pre-start check use) a
    VIP or check interface that does not exist now is not an error: the daemon keeps that NIC's
    VIPs unavailable until it appears (vipd/interfaces.py); one warning line per such key is
    returned instead."""
    warnings: list[str] = []

    def missing(key: str, ifname: str) -> None:
        if not allow_missing_interfaces:
            raise ConfigError(key, f"no interface {ifname!r} on this host")
        warnings.append(f"{key}: no interface {ifname!r} on this host now; its VIPs stay unavailable until it exists")

    for i, v in enumerate(cfg.vips):
        if not os.path.exists(os.path.join(sys_class_net, v.interface)):
            missing(f"vip[{i}].interface", v.interface)
    check_state_dir("state_dir", cfg.state_dir)
    if any(ep.startswith("https:") for ep in cfg.etcd.endpoints):
        tls_context(cfg.etcd.ca_file, cfg.etcd.cert_file, cfg.etcd.key_file, "etcd")
    checks = [(c, f"host.check[{i}]") for i, c in enumerate(cfg.host.checks)]
    checks += [(c, f"vip[{i}].check[{j}]") for i, v in enumerate(cfg.vips) for j, c in enumerate(v.checks)]
    for c, key in checks:
        try:
            check_check_host(c, key, sys_class_net)
        except ConfigError as e:
            if not (allow_missing_interfaces and e.reason.startswith("no interface")):
                raise
            warnings.append(f"{e.key}: {e.reason} now; the check fails until it exists")
    check_hooks_host(cfg.hooks)
    if cfg.metrics_listen:
        check_metrics_address(cfg.metrics_listen)
    check_own_addresses(cfg, list(host_addresses() if addresses is None else addresses))
    return warnings


def check_metrics_address(listen: str, key: str = "metrics.listen") -> None:
    """The metrics host resolves and is an address of this host (a wildcard is fine): bound once on
    an ephemeral port, so a daemon already serving on the configured port does not fail the check."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(key, f"cannot resolve {host!r}: {e.strerror}") from None
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as s:
            try:
                s.bind((addr[0], 0, *addr[2:]))
            except OSError as e:
                if e.errno == errno.EADDRNOTAVAIL:
                    raise ConfigError(key, f"{addr[0]} is not an address of this host") from None
                raise ConfigError(key, f"cannot listen on {addr[0]}: {e.strerror}") from None


def check_own_addresses(cfg: "Config", addresses: list[HostAddress]) -> None:
    """A VIP that the host already has (and vipd did not add) would never be claimed: every claim
    fails or, worse, vipd would later remove the host's own address. The BGP source may already be
    on lo, but not on another interface."""
    theirs = {a.ip: a.interface for a in addresses if not a.ours}
    for i, v in enumerate(cfg.vips):
        if v.ip in theirs:
            raise ConfigError(f"vip[{i}].address", f"{v.ip} is already an address of this host (on "
                                                   f"{theirs[v.ip]}); a VIP must be an address of its own")
    src = cfg.bgp.source
    if src is not None and src in theirs and theirs[src] != "lo":
        raise ConfigError("bgp.source", f"{src} is already an address of this host on {theirs[src]}: the "
                                        "source address must be one of its own, kept on lo")


def host_addresses() -> list[HostAddress]:
    """Every address in this network namespace (one short-lived netlink socket, read-only)."""
    from pyroute2 import IPRoute

    out = []
    with IPRoute() as ipr:
        for msg in ipr.get_addr():
            ip = (msg.get("IFA_LOCAL") if msg["family"] == socket.AF_INET else None) or msg.get("IFA_ADDRESS")
            try:
                name = socket.if_indextoname(msg["index"])
            except OSError:
                name = str(msg["index"])
            out.append(HostAddress(name, ipaddress.ip_address(ip), msg.get("IFA_PROTO") == VIPD_PROTO))
    return out

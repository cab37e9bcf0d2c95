"""The backend role: serve a DSR VIP without ever answering ARP for it.

The VIP goes on `lo` (so the stack accepts frames a director sends to this host's MAC, and replies
leave straight to the client with the VIP as source), and `net.ipv4.conf.all.arp_ignore = 1`
(answer ARP only for addresses on the receiving interface) and `arp_announce = 2` (never use the VIP
as ARP source) are set; the previous values come back at stop(). The role refuses, with the reason,
when this host would still answer ARP for the VIP: the VIP on a non-loopback interface without
vipd's owner tag, or an interface whose effective arp_ignore is a reserved value (4-7: the kernel
answers).

Addresses carry IFA_PROTO DSR_PROTO (0x57), not the owner tag 0x56: the ownership core's reconcile
(which removes stray 0x56 addresses) leaves them alone, and `cleanup` removes only them. Anycast VIPs
are already on `lo` on every fit host (their ownership puts them there): the role adds nothing for
them.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any, Sequence

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from vipd import log
from vipd.config import VipSpec
from vipd.dataplane.address import VIPD_PROTO
from vipd.dataplane.netlink import Netlink
from vipd.errors import DataplaneError

DSR_PROTO = 0x57
SYSCTLS = {"arp_ignore": 1, "arp_announce": 2}
_PROC = "/proc/sys/net/ipv4/conf"


class BackendRefused(DataplaneError):
    """This host would answer ARP for a DSR VIP: it must not serve as a backend."""


def read_sysctl(iface: str, name: str) -> int:
    with open(os.path.join(_PROC, iface, name)) as f:
        return int(f.read().strip())


def write_sysctl(iface: str, name: str, value: int) -> None:
    with open(os.path.join(_PROC, iface, name), "w") as f:
        f.write(f"{value}\n")


def _addrs(ipr: IPRoute, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[tuple[int, str, Any]]:
    names = {m["index"]: m.get_attr("IFLA_IFNAME") for m in ipr.get_links()}
    out = []
    for m in ipr.addr("dump"):
        a = m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")
        if a and ipaddress.ip_address(a) == ip:
            out.append((m["index"], names.get(m["index"], "?"), m.get_attr("IFA_PROTO")))
    return out


def arp_exposure(ipr: IPRoute, vip: VipSpec) -> str | None:
    """Why this host would answer ARP for the VIP, or None."""
    for _, ifname, proto in _addrs(ipr, vip.ip):
        if ifname != "lo" and proto != VIPD_PROTO:
            return f"{vip.ip} is on {ifname} (not put there by vipd): this host answers ARP for it"
    if vip.version != 4:
        return None  # IPv6: neighbour solicitations are answered only for addresses on the receiving link
    base = read_sysctl("all", "arp_ignore")
    for iface in sorted(os.listdir(_PROC)):
        if iface in ("all", "default", "lo"):
            continue
        eff = max(base, read_sysctl(iface, "arp_ignore"))
        if eff == 0 or 4 <= eff <= 7:
            return (f"net.ipv4.conf.{iface}.arp_ignore is {eff}: {iface} would answer ARP for {vip.ip} "
                    "(needs 1, 2, 3 or 8)")
    return None


class BackendRole:
    """VIPs on lo + ARP sysctls while started; everything restored at stop()."""

    def __init__(self, nl: Netlink, vips: Sequence[VipSpec]) -> None:
        self.nl = nl
        self.vips = [v for v in vips if v.services]
        self._saved: dict[str, int] = {}
        self._added: list[VipSpec] = []

    async def start(self) -> None:
        """Raises BackendRefused (nothing changed, or everything changed undone) with the reason."""
        if any(v.version == 4 for v in self.vips):
            for name, value in SYSCTLS.items():
                old = read_sysctl("all", name)
                self._saved[name] = old
                if old < value:
                    write_sysctl("all", name, value)
                    log.info("dsr_backend_sysctl", key=f"net.ipv4.conf.all.{name}", old=old, new=value)
        try:
            for v in self.vips:
                reason = await self.nl.call(lambda ipr: arp_exposure(ipr, v))
                if reason:
                    raise BackendRefused(f"refusing to be a DSR backend for {v.name}: {reason}")
                if v.mode != "anycast":
                    await self.nl.call(lambda ipr: _add_lo(ipr, v))
                    self._added.append(v)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        for v in self._added:
            await self.nl.call(lambda ipr: _del_lo(ipr, v.ip))
        self._added = []
        for name, old in self._saved.items():
            write_sysctl("all", name, old)
        self._saved = {}


def _host_prefix(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    return ip.max_prefixlen


def _add_lo(ipr: IPRoute, vip: VipSpec) -> None:
    lo = ipr.link_lookup(ifname="lo")[0]
    present = [(i, p) for i, _, p in _addrs(ipr, vip.ip) if i == lo]
    if any(p != DSR_PROTO for _, p in present):
        return  # already local on lo (e.g. put there by the ownership core): nothing to add, nothing to remove later
    ipr.addr("replace", index=lo, address=str(vip.ip), prefixlen=_host_prefix(vip.ip), proto=DSR_PROTO)


def _del_lo(ipr: IPRoute, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    lo = ipr.link_lookup(ifname="lo")[0]
    for i, _, p in _addrs(ipr, ip):
        if i == lo and p == DSR_PROTO:
            try:
                ipr.addr("del", index=lo, address=str(ip), prefixlen=_host_prefix(ip))
            except NetlinkError as e:
                if e.code != 99:
                    raise


async def cleanup(nl: Netlink) -> int:
    """Remove every address vipd's backend role left (tag DSR_PROTO); the count."""
    def job(ipr: IPRoute) -> int:
        n = 0
        for m in ipr.addr("dump"):
            if m.get_attr("IFA_PROTO") == DSR_PROTO:
                ip = ipaddress.ip_address(m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS"))
                ipr.addr("del", index=m["index"], address=str(ip), prefixlen=m["prefixlen"])
                n += 1
        return n
    return await nl.call(job)

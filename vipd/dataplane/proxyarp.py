"""Does the segment itself answer ARP (proxy ARP, as cloud VPCs do)? Then L2 VIPs cannot work.

In many cloud networks (AWS, GCP, Azure VNets, OpenStack with an ARP responder) the virtual switch
answers every ARP request itself, with one MAC (AWS: ee:ff:ff:ff:ff:ff), for addresses that no
machine holds too, and delivers a packet only to the machine the cloud's API assigned the address to.
A gratuitous ARP changes nothing there: a VIP "claimed" that way looks fine on the host and is
unreachable from everywhere else.

:func:`detect_proxy_arp` asks, the way ``arping`` does, for a few addresses of the subnet that nobody
should hold (not ours, not the VIPs, not in the neighbour table, not the gateway) and for the
gateway. The verdict is "proxy ARP" when two or more such addresses are answered by one MAC, or one
of them by the gateway's MAC: a real machine answers only for its own address. Probes go out of the
interface through :func:`vipd.dataplane.conflict.arp_who_has` (AF_PACKET, made in the Netlink's netns).
"""

from __future__ import annotations

import ipaddress
import random
import socket
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import trio
from pyroute2 import IPRoute

from vipd.dataplane.address import VIPD_PROTO
from vipd.dataplane.conflict import ConflictProbeError, arp_who_has
from vipd.dataplane.netlink import Netlink
from vipd.errors import DataplaneError

IPv4 = ipaddress.IPv4Address

# Spelled out once: doctor, the daemon's log line and `vipd status` all say this.
PROXY_ARP_EXPLANATION = (
    "the network itself answers ARP for addresses nobody holds (proxy ARP, as cloud VPCs do): it never "
    "learns from a host's gratuitous ARP, so an L2 VIP claimed here looks held and is unreachable")
PROXY_ARP_FIX = (
    "do not use L2 VIPs on this segment: use routed VIPs (interface = \"lo\", announced to the router "
    "with BGP by BIRD or FRR: see vipd(8) ROUTED VIPS), or move a secondary private IP through the "
    "cloud's own API from a vipd hook (AWS assign-private-ip-addresses --allow-reassignment, GCP alias "
    "IP ranges, Azure NIC ipconfigs)")


@dataclass(frozen=True)
class SegmentFacts:
    """What the kernel knows about one interface: its MAC, IPv4 addresses, neighbours, gateway."""

    ifname: str
    mac: Optional[str]
    addresses: tuple[ipaddress.IPv4Interface, ...]
    neighbours: frozenset[IPv4]
    gateway: Optional[IPv4]
    moving: frozenset[IPv4] = frozenset()  # addresses vipd added (IFA_PROTO): they move with ownership

    def sender_for(self, subnet: ipaddress.IPv4Network, avoid: Iterable[IPv4] = ()) -> Optional[IPv4]:
        """Our address to ask from: one in ``subnet``, else any IPv4 address of the interface; never
        one of ``avoid`` nor one vipd added (a VIP this host happens to hold now would move with
        ownership; one an earlier run left, or one no longer configured here, may be another host's
        now, and an ARP request naming it as its sender would point the neighbours' caches here)."""
        skip = set(avoid) | self.moving
        own = [a.ip for a in self.addresses if a.ip not in skip]
        inside = [ip for ip in own if ip in subnet] or own
        return inside[0] if inside else None


@dataclass(frozen=True)
class ProxyArpVerdict:
    """The outcome of :func:`detect_proxy_arp` on one interface for one subnet."""

    ifname: str
    subnet: ipaddress.IPv4Network
    proxy_arp: bool
    mac: Optional[str]  # the MAC that answers for everything, when proxy_arp
    probed_unused: dict[IPv4, Optional[str]] = field(default_factory=dict)  # address -> answering MAC
    gateway: Optional[IPv4] = None
    gateway_mac: Optional[str] = None
    sender: Optional[IPv4] = None
    testable: bool = True
    reason: str = ""  # why not testable, or what was seen

    def as_dict(self) -> dict[str, Any]:
        return {"interface": self.ifname, "subnet": str(self.subnet), "proxy_arp": self.proxy_arp, "mac": self.mac,
                "probed_unused": {str(k): v for k, v in self.probed_unused.items()},
                "gateway": str(self.gateway) if self.gateway else None, "gateway_mac": self.gateway_mac,
                "sender": str(self.sender) if self.sender else None, "testable": self.testable,
                "reason": self.reason}


def _facts(ipr: IPRoute, ifname: str) -> SegmentFacts:
    links = ipr.link("get", ifname=ifname)
    if not links:
        raise DataplaneError(f"interface {ifname!r}: not found")
    link = links[0]
    index, mac = link["index"], link.get("IFLA_ADDRESS")
    dumped = [m for m in ipr.addr("dump", family=socket.AF_INET) if m["index"] == index]
    addrs = tuple(ipaddress.IPv4Interface(f"{m.get('IFA_ADDRESS')}/{m['prefixlen']}") for m in dumped)
    moving = frozenset(IPv4(m.get("IFA_ADDRESS")) for m in dumped if m.get("IFA_PROTO") == VIPD_PROTO)
    neigh = frozenset(IPv4(m.get("NDA_DST")) for m in ipr.neigh("dump", family=socket.AF_INET)
                      if m["ifindex"] == index and m.get("NDA_DST") and m.get("NDA_LLADDR"))
    gateway = None
    for r in ipr.route("dump", family=socket.AF_INET):
        if r["dst_len"] == 0 and r.get("RTA_GATEWAY") and r.get("RTA_OIF") == index and r.get("RTA_TABLE") == 254:
            gateway = IPv4(r.get("RTA_GATEWAY"))
            break
    return SegmentFacts(ifname, mac if mac and mac != "00:00:00:00:00:00" else None, addrs, neigh, gateway, moving)


async def segment_facts(nl: Netlink, ifname: str) -> SegmentFacts:
    """The interface's MAC, IPv4 addresses, known neighbours and default gateway (one netlink job)."""
    return await nl.call_checked(f"interface {ifname!r}", lambda ipr: _facts(ipr, ifname), DataplaneError)


def unused_candidates(subnet: ipaddress.IPv4Network, exclude: Iterable[IPv4], n: int,
                      rng: random.Random | None = None) -> list[IPv4]:
    """Up to ``n`` addresses of ``subnet`` (never its network or broadcast address) not in ``exclude``,
    picked at random so that a real machine sitting on one fixed pick cannot fool every run."""
    rng = rng or random.Random()
    taken = set(exclude)
    first, last = int(subnet.network_address) + 1, int(subnet.broadcast_address) - 1
    if subnet.prefixlen >= 31 or last < first:
        return []
    size = last - first + 1
    if size <= 4096:
        free = [IPv4(i) for i in range(first, last + 1) if IPv4(i) not in taken]
        return rng.sample(free, min(n, len(free)))
    picks: list[IPv4] = []
    for _ in range(64 * n):  # bounded; a big subnet is almost all free
        ip = IPv4(first + rng.randrange(size))
        if ip not in taken and ip not in picks:
            picks.append(ip)
            if len(picks) == n:
                break
    return picks


def judge(ifname: str, subnet: ipaddress.IPv4Network, answers: dict[IPv4, Optional[str]], gateway: Optional[IPv4],
          gateway_mac: Optional[str], sender: Optional[IPv4]) -> ProxyArpVerdict:
    """The verdict from what answered (pure: unit-tested without a network)."""
    macs = [m for m in answers.values() if m is not None]
    common = max(set(macs), key=macs.count) if macs else ""
    proxy = bool(common) and (macs.count(common) >= 2 or (gateway_mac is not None and common == gateway_mac))
    if proxy:
        reason = f"{macs.count(common)} of {len(answers)} unused addresses answered by {common}"
        if gateway_mac == common:
            reason += ", the gateway's MAC"
    elif macs:
        reason = "an unused-looking address was answered by its own machine (no proxy pattern)"
    else:
        reason = f"no answer for {len(answers)} unused addresses"
    return ProxyArpVerdict(ifname, subnet, proxy, common if proxy else None, dict(answers), gateway, gateway_mac,
                           sender, True, reason)


async def detect_proxy_arp(nl: Netlink, ifname: str, subnet: ipaddress.IPv4Network | str, *,
                           avoid: Iterable[IPv4] = (), samples: int = 3, probes: int = 3, wait: float = 0.3,
                           rng: random.Random | None = None) -> ProxyArpVerdict:
    """Ask for ``samples`` unused addresses of ``subnet`` and for the gateway on ``ifname``, all at once
    (``probes`` requests each, ``wait`` s apart: about ``probes * wait`` s in all). ``avoid``: addresses
    that may legitimately answer (the VIPs). ConflictProbeError / DataplaneError when it cannot probe
    (no such interface, no MAC, interface down, no permission)."""
    net = ipaddress.IPv4Network(subnet, strict=False)
    facts = await segment_facts(nl, ifname)
    if facts.mac is None:
        raise ConflictProbeError(f"interface {ifname!r} has no hardware address")
    avoid = set(avoid)
    sender = facts.sender_for(net, avoid)
    gateway = facts.gateway if facts.gateway is not None and facts.gateway in net else None
    exclude = {a.ip for a in facts.addresses} | set(facts.neighbours) | avoid | ({gateway} if gateway else set())
    targets = unused_candidates(net, exclude, samples, rng)
    if sender is None or not targets:
        why = "the interface has no IPv4 address to ask from" if sender is None else \
            f"{net} has no address left that nobody holds"
        return ProxyArpVerdict(ifname, net, False, None, {}, gateway, None, sender, False, why)
    answers: dict[IPv4, Optional[str]] = {}
    gateway_mac: list[Optional[str]] = [None]

    asker: IPv4 = sender

    async def ask(ip: IPv4, into_gateway: bool) -> None:
        mac = await arp_who_has(nl, ifname, facts.mac, ip, asker, probes=probes, wait=wait)
        if into_gateway:
            gateway_mac[0] = mac
        else:
            answers[ip] = mac

    async with trio.open_nursery() as nursery:
        for ip in targets:
            nursery.start_soon(ask, ip, False)
        if gateway is not None:
            nursery.start_soon(ask, gateway, True)
    ordered = {ip: answers.get(ip) for ip in targets}
    return judge(ifname, net, ordered, gateway, gateway_mac[0], sender)

"""Address conflict detection: is another machine already using the VIP?

* :func:`arp_probe` (IPv4, RFC 5227): broadcast ARP requests with sender IP 0.0.0.0 and target
  = VIP; a conflict is any ARP frame from another MAC whose *sender* IP is the VIP (its reply, or
  its own announcement), or another MAC probing for the same VIP at the same time.
* :func:`ipv6_dad` (RFC 4862 DAD): a neighbour solicitation from :: to the VIP's solicited-node
  multicast group; a conflict is a neighbour advertisement for the VIP from another MAC, or
  another MAC's DAD solicitation for it.
* :class:`vipd.dataplane.duplicates.DuplicateResponderWatch`: while owning, one per interface, reports (ip, mac) when another
  MAC claims an owned VIP (gratuitous or broadcast ARP with that sender IP, an NA for it). Passive
  listening sees broadcasts, multicast NAs and frames sent to us, not unicast replies between two
  other machines; with ``probe_interval`` it also probes every owned VIP now and then, and a
  foreign holder answers those probes.

Frames are sent and received on AF_PACKET sockets bound to the interface and made in the
Netlink's netns, as trio sockets (never blocking the loop); our own frames (PACKET_OUTGOING, or
our MAC) never count. The IPv6 socket carries a classic BPF filter so that only neighbour
solicitations and advertisements reach Python. A result of "no conflict" means nobody answered
within ``probes * wait`` seconds: a machine that is down or filtered cannot be seen.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import os
import socket
import struct
import weakref
from dataclasses import dataclass
from typing import AsyncGenerator, Callable, Optional

import trio

from vipd.coalesce import Coalescer
from vipd.model import VipSpec
from vipd.dataplane.addrdump import IPAddress
from vipd.dataplane.announce import close_packet_socket
from vipd.dataplane.frames import arp_probe as arp_probe_frame
from vipd.dataplane.frames import dad_ns as dad_ns_frame
from vipd.dataplane.frames import solicited_node
from vipd.dataplane.frames import arp_request
from vipd.dataplane.frames import BROADCAST, MIN_FRAME, ZERO_MAC  # noqa: F401
from vipd.dataplane.netlink import Netlink
from vipd.errors import AddressError, DataplaneError


ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
PACKET_OUTGOING = 4
SO_ATTACH_FILTER = 26
FULL_QUEUE_RETRIES = 100  # ENOBUFS waits of 1 ms a send_all rides out before it fails
_ANY4 = ipaddress.IPv4Address(0)
_ND_NS, _ND_NA = 135, 136


class ConflictProbeError(DataplaneError):
    """Probing or watching could not be done (interface gone or down, no MAC, EPERM)."""


class AddressConflict(AddressError):
    """Another machine (``mac``) answers for ``ip``: the VIP must not be claimed."""

    def __init__(self, ip: IPAddress, mac: str, interface: str) -> None:
        super().__init__(f"{ip} on {interface} is in use by {mac}")
        self.ip, self.mac, self.interface = ip, mac, interface


# ------------------------------------------------------------------------------- frames

# arp_probe_frame, dad_ns_frame and solicited_node: imported above from vipd.dataplane.frames (struct, no scapy)


@dataclass(frozen=True)
class Claim:
    """What one received frame says. kind: "arp" (mac uses ip as its sender address), "probe"
    (mac probes for ip, ARP with sender 0.0.0.0), "na" (mac advertises ip), "dad" (mac runs DAD
    for ip)."""

    kind: str
    ip: IPAddress
    mac: str


def _mac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def parse_arp(frame: bytes) -> Optional[Claim]:
    """An Ethernet ARP frame (IPv4 over Ethernet) -> Claim, or None when it is something else."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x06":
        return None
    htype, ptype, hlen, plen, op = struct.unpack_from("!HHBBH", frame, 14)
    if (htype, ptype, hlen, plen) != (1, 0x0800, 6, 4):
        return None
    sha, spa, tpa = frame[22:28], ipaddress.IPv4Address(frame[28:32]), ipaddress.IPv4Address(frame[38:42])
    if spa != _ANY4:
        return Claim("arp", spa, _mac(sha))
    if op == 1:
        return Claim("probe", tpa, _mac(sha))
    return None


def parse_nd(frame: bytes) -> Optional[Claim]:
    """An Ethernet IPv6 NS/NA frame (no extension headers, hop limit 255) -> Claim, or None.
    An NA's MAC is its target link-layer option, else the frame's source; only an NS from ::
    (DAD) is a claim."""
    if len(frame) < 78 or frame[12:14] != b"\x86\xdd" or frame[20] != 58 or frame[21] != 255:
        return None
    icmp_type, target = frame[54], ipaddress.IPv6Address(frame[62:78])
    src = ipaddress.IPv6Address(frame[22:38])
    if icmp_type == _ND_NS:
        return Claim("dad", target, _mac(frame[6:12])) if src.is_unspecified else None
    if icmp_type != _ND_NA:
        return None
    mac, off = _mac(frame[6:12]), 78
    while off + 8 <= len(frame):  # options: type, length in units of 8 bytes
        opt_type, opt_len = frame[off], frame[off + 1] * 8
        if opt_len == 0:
            break
        if opt_type == 2 and opt_len >= 8:
            mac = _mac(frame[off + 2:off + 8])
            break
        off += opt_len
    return Claim("na", target, mac)


# ------------------------------------------------------------------------------- sockets

# cBPF: ether type IPv6, next header ICMPv6, ICMPv6 type NS or NA; anything else is dropped.
_ND_FILTER = [
    (0x28, 0, 0, 12), (0x15, 0, 6, ETH_P_IPV6),  # ldh [12]; jeq 0x86dd else drop
    (0x30, 0, 0, 20), (0x15, 0, 4, 58),  # ldb [20]; jeq 58 else drop
    (0x30, 0, 0, 54), (0x15, 1, 0, _ND_NS), (0x15, 0, 1, _ND_NA),  # ldb [54]; NS or NA
    (0x06, 0, 0, 0xFFFF), (0x06, 0, 0, 0),  # accept; drop
]


def _attach_filter(sock: trio.socket.SocketType, program: list[tuple[int, int, int, int]]) -> None:
    insns = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in program))
    fprog = struct.pack("HL", len(program), ctypes.addressof(insns))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


class _PacketSocket:
    """An AF_PACKET socket for one ether type, bound to one interface in the Netlink's netns."""

    def __init__(self, nl: Netlink, ifname: str, proto: int) -> None:
        self.nl, self.ifname, self.proto = nl, ifname, proto
        self.sock: trio.socket.SocketType | None = None

    async def __aenter__(self) -> "_PacketSocket":
        try:
            self.sock = await self.nl.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(self.proto))
        except DataplaneError as e:
            raise ConflictProbeError(f"{self.ifname}: {e}") from None
        try:
            if self.proto == ETH_P_IPV6:
                _attach_filter(self.sock, _ND_FILTER)
            await self.sock.bind((self.ifname, self.proto))
        except OSError as e:
            await close_packet_socket(self.sock)
            raise ConflictProbeError(f"{self.ifname}: {e.strerror or e} (errno {e.errno})") from None
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.sock is not None:
            await close_packet_socket(self.sock)

    async def send(self, frame: bytes) -> None:
        assert self.sock is not None
        try:
            await self.sock.send(frame)
        except OSError as e:
            raise ConflictProbeError(f"send on {self.ifname}: {e.strerror or e} (errno {e.errno})") from None

    async def send_all(self, frames: list[bytes]) -> None:
        """Every frame in order, without a scheduler round each (a start probes a thousand addresses
        while the loop is at its busiest): waits only while the socket's buffer is full, or (a
        millisecond, up to FULL_QUEUE_RETRIES times) while the device's queue is (ENOBUFS: a
        qdisc holds ~1,000 frames, and a burst can outrun a slow link)."""
        assert self.sock is not None
        fd, i, full = self.sock.fileno(), 0, 0
        try:
            while i < len(frames):
                try:
                    os.write(fd, frames[i])
                    i += 1
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self.sock)
                except OSError as e:
                    if e.errno != errno.ENOBUFS or full >= FULL_QUEUE_RETRIES:
                        raise
                    full += 1
                    await trio.sleep(0.001)
        except OSError as e:
            raise ConflictProbeError(f"send on {self.ifname}: {e.strerror or e} (errno {e.errno})") from None
        await trio.lowlevel.checkpoint()

    async def claims(self, mine: str) -> AsyncGenerator[Claim, None]:
        """Claims in frames that arrive on this interface from any MAC but ``mine``."""
        assert self.sock is not None
        parse = parse_arp if self.proto == ETH_P_ARP else parse_nd
        while True:
            try:
                frame, addr = await self.sock.recvfrom(2048)
            except OSError as e:
                raise ConflictProbeError(f"receive on {self.ifname}: {e.strerror or e} (errno {e.errno})") from None
            if addr[0] != self.ifname or addr[2] == PACKET_OUTGOING:
                continue  # queued before bind from another interface, or our own frame
            claim = parse(frame)
            if claim is not None and claim.mac != mine and _mac(frame[6:12]) != mine:
                yield claim


async def _our_mac(nl: Netlink, ifname: str) -> str:
    try:
        link = await nl.link(ifname)
    except DataplaneError as e:
        raise ConflictProbeError(str(e)) from None
    if link.mac is None:
        raise ConflictProbeError(f"interface {ifname!r} has no hardware address")
    return link.mac.lower()


# ------------------------------------------------------------------------------- probes

async def _probe(nl: Netlink, ifname: str, mac: str | None, proto: int, frame_for: Callable[[str], bytes],
                 hit: Callable[[Claim], bool], probes: int, wait: float) -> str | None:
    mine = (mac or await _our_mac(nl, ifname)).lower()
    frame = frame_for(mine)
    found: str | None = None
    async with _PacketSocket(nl, ifname, proto) as ps:
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                for i in range(probes):
                    if i:
                        await trio.sleep(wait)
                    await ps.send(frame)
                await trio.sleep(wait)
                nursery.cancel_scope.cancel()  # nobody answered in time

            nursery.start_soon(send)
            async with contextlib.aclosing(ps.claims(mine)) as claims:  # type: ignore[type-var]
                async for claim in claims:
                    if hit(claim):
                        found = claim.mac
                        nursery.cancel_scope.cancel()
                        break
    return found


async def arp_probe(nl: Netlink, ifname: str, mac: str | None, ip: ipaddress.IPv4Address | str, *,
                    probes: int = 2, wait: float = 0.2) -> str | None:
    """RFC 5227 probe for ``ip`` on ``ifname`` (``mac``: ours; None looks it up): ``probes``
    probes ``wait`` s apart, listening until ``wait`` s after the last. Returns the MAC of another
    machine that uses or probes for ``ip``, or None. ConflictProbeError when it cannot probe."""
    addr = ipaddress.IPv4Address(ip)
    return await _probe(nl, ifname, mac, ETH_P_ARP, lambda m: arp_probe_frame(m, addr),
                        lambda c: c.ip == addr and c.kind in ("arp", "probe"), probes, wait)


async def arp_who_has(nl: Netlink, ifname: str, mac: str | None, target: ipaddress.IPv4Address | str,
                      sender: ipaddress.IPv4Address | str, *, probes: int = 3, wait: float = 0.3) -> str | None:
    """Ask "who has ``target``, tell ``sender``" the way arping does (``probes`` requests ``wait`` s
    apart, listening until ``wait`` s after the last): the MAC of the first other machine that answers
    (or otherwise uses ``target`` as its sender address), or None. Unlike :func:`arp_probe` this is
    an ordinary request, which routers that proxy ARP answer (they ignore RFC 5227 probes)."""
    tpa, spa = ipaddress.IPv4Address(target), ipaddress.IPv4Address(sender)
    return await _probe(nl, ifname, mac, ETH_P_ARP, lambda m: arp_request(m, spa, tpa),
                        lambda c: c.ip == tpa and c.kind == "arp", probes, wait)


async def ipv6_dad(nl: Netlink, ifname: str, mac: str | None, ip: ipaddress.IPv6Address | str, *,
                   probes: int = 1, wait: float = 0.4) -> str | None:
    """Duplicate address detection for ``ip`` on ``ifname``: the MAC of another machine that
    advertises (or runs DAD for) ``ip``, or None. ConflictProbeError when it cannot probe."""
    addr = ipaddress.IPv6Address(ip)
    return await _probe(nl, ifname, mac, ETH_P_IPV6, lambda m: dad_ns_frame(m, addr),
                        lambda c: c.ip == addr and c.kind in ("na", "dad"), probes, wait)


async def probe_vip(nl: Netlink, vip: VipSpec, mac: str | None = None, *, wait: float = 0.2) -> str | None:
    """The conflicting MAC for ``vip`` on its interface, or None (always None on ``lo``)."""
    if vip.on_loopback:
        return None
    if isinstance(vip.ip, ipaddress.IPv4Address):
        return await arp_probe(nl, vip.interface, mac, vip.ip, probes=2, wait=wait)
    return await ipv6_dad(nl, vip.interface, mac, vip.ip, probes=1, wait=2 * wait)


async def probe_many(nl: Netlink, ifname: str, ips: list[IPAddress], mac: str | None = None, *,
                     wait: float = 0.2) -> dict[IPAddress, str]:
    """probe_vip for many addresses on one interface at once, through one ARP and one ND socket
    (not one pair per address, each receiving every other address's probes): every IPv4 address
    probed twice ``wait`` apart, every IPv6 one once; all listened for until ``2 * wait`` s after
    the first probe. Returns the conflicting MAC by address (absent: nobody answered)."""
    mine = (mac or await _our_mac(nl, ifname)).lower()
    found: dict[IPAddress, str] = {}
    v4 = [ip for ip in ips if isinstance(ip, ipaddress.IPv4Address)]
    v6 = [ip for ip in ips if isinstance(ip, ipaddress.IPv6Address)]

    async def run(proto: int, frames: list[bytes], targets: set[IPAddress], kinds: tuple[str, ...],
                  probes: int) -> None:
        async with _PacketSocket(nl, ifname, proto) as ps, trio.open_nursery() as nursery:
            async def send() -> None:
                for i in range(probes):
                    if i:
                        await trio.sleep(2 * wait / probes)
                    await ps.send_all(frames)
                await trio.sleep(2 * wait / probes)
                nursery.cancel_scope.cancel()  # nobody else answered in time

            nursery.start_soon(send)
            async with contextlib.aclosing(ps.claims(mine)) as claims:
                async for claim in claims:
                    if claim.ip in targets and claim.kind in kinds and claim.ip not in found:
                        found[claim.ip] = claim.mac
                        if len(found) == len(targets):
                            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        if v4:
            nursery.start_soon(run, ETH_P_ARP, [arp_probe_frame(mine, ip) for ip in v4], set(v4), ("arp", "probe"), 2)  # type: ignore[arg-type]
        if v6:
            nursery.start_soon(run, ETH_P_IPV6, [dad_ns_frame(mine, ip) for ip in v6], set(v6), ("na", "dad"), 1)  # type: ignore[arg-type]
    return found


_batchers: "weakref.WeakKeyDictionary[Netlink, dict[tuple[str, Optional[str], float], Coalescer[IPAddress, Optional[str]]]]" = \
    weakref.WeakKeyDictionary()


async def check_free(nl: Netlink, vip: VipSpec, mac: str | None = None, *, wait: float = 0.2) -> None:
    """Raise AddressConflict (an AddressError) when another machine answers for ``vip``. The
    checks that many tasks start in the same moment on one interface share one probe_many."""
    if vip.on_loopback:
        return
    per_nl = _batchers.setdefault(nl, {})
    key = (vip.interface, mac, wait)
    if key not in per_nl:
        async def batch(ips: list[IPAddress]) -> list[Optional[str]]:
            found = await probe_many(nl, vip.interface, ips, mac, wait=wait)
            return [found.get(ip) for ip in ips]

        per_nl[key] = Coalescer(batch)
    other = await per_nl[key].submit(vip.ip)
    if other is not None:
        raise AddressConflict(vip.ip, other, vip.interface)

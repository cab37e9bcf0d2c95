"""Gratuitous ARP and unsolicited IPv6 NA: tell the segment the VIP now lives at our MAC.

Frames are built with scapy's l2 / inet6 layers only (``scapy.all`` costs ~30 MiB more RSS) and
sent through an AF_PACKET socket bound to the VIP's interface (made in the Netlink's netns), as
a trio socket, so sending never blocks the event loop. What receivers do with them (Linux, see
FACTS.md):

* ARP request with sender IP = target IP = VIP updates an existing neighbour entry in any state
  but PERMANENT, whatever ``arp_accept`` is; it creates none unless ``arp_accept`` >= 1.
* ARP reply counts only if its target MAC equals its sender MAC (the form built here).
* NA to ff02::1, hop limit 255, Override=1, with the target link-layer address option, updates
  existing entries (creates none).
"""

from __future__ import annotations

import ipaddress
import os
import socket

import trio
from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6NDOptDstLLAddr, IPv6
from scapy.layers.l2 import ARP, Ether

from vipd.config import VipSpec
from vipd.dataplane.netlink import Netlink
from vipd.errors import AnnounceError, DataplaneError

BROADCAST = "ff:ff:ff:ff:ff:ff"
ZERO_MAC = "00:00:00:00:00:00"
ALL_NODES = "ff02::1"
ALL_NODES_MAC = "33:33:00:00:00:01"
MIN_FRAME = 60  # Ethernet minimum without FCS; padded here so no driver has to
ARP_REQUEST = 1
ARP_REPLY = 2


def _pad(frame: bytes) -> bytes:
    return frame + b"\x00" * (MIN_FRAME - len(frame)) if len(frame) < MIN_FRAME else frame


def _arp(mac: str, ip: ipaddress.IPv4Address, op: int, hwdst: str) -> bytes:
    if not isinstance(ip, ipaddress.IPv4Address):
        raise TypeError(f"ARP needs an IPv4Address, got {ip!r}")
    frame = Ether(src=mac, dst=BROADCAST) / ARP(op=op, hwsrc=mac, psrc=str(ip), hwdst=hwdst, pdst=str(ip))
    return _pad(bytes(frame))


def garp_request(mac: str, ip: ipaddress.IPv4Address) -> bytes:
    """Broadcast ARP request asking for ``ip`` from ``ip`` (sender = target), target MAC zero."""
    return _arp(mac, ip, ARP_REQUEST, ZERO_MAC)


def garp_reply(mac: str, ip: ipaddress.IPv4Address) -> bytes:
    """Broadcast ARP reply for ``ip``; target MAC = sender MAC, the only form Linux accepts."""
    return _arp(mac, ip, ARP_REPLY, mac)


def arp_request(mac: str, sender: ipaddress.IPv4Address, target: ipaddress.IPv4Address) -> bytes:
    """An ordinary broadcast ARP request "who has ``target``, tell ``sender``" (what arping sends)."""
    frame = Ether(src=mac, dst=BROADCAST) / ARP(op=ARP_REQUEST, hwsrc=mac, psrc=str(sender), hwdst=ZERO_MAC,
                                                pdst=str(target))
    return _pad(bytes(frame))


def unsolicited_na(mac: str, ip: ipaddress.IPv6Address) -> bytes:
    """NA from ``ip`` to all nodes: hop limit 255, R=0 S=0 O=1, target link-layer address option."""
    if not isinstance(ip, ipaddress.IPv6Address):
        raise TypeError(f"NA needs an IPv6Address, got {ip!r}")
    frame = (
        Ether(src=mac, dst=ALL_NODES_MAC)
        / IPv6(src=str(ip), dst=ALL_NODES, hlim=255)
        / ICMPv6ND_NA(R=0, S=0, O=1, tgt=str(ip))
        / ICMPv6NDOptDstLLAddr(lladdr=mac)
    )
    return bytes(frame)


def frames_for(vip: VipSpec, mac: str) -> list[bytes]:
    """One announcement burst for ``vip`` from ``mac``."""
    if vip.version == 4:
        frames = [garp_request(mac, vip.ip)]
        if vip.announce_reply:
            frames.append(garp_reply(mac, vip.ip))
        return frames
    return [unsolicited_na(mac, vip.ip)]


async def close_packet_socket(sock: trio.socket.SocketType) -> None:
    """Closing an AF_PACKET socket waits for an RCU grace period (measured 8-16 ms): do it in a
    worker thread so the event loop does not stall (it holds no pyroute2 state)."""
    fd = sock.detach()
    with trio.CancelScope(shield=True):
        await trio.to_thread.run_sync(os.close, fd)


class Announcer:
    """Sends a VIP's announcement bursts out of its interface."""

    def __init__(self, nl: Netlink) -> None:
        self.nl = nl

    async def announce(self, vip: VipSpec) -> int:
        """Send ``vip.announce_count`` bursts, ``vip.announce_interval`` s apart, the first at
        once; return the number of frames sent. Nothing is sent (0) for VIPs on ``lo`` or with
        a count of 0. Raises AnnounceError (interface gone or down, no MAC, EPERM, ...).

        Takes (count - 1) * interval seconds; run it in its own task if that matters.
        """
        if vip.on_loopback or vip.announce_count <= 0:
            return 0
        ifname = vip.interface
        try:
            link = await self.nl.link(ifname)
        except DataplaneError as e:
            raise AnnounceError(f"announce {vip.name}: {e}") from None
        if link.mac is None:
            raise AnnounceError(f"announce {vip.name}: interface {ifname!r} has no hardware address")
        frames = frames_for(vip, link.mac)
        try:
            # protocol 0: a send-only socket, nothing is queued for us to read
            sock = await self.nl.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        except DataplaneError as e:
            raise AnnounceError(f"announce {vip.name} on {ifname}: {e}") from None
        sent = 0
        try:
            await sock.bind((ifname, 0))
            for burst in range(vip.announce_count):
                if burst:
                    await trio.sleep(vip.announce_interval)
                for frame in frames:
                    await sock.send(frame)
                    sent += 1
        except OSError as e:
            reason = e.strerror or str(e)
            raise AnnounceError(
                f"announce {vip.name} on {ifname}: {reason} (errno {e.errno}) after {sent} frames"
            ) from None
        finally:
            await close_packet_socket(sock)
        return sent

"""Gratuitous ARP and unsolicited IPv6 NA: tell the segment the VIP now lives at our MAC.

Frames come from vipd.dataplane.frames (struct, no scapy) and are sent through an AF_PACKET
socket bound to the VIP's interface (made in the Netlink's netns), as a trio socket, so sending
never blocks the event loop. What receivers do with them (Linux, see FACTS.md):

* ARP request with sender IP = target IP = VIP updates an existing neighbour entry in any state
  but PERMANENT, whatever ``arp_accept`` is; it creates none unless ``arp_accept`` >= 1.
* ARP reply counts only if its target MAC equals its sender MAC (the form built here).
* NA to ff02::1, hop limit 255, Override=1, with the target link-layer address option, updates
  existing entries (creates none).

Batching: the announcements of every VIP on one interface are sent by one task through one
socket. The first caller for an idle interface runs the sender; later callers add their VIP to
its schedule (its first burst goes out at once, the next ones on the VIP's own interval) and wait
for their VIP's last burst. When the running caller is cancelled (its VIP stopped announcing), a
waiting caller takes over; the socket lives as long as there is something to send.
"""

from __future__ import annotations

import errno
import ipaddress
import math
import os
import socket
from typing import Optional

import trio

from vipd.model import VipSpec
from vipd.dataplane.frames import (ALL_NODES, ALL_NODES_MAC, ARP_REPLY, ARP_REQUEST, BROADCAST,  # noqa: F401
                                   MIN_FRAME, ZERO_MAC, garp_reply, garp_request, unsolicited_na)
from vipd.dataplane.netlink import Netlink
from vipd.errors import AnnounceError, DataplaneError


def frames_for(vip: VipSpec, mac: str) -> list[bytes]:
    """One announcement burst for ``vip`` from ``mac``."""
    if vip.version == 4:
        assert isinstance(vip.ip, ipaddress.IPv4Address)
        frames = [garp_request(mac, vip.ip)]
        if vip.announce_reply:
            frames.append(garp_reply(mac, vip.ip))
        return frames
    assert isinstance(vip.ip, ipaddress.IPv6Address)
    return [unsolicited_na(mac, vip.ip)]


async def close_packet_socket(sock: trio.socket.SocketType) -> None:
    """Closing an AF_PACKET socket waits for an RCU grace period (measured 8-16 ms): do it in a
    worker thread so the event loop does not stall (it holds no pyroute2 state)."""
    fd = sock.detach()
    with trio.CancelScope(shield=True):
        await trio.to_thread.run_sync(os.close, fd)


PER_CHECKPOINT = 256  # requests whose due bursts go out between two checkpoints of the sender


async def send_frame(sock: trio.socket.SocketType, frame: bytes) -> None:
    """One frame, written at once when the kernel takes it. trio's `send` ends every successful
    call with a scheduler checkpoint, and a checkpoint of a runnable task waits for the next
    scheduler batch: in a handover wave (thousands of unit tasks runnable) the bursts of 1,000 VIPs
    went out one frame per batch, their last burst 0.5-0.7 s (p50) after the claim instead of 0.2 s
    (bench/scale.py, planned stop: "announced"). A full socket buffer (EAGAIN) still waits for the
    socket; ENOBUFS and other errors are raised to the caller as before."""
    while True:
        try:
            os.write(sock.fileno(), frame)
            return
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


class _Request:
    """One caller's VIP in an interface's schedule."""

    def __init__(self, vip: VipSpec) -> None:
        self.vip = vip
        self.left = vip.announce_count  # bursts still to send
        self.next_at = -math.inf  # the first burst: at once
        self.frames: Optional[list[bytes]] = None
        self.sent = 0
        self.dropped = 0  # frames the kernel refused with ENOBUFS (the token fence closed, a full queue)
        self.error: Optional[AnnounceError] = None
        self.finished = False
        self.wake = trio.Event()

    def finish(self, error: Optional[AnnounceError] = None) -> None:
        self.error, self.finished = error, True
        self.wake.set()


class _Interface:
    """The schedule and sender of one interface."""

    def __init__(self, nl: Netlink, ifname: str) -> None:
        self.nl, self.ifname = nl, ifname
        self.requests: list[_Request] = []
        self.running = False
        self.arrived = trio.Event()
        self.sockets = 0  # AF_PACKET sockets opened (for tests and benchmarks)

    async def announce(self, vip: VipSpec) -> int:
        req = _Request(vip)
        self.requests.append(req)
        self.arrived.set()
        try:
            while not req.finished:
                if not self.running:
                    self.running = True
                    try:
                        await self._send_all()
                    finally:
                        self.running = False
                        self._hand_over(req)
                else:
                    await req.wake.wait()
                    req.wake = trio.Event()
        finally:
            if req in self.requests:
                self.requests.remove(req)
        if req.error is not None:
            raise req.error
        return req.sent

    def _hand_over(self, leaving: _Request) -> None:
        """The sender stops (done, or its caller was cancelled): wake a waiting caller to take over."""
        waiting = [r for r in self.requests if not r.finished and r is not leaving]
        if waiting:
            waiting[0].wake.set()

    def _fail_all(self, reason: str) -> None:
        for r in list(self.requests):
            r.finish(AnnounceError(f"announce {r.vip.name} on {self.ifname}: {reason} after {r.sent} frames"))
        self.requests.clear()

    async def _send_all(self) -> None:
        try:
            link = await self.nl.link(self.ifname)
        except DataplaneError as e:
            for r in list(self.requests):
                r.finish(AnnounceError(f"announce {r.vip.name}: {e}"))
            self.requests.clear()
            return
        if link.mac is None:
            self._fail_all(f"interface {self.ifname!r} has no hardware address;")
            return
        try:
            # protocol 0: a send-only socket, nothing is queued for us to read
            sock = await self.nl.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        except DataplaneError as e:
            self._fail_all(str(e))
            return
        self.sockets += 1
        try:
            await sock.bind((self.ifname, 0))
            while self.requests:
                now = trio.current_time()
                for i, r in enumerate(list(self.requests)):
                    if i and i % PER_CHECKPOINT == 0:
                        await trio.lowlevel.checkpoint()  # (a burst of 10,000 VIPs holds no batch long)
                    if r.next_at > now:
                        continue
                    if r.frames is None:
                        r.frames = frames_for(r.vip, link.mac)  # built once per announcement
                    for frame in r.frames:
                        try:
                            await send_frame(sock, frame)
                            r.sent += 1
                        except OSError as e:  # one refused frame: the next burst may pass
                            if e.errno != errno.ENOBUFS:
                                raise
                            r.dropped += 1
                    r.left -= 1
                    r.next_at = now + r.vip.announce_interval
                    if r.left <= 0:
                        if r in self.requests:  # its caller may have been cancelled while we sent
                            self.requests.remove(r)
                        r.finish(None if r.sent else AnnounceError(
                            f"announce {r.vip.name} on {self.ifname}: all {r.dropped} frames refused by the "
                            "kernel (No buffer space available: the VIP's token fence closed, or a full queue)"))
                if not self.requests:
                    break
                self.arrived = trio.Event()
                with trio.move_on_at(min(r.next_at for r in self.requests)):
                    await self.arrived.wait()
        except OSError as e:
            self._fail_all(f"{e.strerror or e} (errno {e.errno})")
        finally:
            await close_packet_socket(sock)


class Announcer:
    """Sends VIPs' announcement bursts out of their interfaces, one sender task and one socket per
    interface at a time."""

    def __init__(self, nl: Netlink) -> None:
        self.nl = nl
        self._interfaces: dict[str, _Interface] = {}

    def sockets_opened(self, ifname: str) -> int:
        i = self._interfaces.get(ifname)
        return i.sockets if i else 0

    async def announce(self, vip: VipSpec) -> int:
        """Send ``vip.announce_count`` bursts, ``vip.announce_interval`` s apart, the first at
        once; return the number of frames sent. Nothing is sent (0) for VIPs on ``lo`` or with
        a count of 0. Raises AnnounceError (interface gone or down, no MAC, EPERM, ...).

        Takes (count - 1) * interval seconds; run it in its own task if that matters.
        """
        if vip.on_loopback or vip.announce_count <= 0:
            return 0
        iface = self._interfaces.get(vip.interface)
        if iface is None:
            iface = self._interfaces[vip.interface] = _Interface(self.nl, vip.interface)
        return await iface.announce(vip)

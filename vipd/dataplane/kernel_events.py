"""Kernel events that matter to vipd, read from an rtnetlink socket in the trio loop.

``kernel_events()`` opens a raw NETLINK_ROUTE socket in the netns of the calling thread (the
daemon runs inside its netns; ``kernel_events(nl)`` uses ``nl``'s netns instead), subscribes to
link and IPv4/IPv6 address notifications and yields:

* :class:`LinkChanged` when an interface goes up -> down or down -> up ("up" meaning
  administratively up with carrier, IFF_UP and IFF_RUNNING, the same as ``LinkInfo.up``); a
  deleted interface that was up counts as going down. Other link notifications (MTU, flags that
  do not change that state, bridge-port messages) are swallowed. The initial state comes from a
  link dump at start and is not reported.
* :class:`AddressRemoved` for every address deletion, including the kernel's own removal of an
  address whose lifetime ran out; ``proto`` is its IFA_PROTO tag (None when untagged).

No threads, no polling: the socket is a trio socket, messages are decoded with pyroute2's
``MarshalRtnl``. If the kernel drops notifications because we did not read fast enough
(ENOBUFS), the link state is re-read from a fresh dump and changes found that way are reported;
address deletions lost that way are not (vipd's periodic reconcile covers them).

Use it from a task that is cancelled to stop, or close it with ``contextlib.aclosing``.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional, Union

import trio
from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR
from pyroute2.netlink.rtnl import RTM_DELADDR, RTM_DELLINK, RTM_GETLINK, RTM_NEWLINK
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from vipd.dataplane.netlink import Netlink, link_info
from vipd.errors import DataplaneError

log = logging.getLogger(__name__)

IPInterface = Union[ipaddress.IPv4Interface, ipaddress.IPv6Interface]

RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100
GROUPS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR
RECV_SIZE = 1 << 16  # larger than any single rtnetlink skb, so nothing is truncated
RCVBUF = 1 << 20
SO_RCVBUFFORCE = 33


@dataclass(frozen=True)
class LinkChanged:
    ifname: str
    up: bool


@dataclass(frozen=True)
class AddressRemoved:
    ifname: str
    address: IPInterface
    proto: Optional[int]


Event = Union[LinkChanged, AddressRemoved]


async def open_socket(nl: Optional[Netlink] = None) -> trio.socket.SocketType:
    """A NETLINK_ROUTE trio socket bound to our groups, in the calling thread's netns, or in
    ``nl``'s netns when given."""
    family, type_, proto = socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
    if nl is not None:
        sock = await nl.socket(family, type_, proto)
    else:
        try:
            sock = trio.socket.socket(family, type_, proto)
        except OSError as e:
            raise DataplaneError(f"cannot open rtnetlink socket: {e.strerror}") from None
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)  # beyond rmem_max (root)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        await sock.bind((0, GROUPS))
    except OSError as e:
        sock.close()
        raise DataplaneError(f"cannot subscribe to rtnetlink events: {e.strerror}") from None
    return sock


class _Links:
    """Up/down state and name per interface index; turns notifications into changes."""

    def __init__(self) -> None:
        self.state: dict[int, tuple[str, bool]] = {}

    def name(self, index: int) -> Optional[str]:
        known = self.state.get(index)
        return known[0] if known else None

    def update(self, msg: Any, report: bool, report_new: bool) -> Optional[LinkChanged]:
        """Record the state; a change is returned if ``report``, a first sighting of an interface
        that is up only if ``report_new`` (not while the initial dump is still arriving)."""
        info = link_info(msg)
        old = self.state.get(info.index)
        self.state[info.index] = (info.name, info.up)
        if old is None:
            return LinkChanged(info.name, True) if report_new and info.up else None
        return LinkChanged(info.name, info.up) if report and old[1] != info.up else None

    def delete(self, index: int) -> Optional[LinkChanged]:
        old = self.state.pop(index, None)
        if old is not None and old[1]:
            return LinkChanged(old[0], False)
        return None


def _some(event: Optional[Event]) -> list[Event]:
    return [] if event is None else [event]


class _Reader:
    """Decodes what the socket delivers: our link dumps and the kernel's notifications."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.marshal = MarshalRtnl()
        self.links = _Links()
        self.portid = sock.getsockname()[0]
        self.seq = int.from_bytes(os.urandom(2), "big") + 1
        self.dump_seq: Optional[int] = None  # the dump in progress
        self.seeding = True  # the first dump sets the initial state silently
        self.seen: set[int] = set()
        self.redump = False

    async def request_dump(self) -> None:
        if self.dump_seq is not None:
            self.redump = True  # one dump at a time per socket; do another when this one ends
            return
        self.seq += 1
        msg = ifinfmsg()
        msg["header"]["type"] = RTM_GETLINK
        msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_DUMP
        msg["header"]["sequence_number"] = self.seq
        msg["header"]["pid"] = self.portid
        msg["family"] = socket.AF_UNSPEC
        msg.encode()
        await self.sock.send(msg.data)
        self.dump_seq = self.seq
        self.seen = set()

    async def read(self) -> list[Event]:
        try:
            data = await self.sock.recv(RECV_SIZE)
        except OSError as e:
            if e.errno == errno.ENOBUFS:
                log.warning("rtnetlink events overflowed; re-reading link state")
                await self.request_dump()
                return []
            raise DataplaneError(f"reading rtnetlink events failed: {e.strerror}") from None
        events: list[Event] = []
        for msg in self.marshal.parse(data):
            events.extend(self._handle(msg))
        if self.dump_seq is None and self.redump:
            self.redump = False
            await self.request_dump()
        return events

    def _ours(self, msg: Any) -> bool:
        """A reply to our dump, not a notification (which may carry another process's seq)."""
        h = msg["header"]
        return self.dump_seq is not None and h["sequence_number"] == self.dump_seq and h["pid"] == self.portid

    def _handle(self, msg: Any) -> list[Event]:
        kind = msg["header"]["type"]
        if self._ours(msg):
            if kind == NLMSG_ERROR and msg["header"].get("error") is not None:
                raise DataplaneError(f"rtnetlink link dump failed: {msg['header']['error']}")
            if kind == NLMSG_DONE:
                return self._dump_done()
            if kind == RTM_NEWLINK and msg["family"] == socket.AF_UNSPEC:
                self.seen.add(msg["index"])
                return _some(self.links.update(msg, report=not self.seeding, report_new=not self.seeding))
            return []
        # AF_BRIDGE link messages describe bridge ports (a DELLINK there is a port leaving): skip
        if kind == RTM_NEWLINK and msg["family"] == socket.AF_UNSPEC:
            return _some(self.links.update(msg, report=True, report_new=not self.seeding))
        if kind == RTM_DELLINK and msg["family"] == socket.AF_UNSPEC:
            return _some(self.links.delete(msg["index"]))
        if kind == RTM_DELADDR:
            return [self._address_removed(msg)]
        return []

    def _dump_done(self) -> list[Event]:
        """End of a dump: after an overflow, interfaces missing from it were deleted meanwhile."""
        self.dump_seq = None
        if self.seeding:
            self.seeding = False
            return []
        gone = [i for i in self.links.state if i not in self.seen]
        return [e for e in (self.links.delete(i) for i in gone) if e is not None]

    def _address_removed(self, msg: Any) -> AddressRemoved:
        ip = msg.get("IFA_LOCAL") if msg["family"] == socket.AF_INET else None
        ip = ip or msg.get("IFA_ADDRESS")
        index = msg["index"]
        ifname = self.links.name(index) or msg.get("IFA_LABEL") or f"if{index}"
        address = ipaddress.ip_interface(f"{ip}/{msg['prefixlen']}")
        return AddressRemoved(ifname, address, msg.get("IFA_PROTO"))


async def kernel_events(nl: Optional[Netlink] = None) -> AsyncIterator[Event]:
    """Yield link up/down changes and address deletions in the current netns (or, given ``nl``,
    in its netns: tests and the lab watch named namespaces from the root netns), forever."""
    with await open_socket(nl) as sock:
        reader = _Reader(sock)
        await reader.request_dump()
        while True:
            for event in await reader.read():
                yield event

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
* :class:`AddressAdded` when an address appears (e.g. the fixed BGP source address coming back,
  after which prefsrc routes must be re-installed). Only a real appearance: replacing an address
  that is already there (vipd's own lifetime refreshes) is swallowed, and an IPv6 address is
  reported once it is usable (DAD done), not while tentative. The initial addresses come from
  an address dump at start and are not reported.

No threads, no polling: the socket is a trio socket, messages are decoded with pyroute2's
``MarshalRtnl``. If the kernel drops notifications because we did not read fast enough
(ENOBUFS), an :class:`Overflowed` event is yielded at once (whatever the consumer believed about
the kernel may be stale: it must re-list and reconcile now, not at its next tick), then links and
addresses are re-read from fresh dumps: link changes and added addresses found that way are
reported; address deletions lost that way are not (the consumer's re-list covers them).

Use it from a task that is cancelled to stop, or close it with ``contextlib.aclosing``.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional, Union

import trio
from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR
from pyroute2.netlink.rtnl import (RTM_DELADDR, RTM_DELLINK, RTM_GETADDR, RTM_GETLINK, RTM_NEWADDR,
                                   RTM_NEWLINK)
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
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
DRAIN = 256  # further datagrams read without waiting, per wake-up
# Once the socket is empty, wait this long and read what came meanwhile, before the events go out:
# a lifetime refresh round comes back as hundreds of notifications while the kernel works through
# the netlink thread's sends, and without the wait every few of them woke the loop on their own
# (at 1,000 + 1,000 VIPs the loop's wake-ups at rest went from 37-49 to 15-20 a second with it:
# bench/scale.py, `loop_wakeups_per_s`). Nothing vipd does on a kernel event is urgent to the millisecond: an address someone
# removed is re-added, a stray is removed, a link event starts a check.
COALESCE = 0.01
RCVBUF = 1 << 20
SO_RCVBUFFORCE = 33
IFA_F_DADFAILED, IFA_F_TENTATIVE = 0x08, 0x40


@dataclass(frozen=True)
class LinkChanged:
    ifname: str
    up: bool


@dataclass(frozen=True)
class AddressRemoved:
    ifname: str
    address: IPInterface
    proto: Optional[int]


@dataclass(frozen=True)
class AddressAdded:
    ifname: str
    address: IPInterface
    proto: Optional[int]


@dataclass(frozen=True)
class Overflowed:
    """The kernel dropped notifications (ENOBUFS): any view built from them may be stale."""


Event = Union[LinkChanged, AddressRemoved, AddressAdded, Overflowed]
_AddrKey = tuple[int, IPInterface]  # interface index, address/prefix


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


async def read_burst(sock: trio.socket.SocketType, coalesce: float = COALESCE) -> list[bytes]:
    """The datagrams of one burst: wait for the first, take every one queued (up to DRAIN); if
    that emptied the socket, wait `coalesce` seconds and take what came meanwhile. OSError as
    the socket raises it (ENOBUFS: notifications were lost)."""
    chunks = [await sock.recv(RECV_SIZE)]

    def drain() -> bool:
        for _ in range(DRAIN):
            try:
                chunks.append(os.read(sock.fileno(), RECV_SIZE))  # the socket is non-blocking
            except BlockingIOError:
                return True
        return False

    if drain() and coalesce > 0:
        await trio.sleep(coalesce)
        drain()
    return chunks


class _Reader:
    """Decodes what the socket delivers: our link and address dumps and the kernel's
    notifications."""

    def __init__(self, sock: trio.socket.SocketType, coalesce: float = COALESCE) -> None:
        self.sock = sock
        self.coalesce = coalesce
        self.marshal = MarshalRtnl()
        self.links = _Links()
        self.addrs: set[_AddrKey] = set()  # usable addresses present now
        self.portid = sock.getsockname()[0]
        self.seq = int.from_bytes(os.urandom(2), "big") + 1
        self.dump_seq: Optional[int] = None  # the dump in progress
        self.dump_kind = ""  # its kind: "link" or "addr"
        self.pending: list[str] = []  # dumps to do after it, in order
        self.seeding = True  # the first link and address dumps set the initial state silently
        self.seen: set[Any] = set()  # link indexes / address keys in the dump in progress
        self.before: set[_AddrKey] = set()  # addresses known when the address dump began

    async def request_dumps(self) -> None:
        """Re-read links, then addresses (one dump at a time per socket)."""
        for kind in ("link", "addr"):
            if kind not in self.pending:
                self.pending.append(kind)
        await self._next_dump()

    async def _next_dump(self) -> None:
        if self.dump_seq is not None or not self.pending:
            return
        kind = self.pending.pop(0)
        self.seq += 1
        msg = ifinfmsg() if kind == "link" else ifaddrmsg()
        msg["header"]["type"] = RTM_GETLINK if kind == "link" else RTM_GETADDR
        msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_DUMP
        msg["header"]["sequence_number"] = self.seq
        msg["header"]["pid"] = self.portid
        msg["family"] = socket.AF_UNSPEC
        msg.encode()
        await self.sock.send(msg.data)
        self.dump_seq, self.dump_kind = self.seq, kind
        self.seen, self.before = set(), set(self.addrs)

    async def read(self) -> list[Event]:
        """The events of every datagram queued now (one wake-up for a burst: a refresh round of
        thousands of addresses comes back as thousands of notifications)."""
        try:
            chunks = await read_burst(self.sock, self.coalesce)
        except OSError as e:
            if e.errno == errno.ENOBUFS:
                log.warning("rtnetlink events overflowed; re-reading links and addresses")
                await self.request_dumps()
                return [Overflowed()]
            raise DataplaneError(f"reading rtnetlink events failed: {e.strerror}") from None
        events: list[Event] = []
        for data in chunks:
            for msg in self._messages(data):
                events.extend(self._handle(msg))
        await self._next_dump()
        return events

    def _messages(self, data: bytes) -> list[Any]:
        """Address messages decoded with struct (every lifetime refresh of every VIP comes back as
        one: pyroute2's decoding costs ~75 us each), the rest with pyroute2."""
        out: list[Any] = []
        off = 0
        while off + _HDR.size <= len(data):
            length, kind, _flags, seq, pid = _HDR.unpack_from(data, off)
            if length < _HDR.size:
                break
            if kind in (RTM_NEWADDR, RTM_DELADDR) and length >= _HDR.size + _IFA.size:
                out.append(_address_message(data, off, length, kind, seq, pid))
            else:
                out.extend(self.marshal.parse(data[off:off + length]))
            off += (length + 3) & ~3
        return out

    def _ours(self, msg: Any) -> bool:
        """A reply to our dump, not a notification (which may carry another process's seq)."""
        h = msg["header"]
        return self.dump_seq is not None and h["sequence_number"] == self.dump_seq and h["pid"] == self.portid

    def _handle(self, msg: Any) -> list[Event]:
        kind = msg["header"]["type"]
        if self._ours(msg):
            if kind == NLMSG_ERROR and msg["header"].get("error") is not None:
                raise DataplaneError(f"rtnetlink {self.dump_kind} dump failed: {msg['header']['error']}")
            if kind == NLMSG_DONE:
                return self._dump_done()
            if kind == RTM_NEWLINK and msg["family"] == socket.AF_UNSPEC:
                self.seen.add(msg["index"])
                return _some(self.links.update(msg, report=not self.seeding, report_new=not self.seeding))
            if kind == RTM_NEWADDR:
                key = _addr_key(msg)
                if key is not None:
                    self.seen.add(key)
                return _some(self._address_added(msg, key))
            return []
        # AF_BRIDGE link messages describe bridge ports (a DELLINK there is a port leaving): skip
        if kind == RTM_NEWLINK and msg["family"] == socket.AF_UNSPEC:
            return _some(self.links.update(msg, report=True, report_new=not self.seeding))
        if kind == RTM_DELLINK and msg["family"] == socket.AF_UNSPEC:
            return _some(self.links.delete(msg["index"]))
        if kind == RTM_NEWADDR:
            return _some(self._address_added(msg, _addr_key(msg)))
        if kind == RTM_DELADDR:
            key = _addr_key(msg, usable_only=False)
            self.addrs.discard(key)  # type: ignore[arg-type]
            return [self._address_event(AddressRemoved, msg, key)]  # type: ignore[arg-type]
        return []

    def _dump_done(self) -> list[Event]:
        """End of a dump: after an overflow, interfaces missing from a link dump were deleted
        meanwhile (reported), addresses missing from an address dump too (forgotten quietly)."""
        kind, self.dump_seq = self.dump_kind, None
        if kind == "addr":
            self.addrs -= self.before - self.seen  # (not those a notification added meanwhile)
            self.seeding = self.seeding and bool(self.pending)
            return []
        if self.seeding:
            return []
        gone = [i for i in self.links.state if i not in self.seen]
        return [e for e in (self.links.delete(i) for i in gone) if e is not None]

    def _address_added(self, msg: Any, key: Optional[_AddrKey]) -> Optional[AddressAdded]:
        if key is None or key in self.addrs:
            return None  # tentative (reported once DAD is done), or a refresh of a present address
        self.addrs.add(key)
        return None if self.seeding else self._address_event(AddressAdded, msg, key)

    def _address_event(self, cls: Any, msg: Any, key: _AddrKey) -> Any:
        index, address = key
        ifname = self.links.name(index) or msg.get("IFA_LABEL") or f"if{index}"
        return cls(ifname, address, msg.get("IFA_PROTO"))


_HDR = struct.Struct("=IHHII")  # nlmsghdr
_IFA = struct.Struct("=BBBBI")  # ifaddrmsg
_RTA = struct.Struct("=HH")
_IFA_ADDRESS, _IFA_LOCAL, _IFA_LABEL, _IFA_FLAGS, _IFA_PROTO = 1, 2, 3, 8, 11


def _address_message(data: bytes, off: int, length: int, kind: int, seq: int, pid: int) -> dict[str, Any]:
    """An RTM_NEWADDR / RTM_DELADDR message as the dict-like subset of pyroute2's ifaddrmsg that
    _handle and _addr_key read."""
    family, prefixlen, flags, _scope, index = _IFA.unpack_from(data, off + _HDR.size)
    msg: dict[str, Any] = {"header": {"type": kind, "sequence_number": seq, "pid": pid}, "family": family,
                           "prefixlen": prefixlen, "flags": flags, "index": index}
    pos, end = off + _HDR.size + _IFA.size, off + length
    while pos + 4 <= end:
        rta_len, rta_type = _RTA.unpack_from(data, pos)
        if rta_len < 4:
            break
        value = data[pos + 4:pos + rta_len]
        if rta_type in (_IFA_ADDRESS, _IFA_LOCAL) and len(value) in (4, 16):
            msg["IFA_ADDRESS" if rta_type == _IFA_ADDRESS else "IFA_LOCAL"] = _ip_text(value)
        elif rta_type == _IFA_LABEL:
            msg["IFA_LABEL"] = value.rstrip(b"\0").decode(errors="replace")
        elif rta_type == _IFA_FLAGS and len(value) >= 4:
            msg["IFA_FLAGS"] = struct.unpack_from("=I", value)[0]
        elif rta_type == _IFA_PROTO and value:
            msg["IFA_PROTO"] = value[0]
        pos += (rta_len + 3) & ~3
    return msg


def _addr_key(msg: Any, usable_only: bool = True) -> Optional[_AddrKey]:
    """(index, address) of an address message; None for an address that is not usable yet
    (IPv6 tentative or failed DAD) when ``usable_only``."""
    flags = msg.get("IFA_FLAGS")
    flags = msg["flags"] if flags is None else flags
    if usable_only and flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED):
        return None
    ip = msg.get("IFA_LOCAL") if msg["family"] == socket.AF_INET else None
    ip = ip or msg.get("IFA_ADDRESS")
    return msg["index"], _interface(ip, msg["prefixlen"])


# Every lifetime refresh of every VIP comes back as a notification: decoding the same few thousand
# addresses again and again through ipaddress was most of the cost of reading them.
_texts: dict[bytes, str] = {}
_interfaces: dict[tuple[str, int], Any] = {}


def _ip_text(raw: bytes) -> str:
    text = _texts.get(raw)
    if text is None:
        if len(_texts) > 65536:
            _texts.clear()
        text = _texts[raw] = str(ipaddress.ip_address(raw))
    return text


def _interface(ip: str, prefixlen: int) -> Any:
    key = (ip, prefixlen)
    found = _interfaces.get(key)
    if found is None:
        if len(_interfaces) > 65536:
            _interfaces.clear()
        found = _interfaces[key] = ipaddress.ip_interface(f"{ip}/{prefixlen}")
    return found


async def kernel_events(nl: Optional[Netlink] = None) -> AsyncIterator[Event]:
    """Yield link up/down changes and address additions and deletions in the current netns (or,
    given ``nl``, in its netns: tests and the lab watch named namespaces from the root netns),
    forever."""
    with await open_socket(nl) as sock:
        reader = _Reader(sock)
        await reader.request_dumps()
        while True:
            for event in await reader.read():
                yield event

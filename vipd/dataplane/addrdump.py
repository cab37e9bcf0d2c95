"""A fast address dump (and deletion, link names, refresh): RTM_GETADDR / RTM_DELADDR over a plain NETLINK_ROUTE socket,
built and decoded with struct.

pyroute2 decodes every attribute of every message into Python objects: ~75 us per address, so a
dump of 2,000 addresses costs ~150 ms of CPU, and vipd dumps on every reconcile tick and every
claim batch. This reads only what vipd looks at (index, address, prefix length, IFA_PROTO, valid
lifetime, flags): a few microseconds per address. Runs in the Netlink owner thread
(``Netlink.route_socket``), blocking, bounded by the socket's timeout. ``vipd cleanup`` uses it
without pyroute2 or trio at all, so that the crash path removes addresses within milliseconds of
starting (:func:`open_socket`, :func:`delete_many`).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from typing import Callable, NamedTuple, Optional, Sequence, Union

from vipd.dataplane import nldump

IPInterface = Union[ipaddress.IPv4Interface, ipaddress.IPv6Interface]
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR = 0x1, 0x4, 0x300, 0x10
_EADDRNOTAVAIL = 99
IFA_ADDRESS, IFA_LOCAL, IFA_CACHEINFO, IFA_FLAGS, IFA_PROTO = 1, 2, 6, 8, 11
FOREVER = 0xFFFFFFFF
_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_IFA = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefixlen, flags, scope, index
_RTA = struct.Struct("=HH")


class RawAddress(NamedTuple):
    index: int  # type: ignore[assignment]  # (shadows tuple.index)
    address: IPInterface
    proto: Optional[int]
    valid_lft: Optional[int]  # None: forever
    flags: int
    ip: IPAddress  # address.ip (which builds a new object on every access), decoded once


def _align(n: int) -> int:
    return (n + 3) & ~3


def _decode(data: bytes, off: int, end: int) -> Optional[RawAddress]:
    family, prefixlen, flags, _scope, index = _IFA.unpack_from(data, off)
    pos = off + _IFA.size
    local = address = None
    proto: Optional[int] = None
    valid = FOREVER
    while pos + 4 <= end:
        rta_len, rta_type = _RTA.unpack_from(data, pos)
        if rta_len < 4:
            break
        value = data[pos + 4:pos + rta_len]
        if rta_type == IFA_LOCAL:
            local = value
        elif rta_type == IFA_ADDRESS:
            address = value
        elif rta_type == IFA_PROTO and value:
            proto = value[0]
        elif rta_type == IFA_CACHEINFO and len(value) >= 8:
            valid = struct.unpack_from("=I", value, 4)[0]  # ifa_prefered, ifa_valid, ...
        elif rta_type == IFA_FLAGS and len(value) >= 4:
            flags = struct.unpack_from("=I", value)[0]
        pos += _align(rta_len)
    # IPv4: IFA_LOCAL is the local address (IFA_ADDRESS is the peer on point-to-point links)
    raw = (local or address) if family == socket.AF_INET else (address or local)
    if raw is None:
        return None
    found = _interface(family, raw, prefixlen)
    if found is None:
        return None
    return RawAddress(index, found[0], proto, None if valid == FOREVER else valid, flags, found[1])


RTM_NEWLINK, RTM_GETLINK = 16, 18
IFLA_IFNAME = 3
_IFI = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_ENODEV = 19


def link_index(sock: socket.socket, seq: int, name: str) -> Optional[int]:
    """The index of interface `name` (RTM_GETLINK by name, struct-built: pyroute2's link("get")
    costs milliseconds, on every refresh round), or None when there is no such interface."""
    raw = name.encode() + b"\0"
    attr = _RTA.pack(4 + len(raw), IFLA_IFNAME) + raw + b"\0" * (-len(raw) & 3)
    body = _IFI.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attr
    sock.send(_HDR.pack(_HDR.size + len(body), RTM_GETLINK, NLM_F_REQUEST, seq, 0) + body)
    kind, data, off = _reply(sock, seq, (RTM_NEWLINK, NLMSG_ERROR))
    if kind == RTM_NEWLINK:
        return int(_IFI.unpack_from(data, off + _HDR.size)[2])
    code = _errno(data, off)
    if code in (_ENODEV, 0):
        return None
    raise OSError(code, os.strerror(code))


def link_names(sock: socket.socket, seq: int) -> dict[int, str]:
    """index -> name of every interface in the socket's netns (an RTM_GETLINK dump read with struct:
    pyroute2 decodes every attribute and statistic of every link, on every reconcile tick)."""
    request = lambda n: nldump.header(_IFI.size, RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, n) + _IFI.pack(  # noqa: E731
        socket.AF_UNSPEC, 0, 0, 0, 0)
    names: dict[int, str] = {}
    for kind, data, start, end in nldump.dump(sock, request, "RTM_GETLINK", bufsize=1 << 17, seq=seq):
        if kind != RTM_NEWLINK or end - start < _IFI.size:
            continue
        index = _IFI.unpack_from(data, start)[2]
        for kind_, a0, a1 in nldump.attrs(data, start + _IFI.size, end):
            if kind_ == IFLA_IFNAME:
                names[index] = data[a0:a1].split(b"\0", 1)[0].decode(errors="replace")
                break
    return names


def _reply(sock: socket.socket, seq: int, kinds: tuple[int, ...]) -> tuple[int, bytes, int]:
    """Read until the message answering request `seq` with one of `kinds`: (kind, data, its offset
    in data). Messages of other requests are skipped; OSError (EPROTO) on a malformed one."""
    while True:
        data = sock.recv(1 << 16)
        off = 0
        while off + _HDR.size <= len(data):
            length, kind, _flags, mseq, _pid = _HDR.unpack_from(data, off)
            if length < _HDR.size:
                raise OSError(errno.EPROTO, "malformed netlink message")
            if mseq == seq and kind in kinds:
                return kind, data, off
            off += _align(length)


def _errno(data: bytes, off: int) -> int:
    """The positive errno of the NLMSG_ERROR message at `off` (0: an ACK)."""
    return int(-struct.unpack_from("=i", data, off + _HDR.size)[0])


_interfaces: dict[tuple[bytes, int], tuple[IPInterface, IPAddress]] = {}


def _interface(family: int, raw: bytes, prefixlen: int) -> Optional[tuple[IPInterface, IPAddress]]:
    """The address as ipaddress objects, cached (a reconcile tick dumps thousands, every second)."""
    key = (raw, prefixlen)
    found = _interfaces.get(key)
    if found is None:
        iface: IPInterface
        if family == socket.AF_INET:
            iface = ipaddress.IPv4Interface((raw, prefixlen))
        elif family == socket.AF_INET6:
            iface = ipaddress.IPv6Interface((raw, prefixlen))
        else:
            return None
        if len(_interfaces) > 65536:
            _interfaces.clear()
        found = _interfaces[key] = (iface, iface.ip)
    return found


def dump(sock: socket.socket, seq: int) -> list[RawAddress]:
    """Every address in the socket's netns (IPv4 and IPv6). OSError on failure."""
    request = lambda n: nldump.header(_IFA.size, RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, n) + _IFA.pack(  # noqa: E731
        socket.AF_UNSPEC, 0, 0, 0, 0)
    out = []
    for kind, data, start, end in nldump.dump(sock, request, "RTM_GETADDR", bufsize=1 << 17, seq=seq):
        if kind == RTM_NEWADDR:
            entry = _decode(data, start, end)
            if entry is not None:
                out.append(entry)
    return out


def open_socket(timeout: float = 5.0) -> socket.socket:
    """A blocking NETLINK_ROUTE socket in the calling thread's netns, for dump() and delete_many()."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
    sock.settimeout(timeout)
    sock.bind((0, 0))
    return sock


def _delete_message(seq: int, entry: RawAddress, ack: bool = True) -> bytes:
    ip = entry.address.ip
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    attrs = b"".join(_RTA.pack(4 + len(ip.packed), kind) + ip.packed
                     for kind in ((IFA_LOCAL, IFA_ADDRESS) if ip.version == 4 else (IFA_ADDRESS,)))
    body = _IFA.pack(family, entry.address.network.prefixlen, 0, 0, entry.index) + attrs
    return _HDR.pack(_HDR.size + len(body), RTM_DELADDR, NLM_F_REQUEST | (NLM_F_ACK if ack else 0), seq, 0) + body


def delete_many(sock: socket.socket, seq: int, entries: Sequence[RawAddress]) -> list[int]:
    """RTM_DELADDR for each address exactly as dumped, many per send: each item's errno in order
    (0: deleted, or already gone). OSError when the socket itself fails."""
    codes = _acked(sock, seq, len(entries), lambda i, n, ack: _delete_message(n, entries[i], ack))
    return [0 if code == _EADDRNOTAVAIL else code for code in codes]


NLM_F_REPLACE, NLM_F_CREATE = 0x100, 0x400
IFA_F_NODAD = 0x02
_CHUNK = 200  # messages per send: well under the socket buffers (each message ~80 bytes, each error ~116)


_HDR_SEQ = struct.Struct("=II")  # nlmsghdr's seq and pid
_CACHEINFO = struct.Struct("=IIII")  # ifa_cacheinfo: preferred, valid, cstamp, tstamp
_templates: dict[tuple[int, int, int], tuple[bytes, bytes, bytes, IPInterface]] = {}


def _replace_template(index: int, address: IPInterface, proto: int) -> tuple[bytes, bytes, bytes]:
    """The RTM_NEWADDR replace message for one address, cut around its sequence number and with
    IFA_CACHEINFO last (the lifetimes): a refresh round of thousands of addresses only packs those
    two fields. Returns (head without NLM_F_ACK, head with it, body). Cached per (index, address
    object, proto)."""
    key = (index, id(address), proto)  # hashing an IPv6Interface costs microseconds; ids are checked
    found = _templates.get(key)
    if found is not None and found[3] is address:
        return found[0], found[1], found[2]
    ip = address.ip
    v4 = ip.version == 4
    flags = 0 if v4 else IFA_F_NODAD
    attrs = b"".join(_RTA.pack(4 + len(ip.packed), kind) + ip.packed
                     for kind in ((IFA_LOCAL, IFA_ADDRESS) if v4 else (IFA_ADDRESS,)))
    attrs += _RTA.pack(5, IFA_PROTO) + bytes([proto]) + b"\0\0\0"
    attrs += _RTA.pack(8, IFA_FLAGS) + struct.pack("=I", flags)
    attrs += _RTA.pack(4 + _CACHEINFO.size, IFA_CACHEINFO)
    body = _IFA.pack(socket.AF_INET if v4 else socket.AF_INET6, address.network.prefixlen, flags, 0, index) + attrs
    length = _HDR.size + len(body) + _CACHEINFO.size
    quiet = struct.pack("=IHH", length, RTM_NEWADDR, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE)
    acked = struct.pack("=IHH", length, RTM_NEWADDR, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE)
    if len(_templates) > 65536:  # interfaces come and go: never grow without bound
        _templates.clear()
    _templates[key] = (quiet, acked, body, address)  # (holding the address keeps its id from being reused)
    return quiet, acked, body


def replace_many(sock: socket.socket, seq: int, items: list[tuple[int, IPInterface, int, int]]) -> list[int]:
    """RTM_NEWADDR with NLM_F_CREATE | NLM_F_REPLACE for each (index, address, lifetime, proto):
    add the address, or restart the lifetime of one that is there (valid = preferred = lifetime
    seconds; IPv6 with IFA_F_NODAD), what ``ip addr replace`` does. Many messages per send.
    Returns each item's errno (0: done), in order. OSError when the socket itself fails."""
    parts = [(*_replace_template(index, address, proto), _CACHEINFO.pack(lifetime, lifetime, 0, 0))
             for index, address, lifetime, proto in items]
    return _acked(sock, seq, len(parts),
                  lambda i, n, ack: parts[i][1 if ack else 0] + _HDR_SEQ.pack(n, 0) + parts[i][2] + parts[i][3])


def _acked(sock: socket.socket, seq: int, count: int, build: Callable[[int, int, bool], bytes]) -> list[int]:
    """Send `count` messages, message i built by build(i, seq + i, ack) (its sequence number; ack:
    whether it asks for NLM_F_ACK), `_CHUNK` per send, and collect each message's errno, in order.

    Only the last message of a send asks for an ACK: the kernel answers a failed message with its
    error whether or not it asked, and handles the messages of one send in order, so once the last
    one's ACK is read every error of that send has been read before it. (An ACK for each message
    cost a recv for every address of every lifetime refresh round.)"""
    errors = [0] * count
    for start in range(0, count, _CHUNK):
        end = min(count, start + _CHUNK)
        sock.send(b"".join(build(i, seq + i, i == end - 1) for i in range(start, end)))
        first, last = seq + start, seq + end - 1
        done = False
        while not done:
            data = sock.recv(1 << 17)
            off = 0
            while off + _HDR.size <= len(data):
                length, kind, _flags, mseq, _pid = _HDR.unpack_from(data, off)
                if length < _HDR.size:
                    raise OSError(errno.EPROTO, "malformed netlink message")
                if kind == NLMSG_ERROR and first <= mseq <= last:
                    errors[mseq - seq] = _errno(data, off)
                    done = done or mseq == last
                off += _align(length)
    return errors

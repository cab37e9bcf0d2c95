"""One netlink dump over a plain, blocking socket, read with struct: the loop every fast reader
shares (vipd/dataplane/addrdump.py for the daemon and `vipd cleanup`; vipd/lab/netns.py and
vipd/lab/fence_tokens.py for the address monitor).

`dump(sock, request, what)` sends `request(seq)` (the whole message, header included) with a fresh
sequence number and returns the messages of that dump as (type, data, start, end): `data[start:end]`
is the payload after the nlmsghdr. A dump the kernel marks interrupted (NLM_F_DUMP_INTR: the table
changed under it) is redone, up to RETRIES times; the last complete one is returned then (callers
are level-triggered). An error reply raises OSError(errno, "<what>: <strerror>"); a malformed
message OSError(EPROTO). Bounded by the socket's timeout.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import struct
import threading
from typing import Callable, Iterator

NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR = 0x1, 0x4, 0x300, 0x10
HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
RTA = struct.Struct("=HH")  # rtattr / nlattr: len, type
TYPE_MASK = 0x3FFF  # an attribute's type without NLA_F_NESTED / NLA_F_NET_BYTEORDER
RETRIES = 5

Message = tuple[int, bytes, int, int]  # type, data, payload start, payload end

_seq = itertools.count(1)
_seq_lock = threading.Lock()


def header(length: int, kind: int, flags: int, seq: int) -> bytes:
    """An nlmsghdr for a message of `length` bytes after the header."""
    return HDR.pack(HDR.size + length, kind, flags, seq, 0)


def _next_seq() -> int:
    with _seq_lock:
        return next(_seq) & 0x7FFFFFFF or 1


def _dump_once(sock: socket.socket, seq: int, what: str, bufsize: int) -> tuple[list[Message], bool]:
    out: list[Message] = []
    interrupted = False
    while True:
        data = sock.recv(bufsize)
        off = 0
        while off + HDR.size <= len(data):
            length, kind, flags, mseq, _pid = HDR.unpack_from(data, off)
            if length < HDR.size:
                raise OSError(errno.EPROTO, f"{what}: malformed netlink message")
            if mseq == seq:
                interrupted = interrupted or bool(flags & NLM_F_DUMP_INTR)
                if kind == NLMSG_DONE:
                    return out, interrupted
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, off + HDR.size)[0]
                    if code:
                        raise OSError(code, f"{what}: {os.strerror(code)}")
                    return out, interrupted  # an ACK ends it too
                out.append((kind, data, off + HDR.size, off + length))
            off += (length + 3) & ~3


def dump(sock: socket.socket, request: Callable[[int], bytes], what: str, *,
         bufsize: int = 1 << 16, seq: int | None = None) -> list[Message]:
    """The messages of one dump (see the module doc). `seq`: the caller numbers the requests on this
    socket (seq, seq + 1, ... for the retries); default, a process-wide counter."""
    out: list[Message] = []
    for attempt in range(RETRIES):
        seq_now = _next_seq() if seq is None else seq + attempt
        sock.send(request(seq_now))
        out, interrupted = _dump_once(sock, seq_now, what, bufsize)
        if not interrupted:
            break
    return out


def attrs(data: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, payload end) of the attributes in data[pos:end] (rtattr and nlattr:
    the same layout)."""
    while pos + RTA.size <= end:
        rlen, rtype = RTA.unpack_from(data, pos)
        if rlen < RTA.size:
            return
        yield rtype & TYPE_MASK, pos + RTA.size, min(end, pos + rlen)
        pos += (rlen + 3) & ~3

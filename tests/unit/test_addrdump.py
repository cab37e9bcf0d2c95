"""vipd.dataplane.addrdump's request/reply helpers against a scripted socket: the interface index
by name, and a delete's verdict (absent is fine, other errors are raised, malformed replies too)."""

from __future__ import annotations

import errno
import ipaddress
import struct

import pytest

from vipd.dataplane import addrdump as ad

HDR = struct.Struct("=IHHII")


class Script:
    """Answers each request with the given messages (seq filled in), after a message of another request."""

    def __init__(self, *answers: list[tuple[int, bytes]]) -> None:
        self.answers = list(answers)
        self.pending: list[bytes] = []

    def send(self, data: bytes) -> None:
        seq = HDR.unpack_from(data)[3]
        reply = HDR.pack(HDR.size, ad.RTM_NEWLINK, 0, seq + 7, 0)  # someone else's: skipped
        for kind, payload in self.answers.pop(0):
            reply += HDR.pack(HDR.size + len(payload), kind, 0, seq, 0) + payload
        self.pending.append(reply)

    def recv(self, _n: int) -> bytes:
        return self.pending.pop(0)


def error(code: int) -> tuple[int, bytes]:
    return ad.NLMSG_ERROR, struct.pack("=i", -code) + b"\0" * 16


def test_link_index_by_name_none_when_absent_and_errors_raised() -> None:
    link = (ad.RTM_NEWLINK, struct.pack("=BxHiII", 0, 1, 42, 0, 0))
    assert ad.link_index(Script([link]), 5, "eth0") == 42  # type: ignore[arg-type]
    assert ad.link_index(Script([error(errno.ENODEV)]), 5, "nope") is None  # type: ignore[arg-type]
    with pytest.raises(OSError) as e:
        ad.link_index(Script([error(errno.EPERM)]), 5, "eth0")  # type: ignore[arg-type]
    assert e.value.errno == errno.EPERM


def test_delete_absent_is_fine_other_errors_and_malformed_replies_raise() -> None:
    entry = ad.RawAddress(3, ipaddress.ip_interface("10.0.0.5/32"), 0xBC, 5, 0, ipaddress.ip_address("10.0.0.5"))
    ad.delete(Script([error(0)]), 9, entry)  # type: ignore[arg-type]
    ad.delete(Script([error(errno.EADDRNOTAVAIL)]), 9, entry)  # type: ignore[arg-type]
    with pytest.raises(OSError) as e:
        ad.delete(Script([error(errno.EPERM)]), 9, entry)  # type: ignore[arg-type]
    assert e.value.errno == errno.EPERM

    class Broken(Script):
        def recv(self, _n: int) -> bytes:
            return HDR.pack(4, ad.NLMSG_ERROR, 0, 9, 0)  # a length shorter than the header

    with pytest.raises(OSError) as e:
        ad.delete(Broken([]), 9, entry)  # type: ignore[arg-type]
    assert e.value.errno == errno.EPROTO

"""vipd.dataplane.addrdump's request/reply helpers against a scripted socket: the interface index
by name, and a delete's verdict (absent is fine, other errors are reported, malformed replies raise)."""

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


def test_delete_absent_is_fine_other_errors_are_reported_and_malformed_replies_raise() -> None:
    entry = ad.RawAddress(3, ipaddress.ip_interface("10.0.0.5/32"), 0xBC, 5, 0, ipaddress.ip_address("10.0.0.5"))
    assert ad.delete_many(Script([error(0)]), 9, [entry]) == [0]  # type: ignore[arg-type]
    assert ad.delete_many(Script([error(errno.EADDRNOTAVAIL)]), 9, [entry]) == [0]  # type: ignore[arg-type]
    assert ad.delete_many(Script([error(errno.EPERM)]), 9, [entry]) == [errno.EPERM]  # type: ignore[arg-type]

    class Broken(Script):
        def recv(self, _n: int) -> bytes:
            return HDR.pack(4, ad.NLMSG_ERROR, 0, 9, 0)  # a length shorter than the header

    with pytest.raises(OSError) as e:
        ad.delete_many(Broken([]), 9, [entry])  # type: ignore[arg-type]
    assert e.value.errno == errno.EPROTO


class Pipelined:
    """A kernel that handles the messages of a send in order, answering one that failed (errno
    chosen per IP) or that asked for NLM_F_ACK, as rtnetlink does; it records each RTM_DELADDR as
    (family, prefixlen, index, ip), every send's message count and how many answers it sent."""

    def __init__(self, codes: dict[str, int]) -> None:
        self.codes = codes
        self.deleted: list[tuple[int, int, int, str]] = []
        self.sends: list[int] = []
        self.answers = 0
        self.pending: list[bytes] = []

    def send(self, data: bytes) -> None:
        off, reply, count = 0, b"", 0
        while off < len(data):
            length, kind, flags, seq, _pid = HDR.unpack_from(data, off)
            assert kind == ad.RTM_DELADDR
            family, prefixlen, _f, _s, index = struct.unpack_from("=BBBBI", data, off + HDR.size)
            rta_len, _rta_type = struct.unpack_from("=HH", data, off + HDR.size + 8)
            raw = data[off + HDR.size + 12:off + HDR.size + 8 + rta_len]
            ip = str(ipaddress.ip_address(raw))
            self.deleted.append((family, prefixlen, index, ip))
            code = self.codes.get(ip, 0)
            if code or flags & ad.NLM_F_ACK:
                self.answers += 1
                reply += HDR.pack(HDR.size + 20, ad.NLMSG_ERROR, 0, seq, 0) + struct.pack("=i", -code) + b"\0" * 16
            off += (length + 3) & ~3
            count += 1
        self.sends.append(count)
        self.pending.append(reply)

    def recv(self, _n: int) -> bytes:
        return self.pending.pop(0)


def raw(text: str, index: int = 3) -> ad.RawAddress:
    iface = ipaddress.ip_interface(text)
    return ad.RawAddress(index, iface, 0x56, 5, 0, iface.ip)


def test_delete_many_pipelines_each_address_as_dumped_and_reports_each_verdict() -> None:
    """Many deletions per send, only the last asking for an ACK: absent counts as deleted, another
    errno is that item's own, wherever in the send (the others are still deleted); more than a
    send's worth goes in several sends, each waited for by its last ACK."""
    kernel = Pipelined({"fd00::2": errno.EADDRNOTAVAIL, "10.0.0.3": errno.EPERM})
    entries = [raw("10.0.0.1/32"), raw("fd00::2/128", 7), raw("10.0.0.3/24"), raw("10.0.0.4/32")]
    assert ad.delete_many(kernel, 40, entries) == [0, 0, errno.EPERM, 0]  # type: ignore[arg-type]
    assert kernel.deleted == [(2, 32, 3, "10.0.0.1"), (10, 128, 7, "fd00::2"), (2, 24, 3, "10.0.0.3"),
                              (2, 32, 3, "10.0.0.4")]
    assert kernel.sends == [4] and kernel.answers == 3  # two errors and the last ACK
    last = ad._CHUNK - 1  # the message that asks for the ACK fails: its error ends the send's wait
    many = Pipelined({"10.1.0.7": errno.EPERM, f"10.1.{(ad._CHUNK + 3) // 256}.{(ad._CHUNK + 3) % 256}": errno.EBUSY,
                      f"10.1.{last // 256}.{last % 256}": errno.EACCES})
    n = ad._CHUNK * 2 + 5
    want = [0] * n
    want[7], want[ad._CHUNK + 3], want[last] = errno.EPERM, errno.EBUSY, errno.EACCES
    assert ad.delete_many(many, 1, [raw(f"10.1.{i // 256}.{i % 256}/32") for i in range(n)]) == want  # type: ignore[arg-type]
    assert many.sends == [ad._CHUNK, ad._CHUNK, 5] and many.answers == 3 + 2  # (the failed last: one answer)
    assert [d[3] for d in many.deleted] == [f"10.1.{i // 256}.{i % 256}" for i in range(n)]


def test_link_names_reads_each_links_name_whatever_comes_before_it() -> None:
    def rta(kind: int, payload: bytes) -> bytes:
        n = 4 + len(payload)
        return struct.pack("=HH", n, kind) + payload + b"\0" * (-n & 3)

    eth = struct.pack("=BxHiII", 0, 1, 42, 0, 0) + rta(4, struct.pack("=I", 1500)) + rta(ad.IFLA_IFNAME, b"eth0\0")
    lo = struct.pack("=BxHiII", 0, 772, 1, 0, 0) + rta(ad.IFLA_IFNAME, b"lo\0")
    nameless = struct.pack("=BxHiII", 0, 1, 7, 0, 0) + rta(4, struct.pack("=I", 1500))
    done = (3, b"\0\0\0\0")  # NLMSG_DONE
    got = ad.link_names(Script([(ad.RTM_NEWLINK, eth), (ad.RTM_NEWLINK, lo), (ad.RTM_NEWLINK, nameless), done]), 5)  # type: ignore[arg-type]
    assert got == {42: "eth0", 1: "lo"}

"""The shared netlink dump loop (vipd/dataplane/nldump.py) against a scripted socket: messages of
other sequence numbers are skipped, an interrupted dump is redone, an error reply names the request."""

from __future__ import annotations

import errno
import struct

import pytest

from vipd.dataplane import nldump


class Script:
    """Answers each request with the replies the test gives for it (seq filled in)."""

    def __init__(self, *answers: list[tuple[int, int, bytes]]) -> None:
        self.answers = list(answers)
        self.pending: list[bytes] = []
        self.sent: list[int] = []

    def send(self, data: bytes) -> None:
        seq = nldump.HDR.unpack_from(data)[3]
        self.sent.append(seq)
        reply = b""
        for kind, flags, payload in self.answers.pop(0):
            reply += nldump.HDR.pack(nldump.HDR.size + len(payload), kind, flags, seq, 0) + payload
        reply += nldump.HDR.pack(nldump.HDR.size, 99, 0, seq + 1000, 0)  # another request's message
        self.pending.append(reply)

    def recv(self, _n: int) -> bytes:
        return self.pending.pop(0)


def request(seq: int) -> bytes:
    return nldump.header(0, 18, nldump.NLM_F_REQUEST | nldump.NLM_F_DUMP, seq)


DONE = (nldump.NLMSG_DONE, 0, b"\0\0\0\0")


def test_messages_of_one_complete_dump() -> None:
    sock = Script([(20, 0, b"abcd"), (20, 0, b"efgh"), DONE])
    got = nldump.dump(sock, request, "RTM_GETADDR", seq=7)  # type: ignore[arg-type]
    assert [(k, d[s:e]) for k, d, s, e in got] == [(20, b"abcd"), (20, b"efgh")] and sock.sent == [7]


def test_an_interrupted_dump_is_redone_with_the_next_sequence_number() -> None:
    sock = Script([(20, nldump.NLM_F_DUMP_INTR, b"old!"), DONE], [(20, 0, b"new!"), DONE])
    got = nldump.dump(sock, request, "RTM_GETADDR", seq=7)  # type: ignore[arg-type]
    assert [d[s:e] for _, d, s, e in got] == [b"new!"] and sock.sent == [7, 8]


def test_an_error_reply_names_the_request() -> None:
    sock = Script([(nldump.NLMSG_ERROR, 0, struct.pack("=i", -errno.ENOENT))])
    with pytest.raises(OSError, match="NFT_MSG_GETSETELEM token4: No such file") as e:
        nldump.dump(sock, request, "NFT_MSG_GETSETELEM token4")  # type: ignore[arg-type]
    assert e.value.errno == errno.ENOENT

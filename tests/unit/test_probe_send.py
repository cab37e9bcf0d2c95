"""conflict._PacketSocket.send_all: every frame in order in one go; a full device queue (ENOBUFS)
is waited out a bounded number of times, then the probe fails as ConflictProbeError."""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

import pytest
import trio

from vipd.dataplane import conflict


def packet_socket(monkeypatch: pytest.MonkeyPatch, fail: list[int]) -> tuple[conflict._PacketSocket, list[bytes]]:
    """A _PacketSocket over a datagram socket pair whose os.write raises the errnos in `fail` first."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    b.close()
    ps = conflict._PacketSocket(None, "vt0", conflict.ETH_P_ARP)  # type: ignore[arg-type]
    ps.sock = trio.socket.from_stdlib_socket(a)
    sent: list[bytes] = []

    def write(fd: int, data: Any) -> int:
        if fail:
            raise OSError(fail.pop(0), os.strerror(errno.ENOBUFS))
        sent.append(bytes(data))
        return len(data)

    monkeypatch.setattr(conflict.os, "write", write)
    return ps, sent


async def test_a_full_device_queue_is_waited_out_and_every_frame_goes_in_order(monkeypatch, autojump_clock) -> None:
    ps, sent = packet_socket(monkeypatch, [errno.ENOBUFS] * 3)
    frames = [bytes([i]) * 42 for i in range(5)]
    await ps.send_all(frames)
    assert sent == frames


async def test_a_queue_that_stays_full_fails_the_probe(monkeypatch, autojump_clock) -> None:
    ps, sent = packet_socket(monkeypatch, [errno.ENOBUFS] * (conflict.FULL_QUEUE_RETRIES + 1))
    with pytest.raises(conflict.ConflictProbeError, match="errno 105"):
        await ps.send_all([b"x" * 42])
    assert sent == []
    ps, _ = packet_socket(monkeypatch, [errno.ENETDOWN])  # any other error at once
    with pytest.raises(conflict.ConflictProbeError, match="errno 100"):
        await ps.send_all([b"x" * 42])

"""The token socket's send buffer (vipd/dataplane/fence_send.py `Sockets.fit`): grown to fit one
token batch of thousands of VIPs, with SO_SNDBUFFORCE, or SO_SNDBUF when that is refused (no
CAP_NET_ADMIN: up to the system's limit, and a batch larger still fails with a clear FenceError);
a batch that fits changes nothing."""

from __future__ import annotations

import socket
from typing import Any

from vipd.dataplane import fence_send


class Raw:
    def __init__(self, sndbuf: int, force_ok: bool) -> None:
        self.sndbuf, self.force_ok = sndbuf, force_ok
        self.calls: list[tuple[int, int]] = []

    def setsockopt(self, level: int, opt: int, value: int) -> None:
        self.calls.append((opt, value))
        if opt == fence_send._SO_SNDBUFFORCE and not self.force_ok:
            raise PermissionError(1, "Operation not permitted")
        self.sndbuf = 2 * value  # the kernel doubles what is set

    def getsockopt(self, level: int, opt: int) -> int:
        assert (level, opt) == (socket.SOL_SOCKET, socket.SO_SNDBUF)
        return self.sndbuf


def sockets(raw: Raw) -> Any:
    s = object.__new__(fence_send.Sockets)
    s.raw = raw  # type: ignore[assignment]
    s._sndbuf = raw.sndbuf
    return s


def test_a_batch_that_fits_changes_nothing() -> None:
    raw = Raw(212992, True)
    sockets(raw).fit(50_000)
    assert raw.calls == []


def test_a_large_batch_grows_the_buffer_forced_or_else_plainly() -> None:
    for force_ok, used in ((True, fence_send._SO_SNDBUFFORCE), (False, socket.SO_SNDBUF)):
        raw = Raw(212992, force_ok)
        s = sockets(raw)
        s.fit(600_000)
        assert raw.calls[-1][0] == used and raw.sndbuf // 2 >= 600_000 + 4096
        before = len(raw.calls)
        s.fit(600_000)  # remembered: no second call
        assert len(raw.calls) == before

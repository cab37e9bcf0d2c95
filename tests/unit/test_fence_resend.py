"""A token batch sent again because its send ran late (vipd/dataplane/fence_send.py `write`)
carries its timeouts only: its group changes went in with the first send, and a leave sent twice
fails with ENOENT (the fence then rebuilt its table: every VIP dark for a moment)."""

from __future__ import annotations

import ipaddress
import time
from typing import Any

from types import SimpleNamespace

from vipd.dataplane import fence_send
from vipd.dataplane.fence_send import TokenOps

A = ipaddress.ip_interface("10.0.0.1/32")
B = ipaddress.ip_interface("10.0.0.2/32")


def test_a_late_send_is_repeated_for_its_timeouts_only(monkeypatch: Any) -> None:
    sent: list[TokenOps] = []

    def late_send(s: Any, ops: TokenOps, lead: float, timeout_update: bool) -> tuple[int, float, float, int]:
        sent.append(ops)
        t0 = time.perf_counter()
        return 0, t0, t0 + (1.0 if len(sent) == 1 else 0.0), len(ops.tokens) + len(ops.grants)

    monkeypatch.setattr(fence_send, "send", late_send)
    socks = SimpleNamespace(created={1}, per_elem=2e-6, last_batch=0.0)  # (grant 1's chain and set exist)
    deadline = time.perf_counter() + 60
    ops = TokenOps([(A, deadline)], [(1, deadline)], join=[(A, 1)], leave=[B])
    fence_send.write(socks, ops, lambda: TokenOps(), None, True)  # type: ignore[arg-type]
    assert len(sent) == 2
    assert sent[0] is ops
    assert sent[1].tokens == ops.tokens and sent[1].grants == ops.grants
    assert sent[1].join == [] and sent[1].leave == []


def test_a_batch_whose_encoding_was_held_up_is_encoded_again_before_it_is_sent(monkeypatch: Any) -> None:
    """The thread stopped (SIGSTOP) or preempted between its clock read and the send: the timeouts
    it computed would count from the late send, and a token the owner let lapse meanwhile would
    serve again. They are computed again from a fresh clock, and only that batch goes out."""
    from vipd.dataplane.fence_wire import token_batch
    encoded: list[list[tuple[Any, int]]] = []

    def held_up_once(arm: Any, remove: Any, seq: int, timeout_update: bool, **kw: Any) -> tuple[bytes, int]:
        encoded.append(list(arm))
        if len(encoded) == 1:
            time.sleep(0.05)  # the process stopped right after the clock read
        return token_batch(arm, remove, seq, timeout_update, **kw)

    wire: list[bytes] = []

    def ack(n: int) -> bytes:  # NLMSG_ERROR(0) for sequence number n
        import struct
        return struct.pack("=IHHII", 36, 2, 0, n, 0) + struct.pack("=i", 0) + b"\0" * 16

    socks = SimpleNamespace(seq=10, fit=lambda size: None,
                            take_seqs=lambda n: 10,
                            raw=SimpleNamespace(send=wire.append, recv=lambda size: ack(11)))
    monkeypatch.setattr(fence_send, "token_batch", held_up_once)
    deadline = time.perf_counter() + 0.2
    err, t0, sent, armed = fence_send.send(socks, TokenOps([(A, deadline)]), 0.001, True)  # type: ignore[arg-type]
    assert err == 0 and armed == 1 and len(encoded) == 2 and len(wire) == 1
    (_, first_ms), (_, second_ms) = encoded[0][0], encoded[1][0]
    assert second_ms <= first_ms - 45  # counted from the clock after the hold-up
    assert wire[0] == token_batch(encoded[1], [], 10, True)[0]  # only the fresh batch went out

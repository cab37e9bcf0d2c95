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

    def late_send(s: Any, ops: TokenOps, at: float, timeout_update: bool) -> tuple[int, float, int]:
        sent.append(ops)
        return 0, time.perf_counter() + (1.0 if len(sent) == 1 else 0.0), len(ops.tokens) + len(ops.grants)

    monkeypatch.setattr(fence_send, "send", late_send)
    socks = SimpleNamespace(created={1}, per_elem=2e-6, last_batch=0.0)  # (grant 1's chain and set exist)
    deadline = time.perf_counter() + 60
    ops = TokenOps([(A, deadline)], [(1, deadline)], join=[(A, 1)], leave=[B])
    fence_send.write(socks, ops, lambda: TokenOps(), None, True)  # type: ignore[arg-type]
    assert len(sent) == 2
    assert sent[0] is ops
    assert sent[1].tokens == ops.tokens and sent[1].grants == ops.grants
    assert sent[1].join == [] and sent[1].leave == []

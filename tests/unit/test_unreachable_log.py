"""While etcd stays unreachable at start, the watch and the lease grant loop keep saying so: a
warning at once, then one every 5 s with the attempt count (it used to be one line, then silence).
Virtual time (trio's MockClock); the failing etcd is a stub (pure retry logic)."""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest
import trio
import trio.testing

from vipd.election.follow import follow
from vipd.election.lease import HostLease
from vipd.errors import EtcdUnavailable


class Down:
    """An etcd client whose every call fails as an unreachable cluster does."""

    endpoint = "http://192.0.2.1:2379"

    async def get_prefix(self, prefix: str) -> Any:
        raise EtcdUnavailable("no etcd endpoint answered: http://192.0.2.1:2379: connection refused")

    def watch_prefix(self, prefix: str, start_revision: int) -> Any:
        raise AssertionError("never reached")

    async def grant(self, ttl: int) -> Any:
        raise EtcdUnavailable("no etcd endpoint answered: http://192.0.2.1:2379: connection refused")


class NoMetrics:
    def observe_keepalive(self, seconds: float) -> None: ...
    def set_etcd_reachable(self, up: bool) -> None: ...
    def set_lease_valid_until(self, valid_until: float) -> None: ...


def _warnings(caplog: pytest.LogCaptureFixture, event: str) -> list[int]:
    return [int(re.search(r"attempts=(\d+)", r.getMessage())[1])  # type: ignore[index]
            for r in caplog.records if f"event={event}" in r.getMessage() and r.levelno == logging.WARNING]


@pytest.mark.parametrize("what", ["watch", "lease"])
def test_unreachable_etcd_is_reported_every_5_s(caplog: pytest.LogCaptureFixture, what: str) -> None:
    caplog.set_level(logging.INFO)

    async def main() -> None:
        with trio.move_on_after(12.5):
            if what == "watch":
                await follow(Down(), "/p/", lambda kvs, rev: None, lambda ev: None)  # type: ignore[arg-type]
            else:
                lease = HostLease(Down(), ttl=3, keepalives_per_ttl=6,  # type: ignore[arg-type]
                                  presence_key="/p/hosts/n", presence=lambda: "{}", publish=lambda ev: None,
                                  metrics=NoMetrics())
                await lease.run()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    attempts = _warnings(caplog, "watch_failed" if what == "watch" else "lease_grant_failed")
    assert len(attempts) == 3, attempts  # at 0 s, ~5 s, ~10 s
    assert attempts[0] == 1 and attempts[0] < attempts[1] < attempts[2], attempts

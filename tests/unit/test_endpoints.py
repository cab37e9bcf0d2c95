"""Endpoint choice and hedging (vipd.election.endpoints) against fake members on trio's mock clock."""

from __future__ import annotations

import math
from typing import Any

import pytest
import trio
import trio.testing

from vipd.election.endpoints import DOWN_BASE, AllFailed, EndpointFailed, EndpointPool, hedged
from vipd.election.etcd_transport import EtcdTransport
from vipd.errors import EtcdAuthError, EtcdUnavailable, LeaseLost

A, B, C = "http://a:2379", "http://b:2379", "http://c:2379"
TIMEOUT, HEDGE = 1.0, 0.5


class Members:
    """Fake members: per endpoint a behaviour ("ok" after a delay, "refuse", "hang", "no-leader",
    or an exception to raise); records who was asked when, and who was cancelled."""

    def __init__(self, **behaviour: Any) -> None:
        self.behaviour: dict[str, tuple[Any, ...]] = {A: ("ok", 0.01), B: ("ok", 0.01), C: ("ok", 0.01)}
        self.behaviour.update({k: v for k, v in behaviour.items()})
        self.asked: list[tuple[str, float]] = []
        self.cancelled: list[str] = []

    def set(self, ep: str, *b: Any) -> None:
        self.behaviour[ep] = b

    async def attempt(self, ep: str) -> str:
        self.asked.append((ep, trio.current_time()))
        kind, *arg = self.behaviour[ep]
        try:
            if kind == "ok":
                await trio.sleep(arg[0])
                return ep
            if kind == "refuse":
                raise EndpointFailed("ConnectError: connection refused")
            if kind == "no-leader":
                raise EndpointFailed("etcdserver: no leader")
            if kind == "hang":
                await trio.sleep(math.inf)
            raise arg[0]
        except trio.Cancelled:
            self.cancelled.append(ep)
            raise

    def who(self) -> list[str]:
        return [ep for ep, _ in self.asked]


async def call(pool: EndpointPool, m: Members) -> tuple[str, float]:
    t0 = trio.current_time()
    ep = await hedged(pool, m.attempt, timeout=TIMEOUT, hedge_after=HEDGE)
    return ep, trio.current_time() - t0


def test_waves_put_the_preferred_first_and_failed_members_last() -> None:
    pool = EndpointPool([A, B, C])
    assert pool.tiers(0.0) == [[A], [B, C]]
    pool.failed(A, 0.0)
    assert pool.tiers(0.1) == [[B], [C], [A]]
    pool.succeeded(C)
    assert pool.tiers(0.1) == [[C], [B], [A]]  # preferred rotates the healthy ones: C, then A's slot
    assert pool.tiers(DOWN_BASE + 0.01) == [[C], [A, B]]  # back after its down time, behind the preferred
    pool.failed(B, 1.0)
    pool.failed(C, 1.0)
    pool.failed(C, 1.0)  # twice: down twice as long
    assert pool.tiers(1.1) == [[A], [B, C]]  # A's down time is over
    pool.failed(A, 1.1)  # A's second failure in a row: down until 2.1; B until 1.5, C until 2.0
    assert pool.tiers(1.2) == [[B], [C, A]]  # nobody healthy: the soonest back first, then the others


async def test_a_healthy_preferred_member_is_asked_alone(autojump_clock: trio.testing.MockClock) -> None:
    pool, m = EndpointPool([A, B, C]), Members()
    for _ in range(3):
        assert (await call(pool, m))[0] == A
    assert m.who() == [A, A, A]


async def test_refused_member_moves_on_at_once(autojump_clock: trio.testing.MockClock) -> None:
    pool, m = EndpointPool([A, B, C]), Members()
    m.set(A, "refuse")
    ep, took = await call(pool, m)
    assert ep in (B, C) and took == pytest.approx(0.01)  # no hedge delay spent on a refusal
    assert m.who()[0] == A and sorted(m.who()[1:]) == [B, C]
    assert pool.preferred == ep and pool.is_down(A, trio.current_time())
    m.asked.clear()
    assert (await call(pool, m))[0] == ep and m.who() == [ep]  # sticks to the one that worked


async def test_hung_member_is_hedged_after_the_delay_and_cancelled(autojump_clock: trio.testing.MockClock) -> None:
    pool, m = EndpointPool([A, B, C]), Members()
    m.set(A, "hang")
    m.set(C, "ok", 0.2)
    ep, took = await call(pool, m)
    assert ep == B and took == pytest.approx(HEDGE + 0.01)
    assert sorted(m.cancelled) == [A, C]  # the winner cancels the hung one and the slower one
    assert not pool.is_down(A, trio.current_time())  # cancelled is not failed: it was merely slower
    m.asked.clear()
    await call(pool, m)
    assert m.who() == [B]


async def test_slow_preferred_can_still_win_after_hedging(autojump_clock: trio.testing.MockClock) -> None:
    """A follower waiting for a new leader answers late; it stays in the race after the hedge."""
    pool, m = EndpointPool([A, B, C]), Members()
    m.set(A, "ok", 0.7)
    m.set(B, "no-leader")
    m.set(C, "hang")
    ep, took = await call(pool, m)
    assert (ep, took) == (A, pytest.approx(0.7))
    assert pool.is_down(B, trio.current_time()) and m.cancelled == [C]


async def test_all_failing_reports_every_member_within_the_bound(autojump_clock: trio.testing.MockClock) -> None:
    pool, m = EndpointPool([A, B, C]), Members()
    m.set(A, "hang")
    m.set(B, "no-leader")
    m.set(C, "refuse")
    t0 = trio.current_time()
    with pytest.raises(AllFailed) as info:
        await hedged(pool, m.attempt, timeout=TIMEOUT, hedge_after=HEDGE)
    assert trio.current_time() - t0 == pytest.approx(TIMEOUT)  # A's own timeout; B and C failed at once
    text = str(info.value)
    assert f"{A}: no answer within {TIMEOUT}s" in text and "no leader" in text and "refused" in text
    # every member is down now: the next call still asks all of them, soonest back first
    m.asked.clear()
    m.set(C, "ok", 0.01)
    assert (await call(pool, m))[0] == C


async def test_down_member_is_skipped_then_retried(autojump_clock: trio.testing.MockClock) -> None:
    pool, m = EndpointPool([A, B, C]), Members()
    m.set(A, "refuse")
    await call(pool, m)  # A fails, B or C wins
    m.set(A, "ok", 0.01)
    m.set(B, "hang")
    m.set(C, "hang")
    pool.succeeded(B)
    m.asked.clear()
    ep, took = await call(pool, m)  # B hangs: C is hedged; A (down) only after C is slow as well
    assert ep == A and took == pytest.approx(2 * HEDGE + 0.01)
    assert m.who() == [B, C, A]


async def test_an_etcd_answer_ends_the_call_without_hedging(autojump_clock: trio.testing.MockClock) -> None:
    pool, m = EndpointPool([A, B, C]), Members()
    m.set(A, "raise", LeaseLost("requested lease not found"))
    with pytest.raises(LeaseLost):
        await hedged(pool, m.attempt, timeout=TIMEOUT, hedge_after=HEDGE)
    assert m.who() == [A] and not pool.is_down(A, trio.current_time())


async def test_a_late_second_winner_is_discarded(autojump_clock: trio.testing.MockClock) -> None:
    pool, m = EndpointPool([A, B]), Members()
    m.set(A, "ok", HEDGE + 0.01)
    m.set(B, "ok", 0.01)  # both finish at the same instant
    discarded: list[str] = []

    async def discard(ep: str) -> None:
        discarded.append(ep)

    ep = await hedged(pool, m.attempt, timeout=TIMEOUT, hedge_after=HEDGE, discard=discard)
    assert len(discarded) + len(m.cancelled) == 1 and ep not in discarded


async def test_transport_turns_failures_into_etcd_errors(autojump_clock: trio.testing.MockClock) -> None:
    t = EtcdTransport([A, B], timeout=TIMEOUT)
    m = Members()
    m.set(A, "refuse")
    m.set(B, "hang")
    with pytest.raises(EtcdUnavailable, match="no etcd endpoint answered"):
        await t._each_endpoint(m.attempt)
    m.set(A, "raise", EndpointFailed("TLS handshake rejected", auth=True))
    with pytest.raises(EtcdAuthError, match="refused the TLS connection"):
        await t._each_endpoint(m.attempt)
    m.set(B, "ok", 0.01)
    assert await t._each_endpoint(m.attempt) == B and t.endpoint == B

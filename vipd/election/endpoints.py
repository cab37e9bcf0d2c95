"""Which etcd member to ask, and asking several at once when one is slow (hedged requests).

A request goes to the preferred endpoint (the last one that answered) first. If it fails, or has not
answered within `hedge_after`, the other healthy endpoints are asked in parallel; if those fail too,
or are slow as well, the endpoints that failed recently are asked as a last resort. The first answer
wins and cancels the rest; every attempt is bounded by `timeout` from its own start, so a call ends
within 2 * hedge_after + timeout at worst.

Why hedge rather than try in turn: a dead or blackholed member (SIGKILL, link cut, SIGSTOP) must not
cost `timeout` per member in front of the one that would answer; with three members in turn the
fence margin was gone before the third was asked. Hedging after a delay (not asking everyone every
time) keeps the normal load at one request, and lets a slow-but-alive member (a follower waiting
for a new leader to forward a keepalive to) still answer.

Per-endpoint health: an endpoint that failed or timed out is "down" for a back-off (DOWN_BASE
doubling per consecutive failure up to DOWN_MAX): it is still asked, but only after the healthy
ones. A success makes it healthy and preferred again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence, TypeVar

import trio

T = TypeVar("T")
DOWN_BASE = 0.5  # seconds an endpoint is skipped after its first consecutive failure
DOWN_MAX = 5.0  # ... at most


class EndpointFailed(Exception):
    """This endpoint did not serve the request; another one may. auth=True: TLS rejected us."""

    def __init__(self, message: str, auth: bool = False) -> None:
        super().__init__(message)
        self.auth = auth


@dataclass
class _Health:
    failures: int = 0
    down_until: float = 0.0


class EndpointPool:
    """Endpoint order and per-endpoint health. Pure logic: time is passed in."""

    def __init__(self, endpoints: Sequence[str]) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self.endpoints = tuple(endpoints)
        self.preferred = self.endpoints[0]
        self._health = {e: _Health() for e in self.endpoints}

    def is_down(self, ep: str, now: float) -> bool:
        return self._health[ep].down_until > now

    def tiers(self, now: float) -> list[list[str]]:
        """Who to ask, in waves: [first], [the other healthy ones], [the ones down, soonest back first].

        Empty waves are left out. With nobody healthy, the endpoint back soonest goes first."""
        n = len(self.endpoints)
        start = self.endpoints.index(self.preferred)
        rotated = [self.endpoints[(start + i) % n] for i in range(n)]
        healthy = [e for e in rotated if not self.is_down(e, now)]
        down = sorted((e for e in rotated if self.is_down(e, now)), key=lambda e: self._health[e].down_until)
        order = healthy + down
        waves = [order[:1], healthy[1:], down if healthy else down[1:]]
        return [w for w in waves if w]

    def succeeded(self, ep: str) -> None:
        self._health[ep] = _Health()
        self.preferred = ep

    def failed(self, ep: str, now: float) -> None:
        h = self._health[ep]
        h.failures += 1
        h.down_until = now + min(DOWN_BASE * 2 ** (h.failures - 1), DOWN_MAX)


async def hedged(pool: EndpointPool, attempt: Callable[[str], Awaitable[T]], *, timeout: float,
                 hedge_after: float, discard: Callable[[T], Awaitable[None]] | None = None) -> T:
    """attempt(endpoint) on the endpoints in waves (see the module doc); the first success.

    EndpointFailed and a timeout mark that endpoint failed; any other exception (an etcd answer such
    as LeaseLost, or an auth problem) ends the call at once, as the answer. All attempts failed:
    AllFailed with every endpoint's reason. A second success that lands before the first one has
    cancelled it is handed to discard (e.g. to close a stream)."""
    waves = pool.tiers(trio.current_time())
    results: list[tuple[str, T]] = []
    errors: list[tuple[str, BaseException | None]] = []  # None: timed out
    answer: list[BaseException] = []  # an etcd answer that is not a success (raised as is)
    send, receive = trio.open_memory_channel[None](math.inf)

    async def one(ep: str) -> None:
        with trio.move_on_after(timeout) as scope:
            try:
                value = await attempt(ep)
            except EndpointFailed as e:
                pool.failed(ep, trio.current_time())
                errors.append((ep, e))
            except Exception as e:  # etcd answered (e.g. LeaseLost): that is the call's result
                pool.succeeded(ep)
                answer.append(e)
                nursery.cancel_scope.cancel()
            else:
                pool.succeeded(ep)
                results.append((ep, value))
                nursery.cancel_scope.cancel()  # the winner: the others are cancelled
                if len(results) > 1 and discard is not None:
                    with trio.CancelScope(shield=True):
                        await discard(value)
        if scope.cancelled_caught:
            pool.failed(ep, trio.current_time())
            errors.append((ep, None))
        send.send_nowait(None)

    async with trio.open_nursery() as nursery:
        pending = 0
        for i, wave in enumerate(waves):
            for ep in wave:
                nursery.start_soon(one, ep)
            pending += len(wave)
            last = i == len(waves) - 1
            with trio.move_on_after(math.inf if last else hedge_after):
                while pending:
                    await receive.receive()
                    pending -= 1
                    if results or answer:
                        break
            if results or answer:
                break
    if answer:
        for _, value in results if discard is not None else ():
            await discard(value)  # type: ignore[misc]
        raise answer[0]
    if results:
        return results[0][1]
    raise AllFailed(errors, timeout)


class AllFailed(Exception):
    """No endpoint served the request: (endpoint, EndpointFailed or None for a timeout) each."""

    def __init__(self, errors: list[tuple[str, BaseException | None]], timeout: float) -> None:
        self.errors = errors
        self.auth = next((f"{ep}: {e}" for ep, e in errors if isinstance(e, EndpointFailed) and e.auth), None)
        super().__init__("; ".join(f"{ep}: {e if e is not None else f'no answer within {timeout}s'}"
                                   for ep, e in errors))

"""Debouncing and scheduling: :class:`Hysteresis` (rise / fall, pure) and :class:`HealthMonitor`
(every check in its own task on its own clock, so a hung one never delays another).

A check starts *unknown*, which counts as unhealthy: a host is healthy only after ``rise``
successes, so a daemon that just started does not campaign on an unproven service.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import trio

from vipd import log
from vipd.health.probes import CheckFailed, run_check
from vipd.health.spec import CheckSpec, check_name

if TYPE_CHECKING:
    from vipd.dataplane.netlink import Netlink


class Hysteresis:
    """rise / fall debouncing, pure. ``state`` is True (healthy), False, or None (unknown).

    From a known state it flips after ``rise`` successes (to True) or ``fall`` failures (to False)
    in a row; from unknown, whichever run completes first decides. A contrary observation resets
    the run. :meth:`observe` returns the new state when it flips, else None.
    """

    def __init__(self, rise: int, fall: int, initial: bool | None = False) -> None:
        if rise < 1 or fall < 1:
            raise ValueError("rise and fall must be >= 1")
        self.rise, self.fall, self.state = rise, fall, initial
        self._run = 0  # length of the current run of observations of value _last
        self._last: bool | None = None

    def observe(self, ok: bool) -> bool | None:
        ok = bool(ok)
        if ok is self.state:
            self._run, self._last = 0, None
            return None
        if ok is not self._last:
            self._run, self._last = 0, ok
        self._run += 1
        if self._run >= (self.rise if ok else self.fall):
            self.state, self._run, self._last = ok, 0, None
            return ok
        return None


# ------------------------------------------------------------------------------- monitor

@dataclass(frozen=True)
class CheckStatus:
    healthy: bool | None  # None: unknown (counts as unhealthy)
    reason: str  # of the last run ("ok" or why it failed)
    since: float  # trio clock of the last flip (or of the start)
    runs: int = 0


Runner = Callable[[CheckSpec], Any]  # async (spec) -> None, raising CheckFailed


class HealthMonitor:
    """Runs named checks concurrently, each in its own task on its own interval, debounced by its
    rise/fall, and calls ``on_change(name, healthy, reason)`` on every flip (unknown -> known too).

    ``run`` reports started once every check has finished its first run (each is bounded by its
    timeout), so a caller can read :meth:`status` at once; every check is still unknown (and so
    unhealthy) then unless its rise/fall is 1.
    """

    def __init__(self, checks: Sequence[tuple[str, CheckSpec]],
                 on_change: Callable[[str, bool, str], None] | None = None, *,
                 nl: Netlink | None = None, runner: Runner | None = None) -> None:
        names = [n for n, _ in checks]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate check names: {names}")
        self.checks = list(checks)
        self.on_change = on_change
        self._nl = nl
        self._runner = runner
        self._status = {n: CheckStatus(None, "not run yet", 0.0) for n in names}
        self._first_round = trio.Event()
        self._pending_first = len(names)
        self._nursery: trio.Nursery | None = None
        self._scopes: dict[str, trio.CancelScope] = {}

    def status(self) -> dict[str, CheckStatus]:
        return dict(self._status)

    def healthy(self, *names: str) -> bool:
        """Every named check (default: all of them) is known healthy."""
        return all(self._status[n].healthy is True for n in (names or self._status))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every check until cancelled (also with none: `add` may start some later)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for name, spec in self.checks:
                self._start(name, spec)
            if self._pending_first == 0:
                self._first_round.set()
            await self._first_round.wait()
            task_status.started()
            await trio.sleep_forever()

    def add(self, name: str, spec: CheckSpec) -> None:
        """Start a check while running (a config reload); it starts unknown, like any other."""
        if name in self._status:
            raise ValueError(f"duplicate check name: {name}")
        self.checks.append((name, spec))
        self._status[name] = CheckStatus(None, "not run yet", trio.current_time())
        if self._nursery is not None:
            self._start(name, spec)

    def remove(self, name: str) -> None:
        """Stop a check and forget it (a config reload no longer names it)."""
        scope = self._scopes.pop(name, None)
        if scope is not None:
            scope.cancel()
        self.checks = [(n, s) for n, s in self.checks if n != name]
        self._status.pop(name, None)

    def _start(self, name: str, spec: CheckSpec) -> None:
        assert self._nursery is not None
        scope = self._scopes[name] = trio.CancelScope()

        async def one() -> None:
            with scope:
                await self._loop(name, spec)
        self._nursery.start_soon(one)

    async def _once(self, spec: CheckSpec) -> tuple[bool, str]:
        try:
            with trio.fail_after(spec.timeout):
                if self._runner is not None:
                    await self._runner(spec)
                else:
                    await run_check(spec, nl=self._nl)
        except trio.TooSlowError:
            return False, f"timed out after {spec.timeout:g}s"
        except CheckFailed as e:
            return False, e.reason
        except Exception as e:  # noqa: BLE001 - a bug in one check must not take the daemon down
            log.error("health_check_crashed", check=check_name(spec), error=repr(e))
            return False, f"internal error: {e!r}"
        return True, "ok"

    async def _loop(self, name: str, spec: CheckSpec) -> None:
        hyst = Hysteresis(spec.rise, spec.fall, initial=None)
        start = trio.current_time()
        self._status[name] = CheckStatus(None, "not run yet", start)
        first = True
        while True:
            started = trio.current_time()
            ok, reason = await self._once(spec)
            flip = hyst.observe(ok)
            if name not in self._status:
                return  # removed meanwhile
            old = self._status[name]
            since = trio.current_time() if flip is not None else old.since
            self._status[name] = CheckStatus(hyst.state, reason, since, old.runs + 1)
            if flip is not None:
                (log.info if flip else log.warning)("health_changed", check=name, healthy=flip, reason=reason)
                if self.on_change is not None:
                    self.on_change(name, flip, reason)
            if first and not self._first_round.is_set():
                first = False
                self._pending_first -= 1
                if self._pending_first == 0:
                    self._first_round.set()
            await trio.sleep_until(started + spec.interval)

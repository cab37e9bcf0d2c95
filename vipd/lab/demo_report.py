"""What `vipd demo` (vipd.lab.demo) shows: timestamped console lines, the live owner board, and
what the client saw over one step (Seen) with the step's outcome (StepResult).
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO

INDENT = " " * 10  # continuation lines start under the message, past "[ 12.34s] "


class Console:
    """Timestamped lines (seconds since start), one lock for every writer. A hook runs before each
    line so the owner board prints the changes that happened before it first."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.t0 = time.monotonic()
        self.lock = threading.RLock()
        self.before_line: Callable[[], None] | None = None
        self.broken = False  # stdout went away (e.g. `| head`): keep going silently, still tear down

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, msg: str, t: float | None = None, *, sync: bool = True) -> None:
        with self.lock:
            if sync and self.before_line is not None:
                self.before_line()
            stamp = (time.monotonic() if t is None else t) - self.t0
            self._write(f"[{stamp:6.2f}s] {msg}")

    def more(self, msg: str) -> None:
        """A continuation line of the previous message."""
        with self.lock:
            self._write(INDENT + msg)

    def _write(self, line: str) -> None:
        if self.broken:
            return
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (BrokenPipeError, ValueError, OSError):
            self.broken = True


def who(holders: frozenset[str] | set[str] | list[str]) -> str:
    if not holders:
        return "-"
    return "+".join(sorted(holders)) + ("  (!! two holders)" if len(holders) > 1 else "")


class OwnerBoard:
    """Prints one status line (`owners  api=h2  api6=h1`) at each change of any VIP's holders, stamped
    with the AddressMonitor's own time of the change.

    The monitor offers no "wait for any change", so a thread looks at its timeline every 50 ms; the
    printed times are the monitor's, exact whatever the lag, and every other line first prints the
    changes that precede it (Console.before_line)."""

    PERIOD = 0.05

    def __init__(self, console: Console, monitor: Any, vips: list[tuple[str, Any]]) -> None:
        self.console = console
        self.monitor = monitor
        self.vips = vips  # [(name, ip)]
        self._seen = {ip: 0 for _, ip in vips}
        self._state: dict[Any, frozenset[str]] = {ip: frozenset() for _, ip in vips}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "OwnerBoard":
        self.console.before_line = self.catch_up
        self._thread = threading.Thread(target=self._run, name="vipd-demo-board", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        self.console.before_line = None

    def _run(self) -> None:
        while not self._stop.wait(self.PERIOD):
            self.catch_up()

    def line(self) -> str:
        return "owners  " + "  ".join(f"{name}={who(self._state[ip])}" for name, ip in self.vips)

    def catch_up(self) -> None:
        with self.console.lock:  # the console's lock orders the board's lines among everyone's
            timeline = self.monitor.holders_timeline()
            changes: dict[float, list[tuple[Any, frozenset[str]]]] = {}
            for _, ip in self.vips:
                line = timeline[ip]
                for t, holders in line[self._seen[ip]:]:
                    changes.setdefault(t, []).append((ip, holders))
                self._seen[ip] = len(line)
            for t in sorted(changes):
                for ip, holders in changes[t]:
                    self._state[ip] = holders
                self.console.say("  " + self.line(), t, sync=False)


# ---------------------------------------------------------------------------- what the client saw

@dataclass
class Seen:
    """One VIP over one step, from the client's probes and the address monitor."""

    name: str
    owner_before: str | None
    owner_after: str | None
    answered_before: str | None
    answered_after: str | None
    outage_ms: float = 0.0
    lost: int = 0
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        lost = f" ({self.lost} probe{'s' if self.lost != 1 else ''} lost)" if self.lost else ""
        return (f"{self.name:<5} {self.answered_before or '-'} -> {self.answered_after or '-'}   "
                f"client outage {self.outage_ms:6.0f} ms{lost}")


@dataclass
class StepResult:
    name: str
    ok: bool
    headline: str
    problems: list[str] = field(default_factory=list)


def responder_at(probe: Any, t: float) -> str | None:
    """The host that answered the client's probes at time t (the last change of responder before t)."""
    before = [host for ts, host in probe.responders() if ts <= t]
    return before[-1] if before else None


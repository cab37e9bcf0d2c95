"""Signals that arrive while the daemon is still importing and starting up are kept, not fatal:
`vipd run` installs this first. A SIGTERM/SIGINT makes the supervisor stop cleanly at once when it
listens; a SIGHUP (reload) is applied once the daemon is ready (vipd/reload.py)."""

from __future__ import annotations

import signal
from types import FrameType

_seen: list[int] = []


def _remember(signum: int, frame: FrameType | None) -> None:
    _seen.append(signum)


def catch_early() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _remember)


def early() -> int | None:
    """The first stop signal received before the supervisor listened, if any."""
    stops = [s for s in _seen if s != signal.SIGHUP]
    return stops[0] if stops else None


def early_reload() -> bool:
    """A SIGHUP arrived before the reloader listened."""
    return signal.SIGHUP in _seen

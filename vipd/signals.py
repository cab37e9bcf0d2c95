"""A SIGTERM/SIGINT that arrives while the daemon is still importing and starting up is kept, not
fatal: `vipd run` installs this first, and the supervisor stops cleanly at once when it saw one."""

from __future__ import annotations

import signal
from types import FrameType

_seen: list[int] = []


def _remember(signum: int, frame: FrameType | None) -> None:
    _seen.append(signum)


def catch_early() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _remember)


def early() -> int | None:
    """The first stop signal received before the supervisor listened, if any."""
    return _seen[0] if _seen else None

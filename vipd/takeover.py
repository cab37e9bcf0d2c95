"""Was a transition to OWNER a takeover of a unit another host held, and what freed it? (Pure.)

Reads only what the ownership state already tracks: `last_owner` (who held the key before it last
disappeared), `last_clean` (that owner marked its hand-back released: a planned move) and
`absent_since` (when this host saw the key go, trio clock). A first claim (nobody held it before)
and this host taking back what it let go itself are not takeovers.
"""

from __future__ import annotations

from typing import Protocol


class Tracked(Protocol):
    @property
    def last_owner(self) -> str | None: ...
    @property
    def last_clean(self) -> bool: ...
    @property
    def absent_since(self) -> float: ...


def takeover(node: str, s: Tracked, now: float) -> tuple[str, float | None] | None:
    """(cause, seconds from the key's deletion seen to now) or None. cause: "released" | "expired"."""
    if s.last_owner is None or s.last_owner == node:
        return None
    seconds = now - s.absent_since if s.absent_since > 0 and now >= s.absent_since else None
    return ("released" if s.last_clean else "expired"), seconds

"""vipd/suspicions.py: a peer's suspicion reaches the units it can matter to, and every unit told
hears of its recovery."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from vipd.model import Event, OwnerRecord, PeerRecovered, PeerSuspected, ShutdownRequested
from vipd.ownership.state import VipState
from vipd.suspicions import Suspicions


@dataclass
class Unit:
    state: VipState


def setup() -> tuple[Suspicions, dict[str, Unit], list[tuple[str, Event]]]:
    units = {
        "owned-by-h2": Unit(VipState(owner=OwnerRecord("h2", 1, 1, 1, successor="h1"))),
        "prefers-h2": Unit(VipState(owner=OwnerRecord("h1", 1, 1, 1), ranking=("h2", "h1"))),
        "other": Unit(VipState(owner=OwnerRecord("h3", 1, 1, 1), ranking=("h3", "h2"))),
        "nobody": Unit(VipState()),
    }
    posted: list[tuple[str, Event]] = []
    return Suspicions(lambda: units, lambda n, e: posted.append((n, e))), units, posted


def test_a_suspicion_reaches_the_units_it_concerns_and_its_recovery_every_unit_told() -> None:
    s, units, posted = setup()
    assert s.tell(PeerSuspected("h2"))
    assert sorted(n for n, _ in posted) == ["owned-by-h2", "prefers-h2"]
    # news arriving later: the unit hears of the suspicion right after it
    posted.clear()
    s.after_owner("other", OwnerRecord("h2", 2, 1, 2, successor="h1"))
    s.after_owner("nobody", OwnerRecord("h3", 2, 1, 2))
    s.after_placement("nobody", ("h2",))
    s.after_owner("owned-by-h2", OwnerRecord("h2", 2, 1, 2))  # told already
    assert posted == [("other", PeerSuspected("h2")), ("nobody", PeerSuspected("h2"))]
    posted.clear()
    assert s.tell(PeerRecovered("h2"))
    assert sorted(n for n, _ in posted) == ["nobody", "other", "owned-by-h2", "prefers-h2"]
    assert all(isinstance(e, PeerRecovered) for _, e in posted)
    posted.clear()
    s.after_owner("other", OwnerRecord("h2", 3, 1, 3))  # recovered: nothing more
    assert s.tell(PeerRecovered("h2")) and posted == []
    assert not s.tell(ShutdownRequested())

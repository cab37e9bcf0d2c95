"""Peer suspicions to the units they can matter to, not to every unit.

A unit notes the peers whose heartbeats stopped (VipState.suspects) for two decisions only: a backup
may take over from a suspect owner that named it successor (ownership/state.py `may_take_over`),
and an owner does not hand over to a suspect preferred host (ownership/observe.py `track_target`).
So PeerSuspected(p) goes to the units whose owner is p or whose preferred host is p, and
PeerRecovered(p) to every unit that was told p was suspect. A unit that later learns p as its
owner or preferred host while p is suspect is told right after that news (`after_owner`,
`after_placement`: queued behind it, so the unit sees both in order). At 10,000 units a broadcast
woke every unit's task for each suspicion: a loop stall past the heartbeats' grace, which raised
the next suspicion.
"""

from __future__ import annotations

from typing import Callable, Mapping, Protocol, Sequence

from vipd.model import Event, OwnerRecord, PeerRecovered, PeerSuspected
from vipd.ownership.state import VipState


class Unit(Protocol):  # vipd.ownership.controller.Controller, as read here
    state: VipState


class Suspicions:
    def __init__(self, units: Callable[[], Mapping[str, Unit]], post: Callable[[str, Event], None]) -> None:
        self._units = units
        self._post = post
        self._told: dict[str, set[str]] = {}  # suspect peer -> units told so (until it recovers)

    def tell(self, ev: Event) -> bool:
        """Deliver PeerSuspected / PeerRecovered; False for any other event (not ours to deliver)."""
        if isinstance(ev, PeerSuspected):
            told = self._told.setdefault(ev.peer, set())
            for name, unit in self._units().items():
                s = unit.state
                if (s.owner is not None and s.owner.node == ev.peer) or (s.ranking or ())[:1] == (ev.peer,):
                    self._send(name, ev, told)
            return True
        if isinstance(ev, PeerRecovered):
            for name in self._told.pop(ev.peer, set()):
                self._post(name, ev)
            return True
        return False

    def after_owner(self, name: str, record: OwnerRecord) -> None:
        """Posted right after OwnerObserved(record) for the unit."""
        told = self._told.get(record.node) if record.node else None
        if told is not None and name not in told:
            self._send(name, PeerSuspected(record.node), told)  # type: ignore[arg-type]

    def after_placement(self, name: str, ranking: Sequence[str]) -> None:
        """Posted right after Placement(ranking) for the unit."""
        told = self._told.get(ranking[0]) if ranking else None
        if told is not None and name not in told:
            self._send(name, PeerSuspected(ranking[0]), told)

    def _send(self, name: str, ev: Event, told: set[str]) -> None:
        told.add(name)
        self._post(name, ev)

"""What every state notes before its handler runs (vipd/ownership/fsm.py `step`): lease validity,
health, the peers' suspicions, the placement ranking and the preferred host to hand over to, and
the owner record while not holding. Pure, like the rest of the core."""

from __future__ import annotations

from vipd.model import (Event, HealthChanged, LeaseValid, OwnerObserved, OwnerRecord, Placement, PeerRecovered,
                        PeerSuspected, State)
from vipd.ownership.state import HOLDING, Params, Preempt, VipState, evolve, released_by_other

S = State


def observe(p: Params, s: VipState, ev: Event, now: float) -> VipState:
    if isinstance(ev, LeaseValid) and (ev.lease == s.lease or s.state not in HOLDING):
        return evolve(s, lease=ev.lease, valid_until=ev.valid_until)
    if isinstance(ev, HealthChanged):
        return evolve(s, healthy=ev.healthy)
    if isinstance(ev, PeerSuspected):  # (a suspect is no preferred host to hand over to)
        fresh = s.state is S.BACKUP and ev.peer not in s.suspects and s.owner is not None and s.owner.node == ev.peer
        # a new suspicion of the owner ends a takeover retry wait: that wait was for an owner heard again
        return track_target(p, evolve(s, suspects=s.suspects | {ev.peer}, retry_at=0.0 if fresh else s.retry_at), now)
    if isinstance(ev, PeerRecovered):
        return track_target(p, evolve(s, suspects=s.suspects - {ev.peer}), now)
    if isinstance(ev, Placement):
        return track_target(p, evolve(s, ranking=ev.ranking, joined=ev.joined), now)
    if isinstance(ev, OwnerObserved) and s.state not in HOLDING:
        o = ev.record
        if free(p, o) and not (s.owner is not None and free(p, s.owner)):  # deleted, or handed back
            last = s.owner if o.node is None else o
            s = evolve(s, absent_since=now, last_owner=last.node if last else None,
                        last_clean=bool(last and last.released))
        return evolve(s, owner=o)
    return s


def free(p: Params, o: OwnerRecord) -> bool:
    """No host holds the key: absent, or another host's hand-back mark (a candidate takes it)."""
    return o.node is None or released_by_other(p, o)


def track_target(p: Params, s: VipState, now: float) -> VipState:
    """OWNER: follow the preferred host; the hold-down restarts whenever it changes. A host whose
    heartbeats stopped is no target (a dead host's presence outlives it by up to its lease TTL)."""
    target = s.ranking[0] if s.ranking else None
    if (s.state is not S.OWNER or p.preempt_delay is None or p.anycast or target in (None, p.node)
            or target in s.suspects):
        return evolve(s, preempt=None)
    if s.preempt is None or s.preempt.target != target:
        return evolve(s, preempt=Preempt(target, now))
    return s

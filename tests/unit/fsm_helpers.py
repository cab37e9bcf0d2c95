"""Shared fixtures for the ownership core tests: parameters, records, states, and a runner."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from vipd.model import (AddressAdded, AddressFailed, AddressRemoved, Campaign, CampaignFailed, CampaignLost,
                        CampaignWon, ClaimDeferred, EtcdRestored, Event, HealthChanged, KeyReleased, LeaseGone,
                        LeaseValid, LinkUp, OwnerObserved, OwnerRecord, PeerRecovered, PeerSuspected, Placement,
                        PreemptGranted, ProbeDone, Reconcile, ReleaseFailed, ReleaseRequested, RemoveFailed,
                        ShutdownRequested, Start, State, Tick)
from vipd.ownership.fsm import step
from vipd.ownership.state import Params, Preempt, Sub, VipState

P = Params(node="h1", fence_margin=0.5, release_holdoff=3.0)
PP = Params(node="h1", fence_margin=0.5, release_holdoff=3.0, preempt_delay=5.0, campaign_stagger=0.2)
PC = replace(P, conflict_check=True)
AP = Params(node="h1", fence_margin=0.5, release_holdoff=3.0, anycast=True)
TP = replace(PC, takeover=True)  # fast takeover on (and the conflict probe, which a takeover skips)
LEASE = 7
ABSENT = OwnerRecord(None, revision=10)
MINE = OwnerRecord("h1", epoch=11, lease=LEASE, revision=11)
OTHER = OwnerRecord("h2", epoch=12, lease=99, revision=12)
NAMED = replace(OTHER, successor="h1", revision=13)  # h2 owns it and names us its successor


def run(s: VipState, *events: Event, now: float = 100.0, p: Params = P) -> tuple[VipState, list[Any]]:
    actions: list[Any] = []
    for ev in events:
        s, acts = step(p, s, ev, now)
        actions.extend(acts)
    return s, actions


def backup(valid_until: float = 102.0, owner: OwnerRecord | None = ABSENT, **kw: Any) -> VipState:
    kw.setdefault("sub", Sub.IDLE)
    return VipState(state=State.BACKUP, lease=LEASE, valid_until=valid_until, owner=owner, **kw)


def campaigning(**kw: Any) -> VipState:
    return backup(sub=Sub.CAMPAIGNING, **kw)


def owner(valid_until: float = 102.0, **kw: Any) -> VipState:
    return VipState(state=State.OWNER, sub=Sub.SERVING, lease=LEASE, valid_until=valid_until, owner=MINE,
                    epoch=11, **kw)


def acquiring(valid_until: float = 102.0, sub: Sub = Sub.ADDING) -> VipState:
    return replace(owner(valid_until), state=State.ACQUIRING, sub=sub)


# One value of every event type (and the variants that matter), for the exhaustive sweeps.
ALL_EVENTS: list[Event] = [
    Start(), LeaseValid(LEASE, 102.0), LeaseValid(LEASE + 1, 102.0), LeaseGone(LEASE), LeaseGone(LEASE + 1),
    OwnerObserved(ABSENT), OwnerObserved(MINE), OwnerObserved(replace(OTHER, revision=40)),
    CampaignWon(MINE), CampaignWon(replace(MINE, lease=3)), CampaignLost(OTHER), CampaignFailed("x"),
    ProbeDone(), ProbeDone("02:00:00:00:00:99"), AddressAdded(), AddressFailed("x"), ClaimDeferred(),
    AddressRemoved(), RemoveFailed("x"), KeyReleased(), ReleaseFailed("x"), ReleaseRequested(),
    ShutdownRequested(), LinkUp(), EtcdRestored(), Reconcile(False, True), Reconcile(True, False),
    Reconcile(True, True, taken_at=50.0), Tick(), HealthChanged(False, "down"), HealthChanged(True),
    Placement(("h2", "h1")), Placement(("h1", "h2")), Placement(()), PreemptGranted(),
    OwnerObserved(NAMED), PeerSuspected("h2"), PeerRecovered("h2"), CampaignWon(replace(MINE, epoch=14, revision=14)),
    OwnerObserved(replace(OTHER, released=True, revision=41)), CampaignWon(replace(MINE, epoch=42), handed_back=True),
]


def every_state() -> list[VipState]:
    """A sample of every (state, sub-state) with the data each needs."""
    from vipd.ownership.state import SUBSTATES, Release
    out = []
    for st, subs in SUBSTATES.items():
        for sub in subs:
            for base in (owner(), backup(), backup(owner=MINE), backup(owner=OTHER), owner(valid_until=100.2),
                         backup(owner=NAMED, suspects=frozenset({"h2"})),
                         replace(owner(), preempt=Preempt("h2", 90.0))):
                s = replace(base, state=st, sub=sub)
                if st is State.RELEASING:
                    then = State.STOPPED if base.valid_until == 100.2 else State.BACKUP
                    s = replace(s, release=Release("x", then), retry_at=100.1 if sub is not Sub.DELETING else 0.0)
                if st is State.FENCED:
                    s = replace(s, retry_at=100.1)
                out.append(s)
    return out

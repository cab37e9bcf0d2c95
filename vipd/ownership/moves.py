"""The moves every ownership transition is built of (pure; vipd/ownership/fsm.py's handlers use
them): to a state with a reason; claim (add the addresses, every fence armed until the lease's
fence deadline); acquire (after winning the key: a conflict probe first when no vipd peer handed
the VIP back cleanly); fence (remove at once, never waiting on etcd); release (remove, then give
the key back: `released`, `give_key_back`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vipd.model import (Action, ClaimAddress, DeleteOwnerKey, HoldOff, OwnerRecord, ProbeConflicts, RemoveAddress,
                        ReturnPreemptToken, State, StopAnnouncing)
from vipd.ownership.state import Noted, Params, Release, Sub, VipState, evolve, fence_deadline

if TYPE_CHECKING:
    from typing_extensions import Unpack  # (typing's from 3.11; only read by mypy)

S = State
Result = tuple[VipState, list[Action]]


def to(s: VipState, state: State, sub: Sub, reason: str, **kw: Unpack[Noted]) -> VipState:
    return evolve(s, state=state, sub=sub, reason=reason, why_not="", **kw)


def claim(p: Params, s: VipState, now: float) -> Result:
    return to(s, S.ACQUIRING, Sub.ADDING, s.reason, changed_at=now), [ClaimAddress(fence_deadline(p, s))]


def acquire(p: Params, s: VipState, now: float, reason: str, epoch: int, probe: bool = True) -> Result:
    s = to(s, S.ACQUIRING, Sub.ADDING, reason, epoch=epoch, retry_at=0.0)
    if probe and p.conflict_check and not s.probed and not s.last_clean:
        # no vipd peer handed it back cleanly: another machine may answer for it
        return to(s, S.ACQUIRING, Sub.PROBING, reason), [ProbeConflicts()]
    return claim(p, s, now)


def fence(s: VipState, reason: str, now: float) -> Result:
    s = to(s, S.FENCED, Sub.REMOVING, reason, epoch=0, preempt=None, retry_at=0.0, changed_at=now)
    return s, [StopAnnouncing(), RemoveAddress()]


def release(s: VipState, now: float, reason: str, *, then: State = S.BACKUP, clean: bool = True,
             preempt: bool = False, revoke: bool = False) -> Result:
    s = to(s, S.RELEASING, Sub.REMOVING, reason, release=Release(reason, then, clean, preempt, revoke), preempt=None,
            retry_at=0.0, changed_at=now)
    return s, [StopAnnouncing(), RemoveAddress()]


def released(p: Params, s: VipState, now: float, reason: str) -> Result:
    rel = s.release or Release(reason)
    actions: list[Action] = [ReturnPreemptToken()] if rel.preempt else []
    if rel.then is S.STOPPED:
        return to(s, S.STOPPED, Sub.NONE, reason, epoch=0, release=None), actions
    backoff = 2 ** min(s.conflicts - 1, 5) if s.conflicts else 1  # back off on repeated conflicts
    holdoff = p.release_holdoff * backoff
    if not p.anycast and s.owner is not None and s.owner.node == p.node:  # we gave it back: it is absent
        s = evolve(s, owner=OwnerRecord(None, revision=s.owner.revision), last_owner=p.node,
                    last_clean=rel.clean, absent_since=now)
    return (to(s, S.BACKUP, Sub.IDLE, reason, epoch=0, release=None, retry_at=0.0,
                holdoff_until=now + holdoff if holdoff > 0 else 0.0),
            actions + ([HoldOff(True)] if holdoff > 0 else []))


def give_key_back(s: VipState) -> Result:
    """RELEASING with the addresses gone: delete the key (marked clean when we served fine)."""
    rel = s.release or Release(s.reason)
    leave = rel.clean and rel.revoke  # a daemon stop: the lease's revoke deletes it
    return to(s, S.RELEASING, Sub.DELETING, s.reason), [DeleteOwnerKey(s.epoch, s.lease if rel.clean else 0, leave)]

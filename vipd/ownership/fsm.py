"""Per-VIP ownership as a pure function: step(params, state, event, now) -> (state, actions).

No I/O and no clock: `now` is passed in. Every state change is checked against TRANSITIONS.
The invariants it keeps:
- the address is only added while the lease is proven (ClaimAddress carries a kernel lifetime that
  ends `fence_margin` before the lease can expire in etcd);
- giving up voluntarily removes the address before the owner key is deleted;
- fencing (deadline passed, lease gone, key lost) removes the address without waiting on etcd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from vipd.model import (Action, AddressAdded, AddressFailed, AddressRemoved, Announce, Campaign,
                        CampaignFailed, CampaignLost, CampaignWon, ClaimAddress, DeleteOwnerKey,
                        EtcdRestored, Event, KeyReleased, LeaseGone, LeaseValid, LinkUp, OwnerObserved,
                        OwnerRecord, Reconcile, ReleaseFailed, ReleaseRequested, RemoveAddress,
                        RemoveFailed, ShutdownRequested, Start, State, StopAnnouncing, Tick,
                        HealthChanged, Placement, PreemptGranted, RequestPreempt, ClaimDeferred)

S = State
TRANSITIONS: dict[State, frozenset[State]] = {
    S.INIT: frozenset({S.BACKUP, S.STOPPED}),
    S.BACKUP: frozenset({S.ACQUIRING, S.STOPPED}),
    S.ACQUIRING: frozenset({S.OWNER, S.FENCED, S.RELEASING}),
    S.OWNER: frozenset({S.FENCED, S.RELEASING}),
    S.RELEASING: frozenset({S.BACKUP, S.STOPPED}),
    S.FENCED: frozenset({S.BACKUP, S.STOPPED}),
    S.STOPPED: frozenset(),
}
HOLDING = (S.ACQUIRING, S.OWNER)  # states in which the address may be in the kernel with our blessing


class InvalidTransition(RuntimeError):
    pass


@dataclass(frozen=True)
class Params:
    node: str
    fence_margin: float
    release_holdoff: float
    preempt_delay: float | None = None  # hand a unit to its preferred host after this hold-down; None: never
    campaign_stagger: float = 0.2  # per place behind in the ranking, wait this long before campaigning
    anycast: bool = False  # every fit host holds the unit at once: no owner key, no election


@dataclass(frozen=True)
class VipState:
    state: State = S.INIT
    owner: OwnerRecord | None = None  # None until the first observation of the owner key
    lease: int = 0  # current host lease (0: none)
    valid_until: float = 0.0  # the lease cannot expire in etcd before this instant
    epoch: int = 0  # our ownership epoch (owner key create_revision) while we hold or release it
    pending: bool = False  # an etcd request (campaign or key delete) is in flight
    holdoff_until: float = 0.0  # no campaign before this instant (after a voluntary release)
    removed: bool = False  # RELEASING: the address is confirmed gone
    stopping: bool = False
    refresh_at: float = 0.0  # OWNER: when to refresh the address lifetime (0: nothing pending)
    healthy: bool = True  # host and unit checks pass: may campaign and keep serving
    ranking: tuple[str, ...] | None = None  # healthy candidates, target first (None: no placement yet)
    absent_since: float = 0.0  # when the owner key was last seen disappearing
    last_owner: str | None = None  # who held the key before it disappeared
    last_clean: bool = False  # ... and whether it marked its hand-back clean (address removed first)
    release_clean: bool = True  # RELEASING: we served the unit fine (not an address failure or conflict)
    preempt_target: str | None = None  # OWNER: the preferred host we should hand over to
    preempt_since: float = 0.0  # ... since when it has been the target
    preempt_asked: bool = False  # the host-wide preemption token was requested
    conflicts: int = 0  # consecutive claims refused because another machine answers for the address
    reason: str = ""  # why the last state change happened


def fence_deadline(p: Params, s: VipState) -> float:
    """The instant by which the address must be gone: margin before the lease can expire."""
    return s.valid_until - p.fence_margin


def lifetime(p: Params, s: VipState, now: float) -> int:
    """Whole seconds of kernel address lifetime that still end before the fence deadline."""
    return max(0, math.floor(fence_deadline(p, s) - now))


REFRESH_SLACK = 0.05  # seconds; absorbs timer lateness at the refresh instant


def refresh_plan(p: Params, s: VipState, now: float) -> tuple[float, int]:
    """When to refresh the address after a keepalive ack, and with which lifetime.

    Lifetimes are whole seconds, rounded down. Refreshing right away would lose up to a second of
    the lease; refreshing when (deadline - now) has just passed a whole number of seconds makes the
    kernel keep the address until REFRESH_SLACK before the fence deadline. The previous lifetime is
    still running meanwhile, so waiting is safe (it only ever ends earlier)."""
    life = lifetime(p, s, now)
    return max(now, fence_deadline(p, s) - life - REFRESH_SLACK), life


def campaign_at(p: Params, s: VipState) -> float:
    """Candidates campaign in ranking order: the best (other than the host that just let go)
    at once, each further one `campaign_stagger` later, so the preferred host wins without a race."""
    if s.ranking is None:
        return s.holdoff_until
    order = [h for h in s.ranking if h != s.last_owner]
    if p.node == s.last_owner and p.node in s.ranking:
        place = len(order)  # we just let go: campaign last, after everyone else had their turn
    elif p.node in order:
        place = order.index(p.node)
    else:
        return math.inf
    return max(s.holdoff_until, s.absent_since + place * p.campaign_stagger)


def _claim(p: Params, s: VipState, now: float) -> ClaimAddress:
    return ClaimAddress(lifetime(p, s, now), fence_deadline(p, s))


def wakeup(p: Params, s: VipState, now: float) -> float | None:
    """When the controller must call step(Tick) at the latest (a deadline the FSM is waiting on)."""
    if s.state in HOLDING:
        times = [fence_deadline(p, s), s.refresh_at or math.inf]
        if s.state is S.OWNER and s.preempt_target and not s.preempt_asked and p.preempt_delay is not None:
            times.append(s.preempt_since + p.preempt_delay)
        return min(times)
    if s.state is S.BACKUP and s.owner is not None and s.owner.node is None:
        at = campaign_at(p, s)
        return at if now < at < math.inf else None
    if s.state is S.BACKUP and s.holdoff_until > now:
        return s.holdoff_until
    return None


def step(p: Params, s: VipState, ev: Event, now: float) -> tuple[VipState, list[Action]]:
    new, actions = _step(p, s, ev, now)
    if new.state is not s.state and new.state not in TRANSITIONS[s.state]:
        raise InvalidTransition(f"{s.state.value} -> {new.state.value} on {type(ev).__name__}")
    return new, actions


def _to(s: VipState, state: State, reason: str, **kw: object) -> VipState:
    return replace(s, state=state, reason=reason, **kw)


def _fence(s: VipState, reason: str) -> tuple[VipState, list[Action]]:
    return _to(s, S.FENCED, reason, epoch=0, refresh_at=0.0), [StopAnnouncing(), RemoveAddress()]


def _release(s: VipState, reason: str, stopping: bool, clean: bool = True) -> tuple[VipState, list[Action]]:
    return (_to(s, S.RELEASING, reason, removed=False, stopping=stopping, refresh_at=0.0, release_clean=clean),
            [StopAnnouncing(), RemoveAddress()])


def _released(p: Params, s: VipState, now: float, reason: str) -> tuple[VipState, list[Action]]:
    if s.stopping:
        return _to(s, S.STOPPED, reason, epoch=0, pending=False), []
    holdoff = p.release_holdoff * (2 ** min(s.conflicts - 1, 5) if s.conflicts else 1)  # back off on conflicts
    return _to(s, S.BACKUP, reason, epoch=0, pending=False, holdoff_until=now + holdoff, preempt_target=None,
               preempt_asked=False), []


def _placed(p: Params, s: VipState, ranking: tuple[str, ...], now: float) -> VipState:
    """Track the preferred host while we own the unit (restart the hold-down when it changes)."""
    s = replace(s, ranking=ranking)
    target = ranking[0] if ranking else None
    if s.state is not S.OWNER or p.preempt_delay is None or p.anycast or target in (None, p.node):
        return replace(s, preempt_target=None)
    if target != s.preempt_target:
        return replace(s, preempt_target=target, preempt_since=now)
    return s


def _maybe_campaign(p: Params, s: VipState, now: float) -> tuple[VipState, list[Action]]:
    """In BACKUP: campaign for an absent key, adopt our own key, or clear our stale one."""
    if s.state is not S.BACKUP or s.pending or s.stopping or now < s.holdoff_until:
        return s, []
    if s.owner is None and not p.anycast:
        return s, []
    if not s.healthy:
        return s, []
    if s.lease == 0 or lifetime(p, s, now) < 1:
        return s, []
    if p.anycast:  # no election: hold it while fit and the lease is proven
        s = _to(s, S.ACQUIRING, "anycast: healthy with a live lease", epoch=0)
        return s, [_claim(p, s, now)]
    o = s.owner
    if o.node is None:
        if now < campaign_at(p, s):
            return s, []
        return replace(s, pending=True), [Campaign(s.lease)]
    if o.node == p.node and o.lease == s.lease:  # our key on our live lease: serve it again
        s = _to(s, S.ACQUIRING, "adopted own key", epoch=o.epoch)
        return s, [_claim(p, s, now)]
    if o.node == p.node:  # our key on a lease we no longer keep alive: give it back now
        return replace(s, pending=True), [DeleteOwnerKey(o.epoch)]
    return s, []


def _step(p: Params, s: VipState, ev: Event, now: float) -> tuple[VipState, list[Action]]:
    st = s.state
    if st is S.STOPPED:
        return s, []

    if isinstance(ev, ShutdownRequested):
        if st in HOLDING:
            return _release(s, "shutdown", stopping=True)
        if st is S.RELEASING:
            return replace(s, stopping=True), []
        return _to(s, S.STOPPED, "shutdown"), [RemoveAddress()]

    if isinstance(ev, Start):
        if st is S.INIT:
            return _to(s, S.BACKUP, "started"), [RemoveAddress()]
        return s, []

    if isinstance(ev, LeaseValid):
        if st in HOLDING and ev.lease != s.lease:
            return _fence(replace(s, lease=ev.lease, valid_until=ev.valid_until), "lease replaced")
        s = replace(s, lease=ev.lease, valid_until=ev.valid_until)
        if st is S.ACQUIRING:  # a deferred (or slow) first claim: try again with the fresher lease
            return s, ([_claim(p, s, now)] if lifetime(p, s, now) >= 1 else [])
        if st is S.OWNER:
            at, life = refresh_plan(p, s, now)
            if life < 1:
                return s, []
            if at <= now:
                return replace(s, refresh_at=0.0), [ClaimAddress(life, fence_deadline(p, s), refresh=True)]
            return replace(s, refresh_at=at), []
        return _maybe_campaign(p, s, now)

    if isinstance(ev, LeaseGone):
        if ev.lease != s.lease:
            return s, []
        s = replace(s, lease=0, valid_until=0.0)
        if st in HOLDING:
            return _fence(s, "lease lost")
        if st is S.RELEASING and s.removed:
            return _released(p, s, now, "lease lost while releasing")
        return s, []

    if isinstance(ev, OwnerObserved):
        o = ev.record
        if p.anycast:
            return replace(s, owner=o), []  # anycast units have no owner key
        if st in HOLDING:
            if o.revision <= s.epoch:
                return s, []  # older than our claim: stale
            if o.node != p.node or o.epoch != s.epoch:
                return _fence(replace(s, owner=o), f"owner key now {o.node or 'absent'}")
            return replace(s, owner=o), []
        if o.node is None and (s.owner is None or s.owner.node is not None):
            s = replace(s, absent_since=now, last_owner=s.owner.node if s.owner else None,
                        last_clean=bool(s.owner and s.owner.released))
        s = replace(s, owner=o)
        return _maybe_campaign(p, s, now)

    if isinstance(ev, CampaignWon):
        o = ev.record
        s = replace(s, pending=False, owner=o)
        if st is not S.BACKUP or s.stopping or o.lease != s.lease or lifetime(p, s, now) < 1:
            # won, but can no longer serve it safely: hand the key straight back
            return replace(s, pending=True), [DeleteOwnerKey(o.epoch)]
        s = _to(s, S.ACQUIRING, "campaign won", epoch=o.epoch)
        return s, [_claim(p, s, now)]

    if isinstance(ev, CampaignLost):
        return _maybe_campaign(p, replace(s, pending=False, owner=ev.record), now)

    if isinstance(ev, CampaignFailed):
        return replace(s, pending=False), []

    if isinstance(ev, AddressAdded):
        if st is S.ACQUIRING:
            s = _to(s, S.OWNER, "address added", conflicts=0)
            return _placed(p, s, s.ranking or (), now), [Announce()]
        return s, []

    if isinstance(ev, AddressFailed):
        if st in HOLDING:
            s = replace(s, conflicts=s.conflicts + 1 if ev.conflict else 0)
            return _release(s, f"address failed: {ev.error}", stopping=s.stopping, clean=False)
        return s, []

    if isinstance(ev, ClaimDeferred):
        return s, []  # stay ACQUIRING: the next LeaseValid claims, or the deadline fences

    if isinstance(ev, HealthChanged):
        s = replace(s, healthy=ev.healthy)
        if not ev.healthy and st in HOLDING:
            return _release(s, f"unhealthy: {ev.reason}", stopping=s.stopping)
        return _maybe_campaign(p, s, now)

    if isinstance(ev, Placement):
        return _maybe_campaign(p, _placed(p, s, ev.ranking, now), now)

    if isinstance(ev, PreemptGranted):
        if st is S.OWNER and s.preempt_asked and s.preempt_target:
            return _release(s, f"handing over to preferred host {s.preempt_target}", stopping=False)
        return replace(s, preempt_asked=False), []

    if isinstance(ev, AddressRemoved):
        if st is S.FENCED:
            return _to(s, S.BACKUP, s.reason), []
        if st is S.RELEASING and not s.removed:
            if s.epoch == 0 or s.lease == 0:  # nothing left to give back in etcd
                return _released(p, replace(s, removed=True), now, s.reason)
            return replace(s, removed=True, pending=True), [DeleteOwnerKey(s.epoch, s.release_clean)]
        return s, []

    if isinstance(ev, RemoveFailed):
        return s, []  # retried on the next Tick; the kernel lifetime bounds the damage

    if isinstance(ev, KeyReleased):
        if st is S.RELEASING:
            return _released(p, s, now, s.reason)
        return replace(s, pending=False), []

    if isinstance(ev, ReleaseFailed):
        if st is S.RELEASING and s.stopping:
            return _released(p, s, now, f"{s.reason}; key left to its lease: {ev.error}")
        return replace(s, pending=False), []

    if isinstance(ev, ReleaseRequested):
        if st in HOLDING:
            return _release(s, ev.reason, stopping=False)
        return s, []

    if isinstance(ev, (LinkUp, EtcdRestored)):
        return s, ([Announce()] if st is S.OWNER else [])

    if isinstance(ev, Reconcile):
        if st is S.OWNER and ev.missing:
            life = lifetime(p, s, now)
            return s, ([ClaimAddress(life, fence_deadline(p, s)), Announce()] if life >= 1 else [])
        if st in (S.BACKUP, S.FENCED) and ev.present:
            return s, [RemoveAddress()]
        return s, []

    if isinstance(ev, Tick):
        if st in HOLDING and now >= fence_deadline(p, s):
            return _fence(s, "lease deadline passed")
        if st is S.OWNER and s.refresh_at and now >= s.refresh_at:
            life = lifetime(p, s, now)
            return replace(s, refresh_at=0.0), ([ClaimAddress(life, fence_deadline(p, s), refresh=True)]
                                                if life >= 1 else [])
        if (st is S.OWNER and s.preempt_target and not s.preempt_asked and p.preempt_delay is not None
                and now >= s.preempt_since + p.preempt_delay):
            return replace(s, preempt_asked=True), [RequestPreempt(s.preempt_target)]
        if st is S.FENCED:
            return s, [RemoveAddress()]
        if st is S.RELEASING:
            if not s.removed:
                return s, [RemoveAddress()]
            if not s.pending:
                return replace(s, pending=True), [DeleteOwnerKey(s.epoch, s.release_clean)]
            return s, []
        return _maybe_campaign(p, s, now)

    raise TypeError(f"unknown event {ev!r}")

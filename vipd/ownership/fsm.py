"""Per-unit ownership as a pure function: step(params, state, event, now) -> (state, actions).

No I/O and no clock. Dispatch is a table keyed by (state, event type); an event a state has no
entry for changes nothing. Every result is checked: the state change against TRANSITIONS, the
sub-state against SUBSTATES (vipd/ownership/state.py, which also derives every timer: `wakeup`).

The invariants it keeps (the safety argument, with the kernel fences in vipd/fence.py):
- Take: win the owner key in etcd, then (after a conflict probe when the previous owner did not
  hand back cleanly) add the addresses and arm every fence until the lease's fence deadline, then
  announce. The deadline is `fence_margin` before the lease can expire in etcd, and every fence
  is kernel-enforced (address lifetime, nftables token): a dead, hung or partitioned owner stops
  serving by that deadline without running any code, before etcd can let another host win.
- Give up: remove the addresses (disarming the fences), and only then delete the owner key.
- Fence (deadline passed, lease gone, key lost or replaced): remove at once, never waiting on etcd.
- Fast takeover (vipd/succession.py has the argument): a BACKUP named successor in the owner's record
  replaces the record only while the owner is suspect (its heartbeats stopped for the grace G), by a
  transaction comparing the record's mod revision; the owner's token ended before that by the peer
  lease. No conflict probe then: the owner is a vipd peer whose kernel token already ended.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from vipd.model import (Action, AddressAdded, AddressFailed, AddressRemoved, Announce, ArmFence, Campaign,
                        CampaignFailed, CampaignLost, CampaignWon, ClaimAddress, ClaimDeferred, DeleteOwnerKey,
                        EtcdRestored, Event, HealthChanged, HoldOff, KeyReleased, LeaseGone, LeaseValid, LinkUp,
                        OwnerObserved, PreemptGranted, ProbeDone, Reconcile, ReleaseFailed, ReleaseRequested,
                        RemoveAddress, RemoveFailed, RenewLease, RequestPreempt, ReturnPreemptToken,
                        ShutdownRequested, Start, State, TakeOver, Tick)
from vipd.ownership.moves import acquire, claim, fence, give_key_back, release, released, to
from vipd.ownership.observe import observe, track_target
from vipd.ownership.state import (HOLDING, RETRY_CAMPAIGN, RETRY_DELETE, RETRY_REMOVE, SUBSTATES, TRANSITIONS,
                                  Params, Release, Sub, VipState, evolve, fence_deadline, lifetime,
                                  may_take_over, released_by_other, why_not_campaign)

S = State
Result = tuple[VipState, list[Action]]
Handler = Callable[[Params, VipState, Event, float], Result]


class InvalidTransition(RuntimeError):
    pass


def step(p: Params, s: VipState, ev: Event, now: float) -> Result:
    if s.state is S.STOPPED:
        return s, []
    s = observe(p, s, ev, now)
    handler = HANDLERS.get((s.state, type(ev)))
    new, actions = handler(p, s, ev, now) if handler else (s, [])
    if new.state is not s.state and new.state not in TRANSITIONS[s.state]:
        raise InvalidTransition(f"{s.state.value} -> {new.state.value} on {type(ev).__name__}")
    if new.sub not in SUBSTATES[new.state]:
        raise InvalidTransition(f"{new.state.value} has no sub-state {new.sub.value} ({type(ev).__name__})")
    if new.state is S.BACKUP and new.sub is Sub.IDLE:
        if new.holdoff_until and now >= new.holdoff_until:
            new, actions = evolve(new, holdoff_until=0.0), actions + [HoldOff(False)]
        new, more = _campaign_if_allowed(p, new, now)
        actions = actions + more
    return new, actions


def _campaign_if_allowed(p: Params, s: VipState, now: float) -> Result:
    """BACKUP/IDLE: campaign for an absent key, adopt our own key, or clear our stale one."""
    why = why_not_campaign(p, s, now)
    if why:
        return evolve(s, why_not=why), []
    if p.anycast:
        return acquire(p, s, now, "anycast: healthy with a live lease", 0)
    o = s.owner
    assert o is not None
    if o.node is None:
        return to(s, S.BACKUP, Sub.CAMPAIGNING, s.reason), [Campaign(s.lease)]
    if released_by_other(p, o):
        return to(s, S.BACKUP, Sub.TAKING_OVER, f"owner {o.node} handed it back"), [TakeOver(o, s.lease)]
    if may_take_over(p, s):
        return to(s, S.BACKUP, Sub.TAKING_OVER, f"owner {o.node} suspect"), [TakeOver(o, s.lease)]
    if o.lease == s.lease:  # our key on our live lease: serve it again
        return acquire(p, s, now, "adopted own key", o.epoch)
    return to(s, S.BACKUP, Sub.CLEARING, "own key on a dead lease"), [DeleteOwnerKey(o.epoch)]


# ---- handlers, by state ----------------------------------------------------------------------

def _start(p: Params, s: VipState, ev: Event, now: float) -> Result:
    return to(s, S.BACKUP, Sub.IDLE, "started", changed_at=now), [RemoveAddress()]


def _stop_idle(p: Params, s: VipState, ev: Event, now: float) -> Result:
    """INIT: its stale-copy removal may not have run yet: ensure absence on the way out."""
    return to(s, S.STOPPED, Sub.NONE, "shutdown"), [RemoveAddress()]


def _stop_backup(p: Params, s: VipState, ev: Event, now: float) -> Result:
    """A BACKUP holds no address (every path into it removed it first; a stray one the reconcile
    tick found is removed by the task before it takes this event): nothing to do in the kernel.
    Thousands of backups at a stop would otherwise each queue an address dump for nothing;
    `vipd cleanup` (ExecStopPost) and the next start remove any tagged leftover anyway."""
    return to(s, S.STOPPED, Sub.NONE, "shutdown"), []


def _backup_won(p: Params, s: VipState, ev: Event, now: float) -> Result:
    assert isinstance(ev, CampaignWon)
    o = ev.record
    taken = s.sub is Sub.TAKING_OVER
    s = evolve(s, owner=o)
    if not taken and s.sub is not Sub.CAMPAIGNING or o.lease != s.lease or not s.healthy \
            or now >= fence_deadline(p, s):
        # won, but can no longer serve it safely: hand the key straight back
        return to(s, S.BACKUP, Sub.CLEARING, "won, but the lease or health no longer allows serving"), \
            [DeleteOwnerKey(o.epoch)]
    if taken and ev.handed_back:  # its owner had removed its addresses before it marked the key
        return acquire(p, s, now, "took over a handed-back key", o.epoch, probe=False)
    if taken:  # the previous owner's kernel token ended before our transaction could win
        return acquire(p, s, now, "took over from a suspect owner", o.epoch, probe=False)
    return acquire(p, s, now, "campaign won", o.epoch)


def _backup_lost(p: Params, s: VipState, ev: Event, now: float) -> Result:
    assert isinstance(ev, CampaignLost)
    # a suspect owner spoke again, or the key moved on (not for a handed-back key: it moved on, to
    # its delete at a stop's revoke or to another candidate, and the watch tells where; a retry
    # wait there held the next candidate's campaign 0.2 s: bench/failover.py sigterm)
    suspect = s.sub is Sub.TAKING_OVER and not ev.handed_back
    retry = now + RETRY_CAMPAIGN if suspect else s.retry_at
    # the record our transaction saw, unless the watch told of a later one while it was out (the
    # winner named us successor meanwhile: kept, or its crash waits for its lease)
    o = ev.record if s.owner is None or ev.record.revision >= s.owner.revision else s.owner
    return to(s, S.BACKUP, Sub.IDLE, s.reason, owner=o, retry_at=retry), []


def _backup_campaign_failed(p: Params, s: VipState, ev: Event, now: float) -> Result:
    return to(s, S.BACKUP, Sub.IDLE, s.reason, retry_at=now + RETRY_CAMPAIGN), []


def _backup_key_done(p: Params, s: VipState, ev: Event, now: float) -> Result:
    if s.sub is not Sub.CLEARING:
        return s, []
    retry = now + RETRY_DELETE if isinstance(ev, ReleaseFailed) else 0.0
    return to(s, S.BACKUP, Sub.IDLE, s.reason, retry_at=retry), []


def _backup_lease_gone(p: Params, s: VipState, ev: Event, now: float) -> Result:
    assert isinstance(ev, LeaseGone)
    if ev.lease != s.lease:
        return s, []
    sub = Sub.IDLE if s.sub is Sub.CLEARING else s.sub  # our stale key went with the lease
    return to(s, S.BACKUP, sub, s.reason, lease=0, valid_until=0.0), []


def _present_stray(p: Params, s: VipState, ev: Event, now: float) -> Result:
    assert isinstance(ev, Reconcile)
    if ev.present and not stale(s, ev) and s.sub is not Sub.REMOVING:
        return evolve(s, changed_at=now), [RemoveAddress()]
    return s, []


def _holding_lease(p: Params, s: VipState, ev: Event, now: float) -> Result:
    assert isinstance(ev, LeaseValid)
    if ev.lease != s.lease:
        return fence(evolve(s, lease=ev.lease, valid_until=ev.valid_until), "lease replaced", now)
    if s.sub is Sub.DEFERRED:
        return claim(p, s, now)
    if s.state is S.OWNER:
        return s, [ArmFence(fence_deadline(p, s))]
    return s, []


def _holding_lease_gone(p: Params, s: VipState, ev: Event, now: float) -> Result:
    assert isinstance(ev, LeaseGone)
    if ev.lease != s.lease:
        return s, []
    return fence(evolve(s, lease=0, valid_until=0.0), "lease lost", now)


def _holding_owner(p: Params, s: VipState, ev: Event, now: float) -> Result:
    assert isinstance(ev, OwnerObserved)
    o = ev.record
    if p.anycast or o.revision <= s.epoch:
        return s, []  # anycast has no key; an observation older than our claim is stale
    if o.node != p.node or o.epoch != s.epoch:
        return fence(evolve(s, owner=o), f"owner key now {o.node or 'absent'}", now)
    return evolve(s, owner=o), []


def _probe_done(p: Params, s: VipState, ev: Event, now: float) -> Result:
    assert isinstance(ev, ProbeDone)
    if s.sub is not Sub.PROBING:
        return s, []
    if ev.conflict is not None:
        s = evolve(s, conflicts=s.conflicts + 1)
        return release(s, now, f"address conflict: {ev.conflict}", clean=False)
    return claim(p, evolve(s, probed=True), now)


def _added(p: Params, s: VipState, ev: Event, now: float) -> Result:
    if s.sub is not Sub.ADDING:
        return s, []
    # a snapshot taken before the add completed (after it was asked for) says nothing either
    s = to(s, S.OWNER, Sub.SERVING, "address added", conflicts=0, changed_at=now)
    return track_target(p, s, now), [Announce()]


def _add_failed(p: Params, s: VipState, ev: Event, now: float) -> Result:
    assert isinstance(ev, AddressFailed)
    return release(s, now, f"address failed: {ev.error}", clean=False)


def _deferred(p: Params, s: VipState, ev: Event, now: float) -> Result:
    if s.state is S.ACQUIRING and s.sub is Sub.ADDING:
        return to(s, S.ACQUIRING, Sub.DEFERRED, s.reason), [RenewLease()]
    return s, [RenewLease()]  # OWNER: a re-add found the lease nearly spent: renew, re-add on reconcile


def _holding_health(p: Params, s: VipState, ev: Event, now: float) -> Result:
    assert isinstance(ev, HealthChanged)
    if not ev.healthy:
        return release(s, now, f"unhealthy: {ev.reason}")
    return s, []


def _holding_release(p: Params, s: VipState, ev: Event, now: float) -> Result:
    assert isinstance(ev, ReleaseRequested)
    return release(s, now, ev.reason)


def _holding_shutdown(p: Params, s: VipState, ev: Event, now: float) -> Result:
    assert isinstance(ev, ShutdownRequested)
    return release(s, now, "shutdown", then=S.STOPPED, revoke=ev.revoke)


def _owner_preempt_granted(p: Params, s: VipState, ev: Event, now: float) -> Result:
    if s.sub is Sub.HANDING_OVER and s.preempt is not None:
        return release(s, now, f"handing over to preferred host {s.preempt.target}", preempt=True)
    return to(s, S.OWNER, Sub.SERVING, s.reason), [ReturnPreemptToken()]  # the target went away meanwhile


def _token_not_needed(p: Params, s: VipState, ev: Event, now: float) -> Result:
    if s.release is not None and s.release.preempt:
        return s, []  # RELEASING for a handover: the token returns when it ends
    return s, [ReturnPreemptToken()]


def _owner_reannounce(p: Params, s: VipState, ev: Event, now: float) -> Result:
    return s, [Announce()]


def _owner_reconcile(p: Params, s: VipState, ev: Event, now: float) -> Result:
    assert isinstance(ev, Reconcile)
    if not ev.missing or stale(s, ev):
        return s, []
    if lifetime(p, s, now) < 1:
        return s, []  # the last lifetime ran out just before the fence deadline: expected when etcd is silent
    return evolve(s, changed_at=now), [ClaimAddress(fence_deadline(p, s)), Announce()]


def _holding_tick(p: Params, s: VipState, ev: Event, now: float) -> Result:
    if now >= fence_deadline(p, s):
        return fence(s, "lease deadline passed", now)
    pre = s.preempt
    if (s.sub is Sub.SERVING and pre is not None and p.preempt_delay is not None
            and now >= pre.since + p.preempt_delay):
        return to(s, S.OWNER, Sub.HANDING_OVER, s.reason), [RequestPreempt(pre.target)]
    return s, []


def _removed(p: Params, s: VipState, ev: Event, now: float) -> Result:
    if s.sub is not Sub.REMOVING:
        return s, []
    if s.state is S.FENCED:
        return to(s, S.BACKUP, Sub.IDLE, s.reason), []
    if s.epoch == 0 or s.lease == 0:  # nothing left to give back in etcd
        return released(p, s, now, s.reason)
    return give_key_back(s)


def _remove_failed(p: Params, s: VipState, ev: Event, now: float) -> Result:
    return (evolve(s, retry_at=now + RETRY_REMOVE), []) if s.sub is Sub.REMOVING else (s, [])


def _retry_tick(p: Params, s: VipState, ev: Event, now: float) -> Result:
    if not s.retry_at or now < s.retry_at:
        return s, []
    if s.sub is Sub.REMOVING:
        return evolve(s, retry_at=0.0, changed_at=now), [RemoveAddress()]
    if s.sub is Sub.RETRY_DELETE:
        return give_key_back(evolve(s, retry_at=0.0))
    return s, []


def _releasing_key_released(p: Params, s: VipState, ev: Event, now: float) -> Result:
    return released(p, s, now, s.reason) if s.sub is Sub.DELETING else (s, [])


def _releasing_key_failed(p: Params, s: VipState, ev: Event, now: float) -> Result:
    assert isinstance(ev, ReleaseFailed)
    if s.sub is not Sub.DELETING:
        return s, []
    if s.release is not None and s.release.then is S.STOPPED:
        return released(p, s, now, f"{s.reason}; key left to its lease: {ev.error}")
    return to(s, S.RELEASING, Sub.RETRY_DELETE, s.reason, retry_at=now + RETRY_DELETE), []


def _releasing_lease_gone(p: Params, s: VipState, ev: Event, now: float) -> Result:
    assert isinstance(ev, LeaseGone)
    if ev.lease != s.lease:
        return s, []
    s = evolve(s, lease=0, valid_until=0.0)
    if s.sub in (Sub.DELETING, Sub.RETRY_DELETE):  # addresses gone; the key went with the lease
        return released(p, s, now, f"{s.reason}; key went with the lease")
    return s, []


def _releasing_shutdown(p: Params, s: VipState, ev: Event, now: float) -> Result:
    assert isinstance(ev, ShutdownRequested)
    rel = s.release or Release(s.reason)
    return evolve(s, release=replace(rel, then=S.STOPPED, revoke=ev.revoke)), []


def _fenced_shutdown(p: Params, s: VipState, ev: Event, now: float) -> Result:
    return to(s, S.STOPPED, Sub.NONE, "shutdown"), [RemoveAddress()]


def stale(s: VipState, ev: Reconcile) -> bool:
    """A kernel snapshot taken before our own last address change says nothing about it."""
    return bool(ev.taken_at) and ev.taken_at < s.changed_at


def _table() -> dict[tuple[State, type], Handler]:
    t: dict[tuple[State, type], Handler] = {
        (S.INIT, Start): _start,
        (S.INIT, ShutdownRequested): _stop_idle,
        (S.BACKUP, CampaignWon): _backup_won,
        (S.BACKUP, CampaignLost): _backup_lost,
        (S.BACKUP, CampaignFailed): _backup_campaign_failed,
        (S.BACKUP, KeyReleased): _backup_key_done,
        (S.BACKUP, ReleaseFailed): _backup_key_done,
        (S.BACKUP, LeaseGone): _backup_lease_gone,
        (S.BACKUP, Reconcile): _present_stray,
        (S.BACKUP, ShutdownRequested): _stop_backup,
        (S.BACKUP, PreemptGranted): _token_not_needed,
        (S.ACQUIRING, ProbeDone): _probe_done,
        (S.ACQUIRING, AddressAdded): _added,
        (S.ACQUIRING, ClaimDeferred): _deferred,
        (S.OWNER, ClaimDeferred): _deferred,
        (S.OWNER, PreemptGranted): _owner_preempt_granted,
        (S.OWNER, LinkUp): _owner_reannounce,
        (S.OWNER, EtcdRestored): _owner_reannounce,
        (S.OWNER, Reconcile): _owner_reconcile,
        (S.RELEASING, AddressRemoved): _removed,
        (S.RELEASING, RemoveFailed): _remove_failed,
        (S.RELEASING, KeyReleased): _releasing_key_released,
        (S.RELEASING, ReleaseFailed): _releasing_key_failed,
        (S.RELEASING, LeaseGone): _releasing_lease_gone,
        (S.RELEASING, ShutdownRequested): _releasing_shutdown,
        (S.RELEASING, Tick): _retry_tick,
        (S.RELEASING, PreemptGranted): _token_not_needed,
        (S.FENCED, AddressRemoved): _removed,
        (S.FENCED, RemoveFailed): _remove_failed,
        (S.FENCED, Tick): _retry_tick,
        (S.FENCED, Reconcile): _present_stray,
        (S.FENCED, ShutdownRequested): _fenced_shutdown,
        (S.FENCED, PreemptGranted): _token_not_needed,
        (S.ACQUIRING, PreemptGranted): _token_not_needed,
    }
    for st in HOLDING:
        t[(st, LeaseValid)] = _holding_lease
        t[(st, LeaseGone)] = _holding_lease_gone
        t[(st, OwnerObserved)] = _holding_owner
        t[(st, AddressFailed)] = _add_failed
        t[(st, HealthChanged)] = _holding_health
        t[(st, ReleaseRequested)] = _holding_release
        t[(st, ShutdownRequested)] = _holding_shutdown
        t[(st, Tick)] = _holding_tick
    return t


HANDLERS = _table()

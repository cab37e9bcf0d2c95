"""The ownership state machine: every transition, and the fencing arithmetic, on a fake clock."""

from __future__ import annotations

from dataclasses import replace

import pytest

from vipd.model import (HealthChanged, Placement, PreemptGranted,  # noqa: I001
                        AddressAdded, AddressFailed, AddressRemoved, Announce, Campaign, CampaignFailed,
                        CampaignLost, CampaignWon, ClaimAddress, DeleteOwnerKey, EtcdRestored, KeyReleased,
                        LeaseGone, LeaseValid, LinkUp, OwnerObserved, OwnerRecord, Reconcile, ReleaseFailed,
                        ReleaseRequested, RemoveAddress, RemoveFailed, ShutdownRequested, Start, State,
                        StopAnnouncing, Tick)
from vipd.ownership import fsm
from vipd.ownership.fsm import InvalidTransition, Params, VipState, step

P = Params(node="h1", fence_margin=0.5, release_holdoff=3.0)
LEASE = 7
ABSENT = OwnerRecord(None, revision=10)
MINE = OwnerRecord("h1", epoch=11, lease=LEASE, revision=11)
OTHER = OwnerRecord("h2", epoch=12, lease=99, revision=12)


def run(s: VipState, *events, now: float = 100.0):
    actions = []
    for ev in events:
        s, acts = step(P, s, ev, now)
        actions.extend(acts)
    return s, actions


def backup(valid_until: float = 102.0, owner: OwnerRecord | None = ABSENT, **kw) -> VipState:
    return VipState(state=State.BACKUP, lease=LEASE, valid_until=valid_until, owner=owner, **kw)


def owner(valid_until: float = 102.0) -> VipState:
    return VipState(state=State.OWNER, lease=LEASE, valid_until=valid_until, owner=MINE, epoch=11)


def test_start_goes_backup_and_ensures_absence():
    s, acts = run(VipState(), Start())
    assert s.state is State.BACKUP
    assert acts == [RemoveAddress()]


def test_no_campaign_before_owner_key_is_observed():
    s, acts = run(VipState(state=State.BACKUP), LeaseValid(LEASE, 102.0))
    assert acts == [] and s.state is State.BACKUP


def test_no_campaign_without_lease():
    s, acts = run(VipState(state=State.BACKUP), OwnerObserved(ABSENT))
    assert acts == []


def test_campaign_when_key_absent_and_lease_fresh():
    s, acts = run(VipState(state=State.BACKUP), OwnerObserved(ABSENT), LeaseValid(LEASE, 102.0))
    assert acts == [Campaign(LEASE)]
    assert s.pending
    # a second trigger while the campaign is in flight does not campaign twice
    s, acts = run(s, Tick(), LeaseValid(LEASE, 102.5))
    assert acts == []


def test_no_campaign_when_lease_too_old_to_hold_address_one_second():
    # deadline = 101.4 - 0.5 = 100.9: less than 1 s of lifetime left at t=100
    s, acts = run(backup(valid_until=101.4), Tick())
    assert acts == []


def test_campaign_won_adds_address_with_lifetime_inside_the_lease():
    s, acts = run(backup(pending=True), CampaignWon(MINE), now=100.3)
    assert s.state is State.ACQUIRING and s.epoch == 11
    # lease can expire at 102.0; margin 0.5 -> fence at 101.5; at 100.3 -> floor(1.2) = 1
    assert acts == [ClaimAddress(1)]


def test_address_added_makes_owner_and_announces():
    s, acts = run(replace(backup(), state=State.ACQUIRING, epoch=11, owner=MINE), AddressAdded())
    assert s.state is State.OWNER and acts == [Announce()]


def test_campaign_won_on_a_stale_lease_hands_key_back_without_adding():
    s, acts = run(backup(valid_until=101.0, pending=True), CampaignWon(MINE))
    assert s.state is State.BACKUP
    assert acts == [DeleteOwnerKey(11)]


def test_campaign_won_on_replaced_lease_hands_key_back():
    rec = replace(MINE, lease=LEASE - 1)
    s, acts = run(backup(pending=True), CampaignWon(rec))
    assert s.state is State.BACKUP and acts == [DeleteOwnerKey(11)]


def test_campaign_lost_records_owner_and_waits():
    s, acts = run(backup(pending=True), CampaignLost(OTHER))
    assert s.state is State.BACKUP and not s.pending and s.owner == OTHER and acts == []


def test_campaign_failed_retries_on_tick():
    s, acts = run(backup(pending=True), CampaignFailed("etcd down"))
    assert acts == [] and not s.pending
    s, acts = run(s, Tick())
    assert acts == [Campaign(LEASE)]


def test_keepalive_refresh_is_phase_aligned_to_lose_no_lifetime():
    # fence deadline 102.5 at t=100.6: floor(1.9) = 1 s. Refreshing now would expire at 101.6;
    # refreshing at 102.5 - 1 - slack = 101.45 expires at 102.45, just inside the deadline.
    s, acts = run(owner(), LeaseValid(LEASE, 103.0), now=100.6)
    assert acts == [] and s.valid_until == 103.0
    assert s.refresh_at == pytest.approx(102.5 - 1 - fsm.REFRESH_SLACK)
    assert fsm.wakeup(P, s, 100.6) == s.refresh_at
    s2, acts = run(s, Tick(), now=101.0)  # not yet
    assert acts == [] and s2.refresh_at == s.refresh_at
    s3, acts = run(s, Tick(), now=s.refresh_at + 0.001)
    assert acts == [ClaimAddress(1)] and s3.refresh_at == 0.0
    # the kernel expiry (refresh instant + lifetime) never passes the fence deadline
    assert s.refresh_at + 0.001 + 1 <= fsm.fence_deadline(P, s)


def test_keepalive_refresh_right_away_when_already_in_phase():
    s, acts = run(owner(), LeaseValid(LEASE, 105.0), now=100.46)  # deadline 104.5: 4.04 s left -> 4
    assert acts == [ClaimAddress(4)] and s.refresh_at == 0.0


def test_refresh_plan_never_exceeds_the_deadline():
    for i in range(200):
        now = 100 + i * 0.013
        s = replace(owner(), valid_until=now + 3.0 - (i % 7) * 0.01)
        at, life = fsm.refresh_plan(P, s, now)
        assert at >= now and (life == 0 or at + life <= fsm.fence_deadline(P, s))
        assert life >= 1 and fsm.fence_deadline(P, s) - (at + life) <= fsm.REFRESH_SLACK + 1e-9


@pytest.mark.parametrize("now,fenced", [(101.49, False), (101.5, True), (103.0, True)])
def test_deadline_fences_exactly_margin_before_lease_expiry(now, fenced):
    s, acts = run(owner(valid_until=102.0), Tick(), now=now)
    assert (s.state is State.FENCED) is fenced
    assert acts == ([StopAnnouncing(), RemoveAddress()] if fenced else [])


def test_wakeup_is_the_fence_deadline_while_holding():
    assert fsm.wakeup(P, owner(valid_until=102.0), 100.0) == 101.5
    assert fsm.wakeup(P, backup(), 100.0) is None
    assert fsm.wakeup(P, backup(holdoff_until=103.0), 100.0) == 103.0


def test_lease_gone_fences_without_etcd():
    s, acts = run(owner(), LeaseGone(LEASE))
    assert s.state is State.FENCED and s.lease == 0
    assert acts == [StopAnnouncing(), RemoveAddress()]
    assert not any(isinstance(a, (DeleteOwnerKey, Campaign)) for a in acts)


def test_lease_gone_for_another_lease_is_ignored():
    s, acts = run(owner(), LeaseGone(LEASE + 1))
    assert s.state is State.OWNER and acts == []


def test_new_lease_while_holding_fences():
    s, acts = run(owner(), LeaseValid(LEASE + 1, 103.0))
    assert s.state is State.FENCED


def test_owner_key_taken_or_deleted_fences():
    s, _ = run(owner(), OwnerObserved(replace(OTHER, revision=20)))
    assert s.state is State.FENCED
    s, _ = run(owner(), OwnerObserved(OwnerRecord(None, revision=20)))
    assert s.state is State.FENCED


def test_stale_watch_event_older_than_our_claim_is_ignored():
    s, acts = run(owner(), OwnerObserved(OwnerRecord(None, revision=9)))
    assert s.state is State.OWNER and acts == []


def test_fenced_returns_to_backup_once_address_removed():
    s, _ = run(owner(), LeaseGone(LEASE))
    s, acts = run(s, AddressRemoved())
    assert s.state is State.BACKUP and acts == []


def test_fenced_retries_removal_on_tick():
    s, _ = run(owner(), LeaseGone(LEASE), RemoveFailed("EBUSY"))
    assert s.state is State.FENCED
    s, acts = run(s, Tick())
    assert acts == [RemoveAddress()]


def test_backup_adopts_own_key_on_live_lease():
    s, acts = run(backup(owner=MINE), Tick())
    assert s.state is State.ACQUIRING and s.epoch == 11 and acts == [ClaimAddress(1)]


def test_backup_deletes_own_key_on_a_dead_lease():
    stale = replace(MINE, lease=LEASE - 1)
    s, acts = run(backup(owner=stale), Tick())
    assert s.state is State.BACKUP and acts == [DeleteOwnerKey(11)]


def test_voluntary_release_removes_address_before_deleting_key():
    s, acts = run(owner(), ReleaseRequested("operator"))
    assert s.state is State.RELEASING and acts == [StopAnnouncing(), RemoveAddress()]
    s, acts = run(s, AddressRemoved())
    assert acts == [DeleteOwnerKey(11, clean=True)]
    s, acts = run(s, KeyReleased(), now=100.0)
    assert s.state is State.BACKUP and s.holdoff_until == 103.0
    # no campaign during hold-off, even with the key absent
    s, acts = run(s, OwnerObserved(OwnerRecord(None, revision=30)), now=101.0)
    assert acts == []
    s, acts = run(s, Tick(), now=103.0)
    assert s.state is State.BACKUP
    s, acts = run(replace(s, valid_until=105.0), Tick(), now=103.0)
    assert acts == [Campaign(LEASE)]


def test_release_never_deletes_key_while_address_may_remain():
    s, _ = run(owner(), ReleaseRequested())
    s, acts = run(s, RemoveFailed("EIO"), Tick())
    assert acts == [RemoveAddress()]
    assert s.state is State.RELEASING and not s.removed


def test_release_retries_key_delete_on_tick():
    s, _ = run(owner(), ReleaseRequested(), AddressRemoved(), ReleaseFailed("etcd down"))
    assert s.state is State.RELEASING and not s.pending
    s, acts = run(s, Tick())
    assert acts == [DeleteOwnerKey(11, clean=True)]


def test_shutdown_of_owner_releases_then_stops():
    s, acts = run(owner(), ShutdownRequested())
    assert s.state is State.RELEASING and s.stopping and acts == [StopAnnouncing(), RemoveAddress()]
    s, acts = run(s, AddressRemoved())
    assert acts == [DeleteOwnerKey(11, clean=True)]
    s, acts = run(s, KeyReleased())
    assert s.state is State.STOPPED


def test_shutdown_stops_even_if_key_delete_fails():
    s, _ = run(owner(), ShutdownRequested(), AddressRemoved(), ReleaseFailed("etcd down"))
    assert s.state is State.STOPPED


def test_shutdown_of_backup_stops_and_ensures_absence():
    s, acts = run(backup(), ShutdownRequested())
    assert s.state is State.STOPPED and acts == [RemoveAddress()]
    s, acts = run(s, OwnerObserved(ABSENT), Tick(), LeaseValid(LEASE, 200.0))
    assert s.state is State.STOPPED and acts == []


def test_address_failure_while_acquiring_gives_the_key_back():
    s, acts = run(replace(owner(), state=State.ACQUIRING), AddressFailed("ENODEV"))
    assert s.state is State.RELEASING and acts == [StopAnnouncing(), RemoveAddress()]


def test_reconcile_restores_missing_address_and_removes_stray_one():
    s, acts = run(owner(), Reconcile(missing=True, present=False))
    assert acts == [ClaimAddress(1), Announce()]
    s, acts = run(owner(), Reconcile(missing=True, present=True))  # one address of a group gone
    assert acts == [ClaimAddress(1), Announce()]
    s, acts = run(backup(owner=OTHER), Reconcile(missing=True, present=True))
    assert acts == [RemoveAddress()]
    s, acts = run(owner(), Reconcile(missing=False, present=True))
    assert acts == []
    s, acts = run(backup(owner=OTHER), Reconcile(missing=True, present=False))
    assert acts == []


def test_link_up_and_etcd_restored_reannounce_only_when_owner():
    assert run(owner(), LinkUp())[1] == [Announce()]
    assert run(owner(), EtcdRestored())[1] == [Announce()]
    assert run(backup(owner=OTHER), LinkUp())[1] == []


def test_transition_table_is_enforced(monkeypatch):
    # a step the table does not allow raises, whatever the event logic wants
    monkeypatch.setitem(fsm.TRANSITIONS, State.FENCED, frozenset({State.STOPPED}))
    fenced = replace(owner(), state=State.FENCED)
    with pytest.raises(InvalidTransition, match="fenced -> backup on AddressRemoved"):
        step(P, fenced, AddressRemoved(), 100.0)


def test_every_reachable_transition_is_in_the_table():
    """Drive the machine with every event from every state: no step may leave the table."""
    events = [Start(), LeaseValid(LEASE, 102.0), LeaseValid(LEASE + 1, 102.0), LeaseGone(LEASE),
              OwnerObserved(ABSENT), OwnerObserved(MINE), OwnerObserved(replace(OTHER, revision=40)),
              CampaignWon(MINE), CampaignLost(OTHER), CampaignFailed("x"), AddressAdded(), AddressFailed("x"),
              AddressRemoved(), RemoveFailed("x"), KeyReleased(), ReleaseFailed("x"), ReleaseRequested(),
              ShutdownRequested(), LinkUp(), EtcdRestored(), Reconcile(False, True), Reconcile(True, False), Tick(),
              HealthChanged(False), HealthChanged(True), Placement(("h2", "h1")), Placement(()),
              PreemptGranted(), AddressFailed("x", conflict=True)]
    seen = set()
    for st in State:
        for base in (owner(), backup(), backup(owner=MINE), replace(owner(), stopping=True, removed=True)):
            s0 = replace(base, state=st)
            for ev in events:
                for now in (100.0, 101.6):
                    s1, _ = step(P, s0, ev, now)  # raises InvalidTransition on a violation
                    seen.add((st, s1.state))
    moved = {(a, b) for a, b in seen if a is not b}
    allowed = {(a, b) for a, bs in fsm.TRANSITIONS.items() for b in bs}
    assert moved <= allowed
    assert moved == allowed, f"table entries never exercised: {allowed - moved}"


# ---- health, placement, preemption --------------------------------------------------------------

from vipd.model import RequestPreempt  # noqa: E402

PP = Params(node="h1", fence_margin=0.5, release_holdoff=3.0, preempt_delay=5.0, campaign_stagger=0.2)


def prun(s, *events, now=100.0):
    actions = []
    for ev in events:
        s, acts = step(PP, s, ev, now)
        actions.extend(acts)
    return s, actions


def test_unhealthy_backup_does_not_campaign_until_healthy():
    s, acts = prun(VipState(state=State.BACKUP, healthy=False), OwnerObserved(ABSENT), LeaseValid(LEASE, 102.0))
    assert acts == []
    s, acts = prun(s, HealthChanged(True))
    assert acts == [Campaign(LEASE)]


def test_unhealthy_owner_releases_address_first():
    s, acts = prun(owner(), HealthChanged(False, "check api failed"))
    assert s.state is State.RELEASING and acts == [StopAnnouncing(), RemoveAddress()]
    assert "unhealthy" in s.reason
    s, acts = prun(s, AddressRemoved())
    assert acts == [DeleteOwnerKey(11, clean=True)]


def test_campaign_is_staggered_by_ranking_so_the_preferred_host_wins():
    base = backup(valid_until=105.0, owner=OTHER)
    # h1 is second in the ranking: it waits one stagger after the key disappears
    s, acts = prun(base, Placement(("h3", "h1", "h2")), OwnerObserved(OwnerRecord(None, revision=50)), now=100.0)
    assert acts == [] and fsm.wakeup(PP, s, 100.0) == pytest.approx(100.2)
    s2, acts = prun(s, Tick(), now=100.2)
    assert acts == [Campaign(LEASE)]
    # the host that just let go does not count: if h3 held it, h1 is first
    base3 = backup(valid_until=105.0, owner=replace(OTHER, node="h3"))
    s, acts = prun(base3, Placement(("h3", "h1", "h2")), OwnerObserved(OwnerRecord(None, revision=50)), now=100.0)
    assert acts == [Campaign(LEASE)]


def test_not_a_candidate_never_campaigns():
    s, acts = prun(backup(valid_until=105.0), Placement(("h2", "h3")), Tick(), now=100.0)
    assert acts == [] and fsm.wakeup(PP, s, 100.0) is None


def test_preemption_after_hold_down_then_one_token_at_a_time():
    s, _ = prun(owner(valid_until=200.0), Placement(("h2", "h1")), now=100.0)
    assert s.preempt_target == "h2" and fsm.wakeup(PP, s, 100.0) == pytest.approx(min(105.0, 199.5))
    s, acts = prun(s, Tick(), now=104.9)
    assert acts == []
    s, acts = prun(s, Tick(), now=105.0)
    assert acts == [RequestPreempt("h2")]
    s, acts = prun(s, Tick(), now=106.0)
    assert acts == []  # asked once
    s, acts = prun(s, PreemptGranted(), now=106.0)
    assert s.state is State.RELEASING and acts == [StopAnnouncing(), RemoveAddress()]


def test_flapping_target_restarts_the_hold_down():
    s, _ = prun(owner(valid_until=200.0), Placement(("h2", "h1")), now=100.0)
    s, _ = prun(s, Placement(("h1",)), now=103.0)  # h2 gone: we are the target again
    assert s.preempt_target is None
    s, _ = prun(s, Placement(("h2", "h1")), now=104.0)
    s, acts = prun(s, Tick(), now=106.0)
    assert acts == [] and s.preempt_since == 104.0
    s, acts = prun(s, Tick(), now=109.0)
    assert acts == [RequestPreempt("h2")]


def test_preemption_disabled_never_asks():
    s, _ = step(P, owner(valid_until=200.0), Placement(("h2", "h1")), 100.0)
    s, acts = step(P, s, Tick(), 150.0)
    assert acts == [] and s.preempt_target is None


def test_grant_that_arrives_too_late_is_not_used():
    s, _ = prun(owner(valid_until=200.0), Placement(("h2", "h1")), now=100.0)
    s, _ = prun(s, Tick(), now=105.0)
    s, _ = prun(s, Placement(("h1", "h2")), now=105.1)  # we are preferred again
    s, acts = prun(s, PreemptGranted(), now=105.2)
    assert s.state is State.OWNER and acts == [] and not s.preempt_asked


def test_conflicts_back_off_the_next_campaign():
    acq = replace(owner(), state=State.ACQUIRING)
    s, _ = prun(acq, AddressFailed("02:00:00:00:00:99 answers", conflict=True), AddressRemoved(), KeyReleased(),
                now=100.0)
    assert s.state is State.BACKUP and s.holdoff_until == 103.0 and s.conflicts == 1
    s2 = replace(s, state=State.ACQUIRING)
    s2, _ = prun(s2, AddressFailed("again", conflict=True), AddressRemoved(), KeyReleased(), now=110.0)
    assert s2.conflicts == 2 and s2.holdoff_until == 116.0
    s3, _ = prun(replace(s2, state=State.ACQUIRING), AddressAdded(), now=120.0)
    assert s3.conflicts == 0


def test_claims_carry_the_fence_deadline_for_finer_timers():
    s, acts = run(backup(pending=True), CampaignWon(MINE), now=100.3)
    assert acts[0].until == fsm.fence_deadline(P, s) == 101.5


AP = Params(node="h1", fence_margin=0.5, release_holdoff=3.0, anycast=True)


def test_anycast_holds_without_election_while_fit():
    s, acts = step(AP, VipState(state=State.BACKUP), LeaseValid(LEASE, 102.0), 100.0)
    assert s.state is State.ACQUIRING and acts == [ClaimAddress(1)]
    assert not any(isinstance(a, Campaign) for a in acts)
    s, acts = step(AP, s, AddressAdded(), 100.0)
    assert s.state is State.OWNER
    # the owner key of anyone else means nothing to an anycast unit
    s, acts = step(AP, s, OwnerObserved(replace(OTHER, revision=50)), 100.0)
    assert s.state is State.OWNER and acts == []
    # unfit: released without touching etcd
    s, acts = step(AP, s, HealthChanged(False, "down"), 100.0)
    s, acts = step(AP, s, AddressRemoved(), 100.0)
    assert s.state is State.BACKUP and acts == []
    # lease lost: fenced like any owner
    s2, _ = step(AP, replace(owner(), epoch=0), LeaseGone(LEASE), 100.0)
    assert s2.state is State.FENCED


def test_address_failure_hands_back_without_the_clean_mark():
    s, _ = run(replace(owner(), state=State.ACQUIRING), AddressFailed("in use by 02:00:00:00:00:99", conflict=True))
    s, acts = run(s, AddressRemoved())
    assert acts == [DeleteOwnerKey(11, clean=False)]


def test_backup_remembers_whether_the_last_owner_handed_back_cleanly():
    marked = replace(OTHER, released=True, revision=60)
    s, _ = run(backup(owner=OTHER), OwnerObserved(marked), OwnerObserved(OwnerRecord(None, revision=61)))
    assert s.last_owner == "h2" and s.last_clean
    s, _ = run(backup(owner=OTHER), OwnerObserved(OwnerRecord(None, revision=61)))
    assert s.last_owner == "h2" and not s.last_clean


def test_deferred_claim_waits_for_the_next_keepalive():
    from vipd.model import ClaimDeferred
    acq = replace(owner(), state=State.ACQUIRING)
    s, acts = run(acq, ClaimDeferred())
    assert s.state is State.ACQUIRING and acts == []
    s, acts = run(s, LeaseValid(LEASE, 103.0), now=100.2)
    assert acts == [ClaimAddress(2)]
    s, acts = run(acq, Tick(), now=101.6)  # no keepalive came: the deadline fences
    assert s.state is State.FENCED


def test_lone_host_reclaims_after_its_own_release_and_holdoff():
    s, _ = prun(owner(valid_until=200.0), Placement(("h1",)), now=100.0)
    s, _ = prun(s, ReleaseRequested(), AddressRemoved(), KeyReleased(), now=100.0)
    s, acts = prun(s, OwnerObserved(OwnerRecord(None, revision=70)), now=100.1)
    assert acts == [] and s.last_owner == "h1"
    s, acts = prun(s, Tick(), now=103.0)  # hold-off over; nobody else is a candidate
    assert acts == [Campaign(LEASE)]


def test_refreshes_are_marked_as_such():
    s, acts = run(owner(), LeaseValid(LEASE, 105.0), now=100.46)
    assert acts[0].refresh
    s, acts = run(backup(pending=True), CampaignWon(MINE), now=100.3)
    assert not acts[0].refresh

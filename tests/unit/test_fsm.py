"""The ownership core: take, hold, fence, release, on a fake clock (pure: no I/O anywhere)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.unit.fsm_helpers import (ABSENT, LEASE, MINE, OTHER, P, PC, acquiring, backup, campaigning, owner,
                                    run)
from vipd.model import (AddressAdded, AddressFailed, AddressRemoved, Announce, ArmFence, Campaign, CampaignFailed,
                        CampaignLost, CampaignWon, ClaimAddress, ClaimDeferred, DeleteOwnerKey, EtcdRestored,
                        HoldOff, KeyReleased, LeaseGone, LeaseValid, LinkUp, OwnerObserved, OwnerRecord,
                        ProbeConflicts, ProbeDone, Reconcile, ReleaseFailed, ReleaseRequested, RemoveAddress,
                        RemoveFailed, RenewLease, ShutdownRequested, Start, State, StopAnnouncing, Tick)
from vipd.ownership import state as st
from vipd.ownership.state import Sub, VipState


def test_start_goes_backup_and_ensures_absence():
    s, acts = run(VipState(), Start())
    assert (s.state, s.sub) == (State.BACKUP, Sub.IDLE)
    assert acts == [RemoveAddress()]


def test_no_campaign_before_owner_key_is_observed():
    s, acts = run(backup(owner=None), LeaseValid(LEASE, 102.0))
    assert acts == [] and s.why_not == "owner key not read yet"


def test_no_campaign_without_lease():
    s, acts = run(VipState(state=State.BACKUP, sub=Sub.IDLE), OwnerObserved(ABSENT))
    assert acts == [] and s.why_not == "no lease"


def test_campaign_when_key_absent_and_lease_fresh():
    s, acts = run(backup(owner=None), OwnerObserved(ABSENT), LeaseValid(LEASE, 102.0))
    assert acts == [Campaign(LEASE)] and s.sub is Sub.CAMPAIGNING
    # a second trigger while the campaign is in flight does not campaign twice
    s, acts = run(s, Tick(), LeaseValid(LEASE, 102.5))
    assert acts == []


def test_campaign_even_with_less_than_a_second_of_lifetime_left():
    # deadline = 101.4 - 0.5 = 100.9: the claim will ask for a renewal instead of waiting a keepalive
    s, acts = run(backup(valid_until=101.4), Tick())
    assert acts == [Campaign(LEASE)]


def test_no_campaign_once_the_fence_deadline_passed():
    s, acts = run(backup(valid_until=100.4), Tick())
    assert acts == [] and s.why_not == "lease not proven"


def test_campaign_won_adds_address_and_arms_until_the_fence_deadline():
    s, acts = run(campaigning(), CampaignWon(MINE), now=100.3)
    assert (s.state, s.sub, s.epoch) == (State.ACQUIRING, Sub.ADDING, 11)
    assert acts == [ClaimAddress()] and acts[0].until == st.fence_deadline(P, s) == 101.5


def test_address_added_makes_owner_and_announces():
    s, acts = run(acquiring(), AddressAdded())
    assert (s.state, s.sub) == (State.OWNER, Sub.SERVING) and acts == [Announce()]


def test_campaign_won_on_a_stale_lease_hands_key_back_without_adding():
    s, acts = run(campaigning(valid_until=100.4), CampaignWon(MINE))
    assert (s.state, s.sub) == (State.BACKUP, Sub.CLEARING) and acts == [DeleteOwnerKey(11)]
    s, acts = run(s, KeyReleased())
    assert s.sub is Sub.IDLE


def test_campaign_won_on_replaced_lease_hands_key_back():
    s, acts = run(campaigning(), CampaignWon(replace(MINE, lease=LEASE - 1)))
    assert s.state is State.BACKUP and acts == [DeleteOwnerKey(11)]


def test_campaign_lost_records_owner_and_waits():
    s, acts = run(campaigning(), CampaignLost(OTHER))
    assert (s.sub, s.owner, acts) == (Sub.IDLE, OTHER, [])
    assert s.why_not == "owned by h2"


def test_campaign_failed_retries_after_a_pause():
    s, acts = run(campaigning(), CampaignFailed("etcd down"))
    assert acts == [] and s.sub is Sub.IDLE
    assert st.wakeup(P, s, 100.0) == pytest.approx(100.0 + st.RETRY_CAMPAIGN)
    s, acts = run(s, Tick(), now=100.0 + st.RETRY_CAMPAIGN)
    assert acts == [Campaign(LEASE)]


def test_keepalive_arms_every_fence_to_the_new_deadline():
    s, acts = run(owner(), LeaseValid(LEASE, 103.0), now=100.6)
    assert acts == [ArmFence()] and acts[0].until == 102.5 and s.valid_until == 103.0


@pytest.mark.parametrize("now,fenced", [(101.49, False), (101.5, True), (103.0, True)])
def test_deadline_fences_exactly_margin_before_lease_expiry(now, fenced):
    s, acts = run(owner(valid_until=102.0), Tick(), now=now)
    assert (s.state is State.FENCED) is fenced
    assert acts == ([StopAnnouncing(), RemoveAddress()] if fenced else [])


def test_wakeup_is_the_fence_deadline_while_holding():
    assert st.wakeup(P, owner(valid_until=102.0), 100.0) == 101.5
    assert st.wakeup(P, backup(owner=OTHER), 100.0) is None
    assert st.wakeup(P, backup(owner=OTHER, holdoff_until=103.0), 100.0) == 103.0


def test_lease_gone_fences_without_etcd():
    s, acts = run(owner(), LeaseGone(LEASE))
    assert s.state is State.FENCED and s.lease == 0
    assert acts == [StopAnnouncing(), RemoveAddress()]


def test_lease_gone_for_another_lease_is_ignored():
    s, acts = run(owner(), LeaseGone(LEASE + 1))
    assert s.state is State.OWNER and acts == []


def test_new_lease_while_holding_fences():
    s, _ = run(owner(), LeaseValid(LEASE + 1, 103.0))
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
    assert (s.state, s.sub) == (State.BACKUP, Sub.IDLE) and acts == []


def test_fenced_retries_removal_at_its_retry_time():
    s, _ = run(owner(), LeaseGone(LEASE), RemoveFailed("EBUSY"))
    assert s.state is State.FENCED and st.wakeup(P, s, 100.0) == pytest.approx(100.0 + st.RETRY_REMOVE)
    s, acts = run(s, Tick(), now=100.0 + st.RETRY_REMOVE)
    assert acts == [RemoveAddress()]


def test_backup_adopts_own_key_on_live_lease():
    s, acts = run(backup(owner=MINE), Tick())
    assert s.state is State.ACQUIRING and s.epoch == 11 and acts == [ClaimAddress()]


def test_backup_deletes_own_key_on_a_dead_lease():
    s, acts = run(backup(owner=replace(MINE, lease=LEASE - 1)), Tick())
    assert (s.state, s.sub) == (State.BACKUP, Sub.CLEARING) and acts == [DeleteOwnerKey(11)]


def test_voluntary_release_removes_address_before_deleting_key():
    s, acts = run(owner(), ReleaseRequested("operator"))
    assert (s.state, s.sub) == (State.RELEASING, Sub.REMOVING) and acts == [StopAnnouncing(), RemoveAddress()]
    s, acts = run(s, AddressRemoved())
    assert s.sub is Sub.DELETING and acts == [DeleteOwnerKey(11, lease=LEASE)]
    s, acts = run(s, KeyReleased(), now=100.0)
    assert s.state is State.BACKUP and s.holdoff_until == 103.0 and acts == [HoldOff(True)]
    s, acts = run(s, OwnerObserved(OwnerRecord(None, revision=30)), now=101.0)
    assert acts == [] and s.why_not == "release hold-off"
    s, acts = run(replace(s, valid_until=105.0), Tick(), now=103.0)
    assert acts == [HoldOff(False), Campaign(LEASE)]


def test_release_never_deletes_key_while_address_may_remain():
    s, _ = run(owner(), ReleaseRequested())
    s, acts = run(s, RemoveFailed("EIO"), Tick())
    assert acts == []
    s, acts = run(s, Tick(), now=100.0 + st.RETRY_REMOVE)
    assert acts == [RemoveAddress()]
    assert s.state is State.RELEASING and s.sub is Sub.REMOVING


def test_release_retries_the_key_delete_after_an_etcd_blip():
    """The liveness bug of the old core: a failed delete while not stopping stayed RELEASING for
    good (its wakeup was None), the key alive on the host lease, the VIP unserved."""
    s, _ = run(owner(), ReleaseRequested(), AddressRemoved(), ReleaseFailed("etcd down"))
    assert (s.state, s.sub) == (State.RELEASING, Sub.RETRY_DELETE)
    at = st.wakeup(P, s, 100.0)
    assert at == pytest.approx(100.0 + st.RETRY_DELETE)
    s, acts = run(s, Tick(), now=at)
    assert s.sub is Sub.DELETING and acts == [DeleteOwnerKey(11, lease=LEASE)]
    s, acts = run(s, KeyReleased(), now=at)
    assert s.state is State.BACKUP


def test_release_ends_when_the_lease_goes_while_the_key_delete_fails():
    s, _ = run(owner(), ReleaseRequested(), AddressRemoved(), ReleaseFailed("etcd down"))
    s, acts = run(s, LeaseGone(LEASE))
    assert s.state is State.BACKUP


def test_shutdown_of_owner_releases_then_stops():
    s, acts = run(owner(), ShutdownRequested())
    assert s.state is State.RELEASING and s.release.then is State.STOPPED
    s, acts = run(s, AddressRemoved())
    assert acts == [DeleteOwnerKey(11, lease=LEASE)]
    s, acts = run(s, KeyReleased())
    assert s.state is State.STOPPED and acts == []


def test_a_daemon_stop_that_revokes_the_lease_only_marks_the_key():
    """ShutdownRequested(revoke=True): the address goes first, then the key is marked released and
    left to the revoke (one request deletes every key); a reload's stop (revoke=False) deletes it;
    a stop that reaches a unit already releasing for another reason marks it the same way; an
    unclean hand-back (address failure) is deleted unmarked, revoke or not."""
    s, acts = run(owner(), ShutdownRequested(revoke=True))
    assert acts == [StopAnnouncing(), RemoveAddress()]
    s, acts = run(s, AddressRemoved())
    assert acts == [DeleteOwnerKey(11, lease=LEASE, leave=True)]
    s, acts = run(s, KeyReleased())
    assert s.state is State.STOPPED and acts == []
    s, acts = run(owner(), ShutdownRequested(revoke=False), AddressRemoved())
    assert acts[-1:] == [DeleteOwnerKey(11, lease=LEASE)]
    s, acts = run(owner(), ReleaseRequested("operator"), ShutdownRequested(revoke=True), AddressRemoved())
    assert acts[-1:] == [DeleteOwnerKey(11, lease=LEASE, leave=True)]
    s, acts = run(owner(), AddressFailed("EIO"), ShutdownRequested(revoke=True), AddressRemoved())
    assert acts[-1:] == [DeleteOwnerKey(11, lease=0, leave=False)]


def test_shutdown_stops_even_if_key_delete_fails():
    s, _ = run(owner(), ShutdownRequested(), AddressRemoved(), ReleaseFailed("etcd down"))
    assert s.state is State.STOPPED


def test_shutdown_of_backup_stops_without_touching_the_kernel():
    s, acts = run(backup(), ShutdownRequested())
    assert s.state is State.STOPPED and acts == []
    s, acts = run(s, OwnerObserved(ABSENT), Tick(), LeaseValid(LEASE, 200.0))
    assert s.state is State.STOPPED and acts == []


def test_address_failure_while_acquiring_gives_the_key_back_unmarked():
    s, acts = run(acquiring(), AddressFailed("ENODEV"))
    assert s.state is State.RELEASING and acts == [StopAnnouncing(), RemoveAddress()]
    s, acts = run(s, AddressRemoved())
    assert acts == [DeleteOwnerKey(11, lease=0)]


def test_reconcile_restores_missing_address_and_removes_stray_one():
    s, acts = run(owner(), Reconcile(missing=True, present=False))
    assert acts == [ClaimAddress(), Announce()]
    s, acts = run(owner(), Reconcile(missing=True, present=True))  # one address of a group gone
    assert acts == [ClaimAddress(), Announce()]
    s, acts = run(backup(owner=OTHER), Reconcile(missing=True, present=True))
    assert acts == [RemoveAddress()]
    assert run(owner(), Reconcile(missing=False, present=True))[1] == []
    assert run(backup(owner=OTHER), Reconcile(missing=True, present=False))[1] == []


def test_reconcile_snapshot_older_than_our_last_address_change_is_ignored():
    s = replace(acquiring(valid_until=105.0), changed_at=100.5)
    s, _ = run(s, AddressAdded(), now=100.5)
    assert run(s, Reconcile(missing=True, present=False, taken_at=100.4), now=100.6)[1] == []
    assert run(s, Reconcile(missing=True, present=False, taken_at=100.6), now=100.6)[1] != []
    # asked for at 100.5, added (a batch of 1,000 takes a while) at 100.9: a snapshot taken in
    # between did not see it yet, and is no reason to add it again
    s = replace(acquiring(valid_until=105.0), changed_at=100.5)
    s, _ = run(s, AddressAdded(), now=100.9)
    assert run(s, Reconcile(missing=True, present=False, taken_at=100.7), now=101.0)[1] == []
    assert run(s, Reconcile(missing=True, present=False, taken_at=100.95), now=101.0)[1] != []


def test_expired_address_of_a_silent_lease_is_not_re_added():
    assert run(owner(valid_until=101.2), Reconcile(missing=True, present=False))[1] == []


def test_link_up_and_etcd_restored_reannounce_only_when_owner():
    assert run(owner(), LinkUp())[1] == [Announce()]
    assert run(owner(), EtcdRestored())[1] == [Announce()]
    assert run(backup(owner=OTHER), LinkUp())[1] == []


def test_deferred_claim_renews_the_lease_at_once_then_claims():
    """A takeover with less than a second of lease left used to wait for the next keepalive."""
    s, acts = run(acquiring(), ClaimDeferred())
    assert (s.state, s.sub) == (State.ACQUIRING, Sub.DEFERRED) and acts == [RenewLease()]
    s, acts = run(s, LeaseValid(LEASE, 103.0), now=100.2)
    assert s.sub is Sub.ADDING and acts == [ClaimAddress()] and acts[0].until == 102.5
    s, acts = run(replace(s, sub=Sub.DEFERRED), Tick(), now=102.6)  # no renewal came: fenced
    assert s.state is State.FENCED


def test_conflict_probe_runs_before_the_first_claim_unless_handed_back_cleanly():
    s, acts = run(campaigning(), CampaignWon(MINE), p=PC)
    assert s.sub is Sub.PROBING and acts == [ProbeConflicts()]
    s2, acts = run(s, ProbeDone(), p=PC)
    assert s2.sub is Sub.ADDING and s2.probed and acts == [ClaimAddress()]
    clean = campaigning(last_clean=True)
    s3, acts = run(clean, CampaignWon(MINE), p=PC)
    assert s3.sub is Sub.ADDING and acts == [ClaimAddress()]


def test_conflict_releases_unmarked_and_backs_off():
    s, _ = run(acquiring(sub=Sub.PROBING), ProbeDone("02:00:00:00:00:99"), p=PC)
    assert s.state is State.RELEASING and not s.release.clean and s.conflicts == 1
    s, _ = run(s, AddressRemoved(), KeyReleased(), p=PC)
    assert s.holdoff_until == 103.0
    s, _ = run(replace(s, state=State.ACQUIRING, sub=Sub.PROBING, release=None), ProbeDone("again"),
               AddressRemoved(), KeyReleased(), now=110.0, p=PC)
    assert s.conflicts == 2 and s.holdoff_until == 116.0


def test_backup_remembers_whether_the_last_owner_handed_back_cleanly():
    marked = replace(OTHER, released=True, revision=60)
    s, _ = run(backup(owner=OTHER), OwnerObserved(marked), OwnerObserved(OwnerRecord(None, revision=61)))
    assert s.last_owner == "h2" and s.last_clean
    s, _ = run(backup(owner=OTHER), OwnerObserved(OwnerRecord(None, revision=61)))
    assert s.last_owner == "h2" and not s.last_clean

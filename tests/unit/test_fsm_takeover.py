"""Fast takeover in the ownership core: who may take a unit from a suspect owner, and what follows."""

from __future__ import annotations

from dataclasses import replace

from tests.unit.fsm_helpers import LEASE, NAMED, OTHER, TP, backup, owner, run
from vipd.model import (CampaignFailed, CampaignLost, CampaignWon, ClaimAddress, OwnerObserved, OwnerRecord, Placement,
                        PeerRecovered, PeerSuspected, ProbeConflicts, RemoveAddress, StopAnnouncing, TakeOver, Tick)
from vipd.ownership.state import Sub, State, wakeup

WON = OwnerRecord("h1", epoch=NAMED.revision + 1, lease=LEASE, revision=20)


def test_named_successor_takes_over_a_suspect_owner_without_a_probe():
    s, acts = run(backup(owner=NAMED), PeerSuspected("h2"), p=TP)
    assert s.sub is Sub.TAKING_OVER and acts == [TakeOver(NAMED, LEASE)]
    s, acts = run(s, CampaignWon(WON), p=TP)
    # the owner's kernel token ended before our transaction could win: no conflict probe, claim at once
    assert s.state is State.ACQUIRING and s.sub is Sub.ADDING and s.epoch == WON.epoch
    assert [type(a) for a in acts] == [ClaimAddress] and ProbeConflicts() not in acts


def test_suspicion_before_the_record_names_us_acts_when_it_does():
    s, acts = run(backup(owner=OTHER), PeerSuspected("h2"), p=TP)
    assert acts == [] and s.why_not == "owned by h2"
    s, acts = run(s, OwnerObserved(NAMED), p=TP)
    assert acts == [TakeOver(NAMED, LEASE)]


def test_no_takeover_unless_named_suspect_healthy_with_a_lease_and_enabled():
    named_other = replace(NAMED, successor="h3")
    assert run(backup(owner=named_other), PeerSuspected("h2"), p=TP)[1] == []  # h3 is the successor
    assert run(backup(owner=NAMED), PeerSuspected("h3"), p=TP)[1] == []  # another peer is suspect
    assert run(backup(owner=NAMED, healthy=False), PeerSuspected("h2"), p=TP)[1] == []
    assert run(backup(owner=NAMED, valid_until=100.2), PeerSuspected("h2"), p=TP)[1] == []  # lease not proven
    assert run(backup(owner=NAMED), PeerSuspected("h2"), p=replace(TP, takeover=False))[1] == []


def test_recovered_owner_is_left_alone():
    s, _ = run(backup(owner=OTHER), PeerSuspected("h2"), PeerRecovered("h2"), p=TP)
    s, acts = run(s, OwnerObserved(NAMED), p=TP)
    assert acts == [] and s.why_not == "owned by h2"


def test_lost_takeover_backs_off_instead_of_spinning():
    s, _ = run(backup(owner=NAMED), PeerSuspected("h2"), p=TP)
    s, acts = run(s, CampaignLost(NAMED), p=TP)  # the owner spoke again just before we sent
    assert acts == [] and s.sub is Sub.IDLE and s.why_not == "takeover retry"
    w = wakeup(TP, s, 100.0)
    assert w is not None and 100.0 < w <= 100.2
    s, acts = run(s, Tick(), now=w, p=TP)
    assert acts == [TakeOver(NAMED, LEASE)]
    s, acts = run(s, CampaignFailed("etcd down"), p=TP)
    assert acts == [] and s.sub is Sub.IDLE and s.retry_at > 100.0


def test_owner_replaced_by_its_successor_fences_at_once():
    mine = OwnerRecord("h1", epoch=11, lease=LEASE, revision=15, successor="h2")
    s, _ = run(owner(), OwnerObserved(mine), p=TP)
    assert s.state is State.OWNER and s.owner == mine  # naming a successor changes nothing else
    taken = OwnerRecord("h2", epoch=16, lease=99, revision=17)
    s, acts = run(s, OwnerObserved(taken), p=TP)
    assert s.state is State.FENCED and acts == [StopAnnouncing(), RemoveAddress()]


def test_the_named_successor_takes_over_even_in_its_release_hold_off():
    # it handed the unit to its preferred host a moment ago, which named it and then died
    s, acts = run(backup(owner=NAMED, holdoff_until=102.5), PeerSuspected("h2"), p=TP)
    assert s.sub is Sub.TAKING_OVER and acts == [TakeOver(NAMED, LEASE)]
    # not after an address conflict: that hold-off backs off for a reason
    s, acts = run(backup(owner=NAMED, holdoff_until=102.5, conflicts=1), PeerSuspected("h2"), p=TP)
    assert acts == [] and s.why_not == "release hold-off"
    # nor for an owner that is alive
    s, acts = run(backup(owner=NAMED, holdoff_until=102.5), Tick(), p=TP)
    assert acts == [] and s.why_not == "release hold-off"


def test_no_handover_to_a_preferred_host_whose_heartbeats_stopped():
    pp = replace(TP, preempt_delay=1.0)
    s, _ = run(owner(valid_until=110.0), Placement(("h3", "h1")), p=pp)
    assert s.preempt is not None and s.preempt.target == "h3"
    s, _ = run(s, PeerSuspected("h3"), now=100.5, p=pp)
    assert s.preempt is None  # its presence outlives it by up to a lease TTL: not a target meanwhile
    s, acts = run(s, Tick(), now=102.0, p=pp)
    assert s.state is State.OWNER and acts == []
    s, _ = run(s, PeerRecovered("h3"), now=103.0, p=pp)
    assert s.preempt is not None and s.preempt.since == 103.0  # the hold-down starts again


def test_a_new_suspicion_of_the_owner_ends_a_takeover_retry_wait():
    """A takeover lost to the owner heard again waits its retry; the owner recovers, then falls
    silent again within that wait (a SIGSTOP right after a flap): the new suspicion takes over at
    once, not at the retry (which cost a host-loss failover up to 200 ms more)."""
    s, _ = run(backup(owner=NAMED), PeerSuspected("h2"), p=TP)
    s, _ = run(s, CampaignLost(NAMED), p=TP)
    assert s.why_not == "takeover retry" and s.retry_at > 100.0
    s, acts = run(s, PeerSuspected("h2"), p=TP)  # still the same suspicion: the wait stands
    assert acts == [] and s.why_not == "takeover retry"
    s, acts = run(s, PeerRecovered("h2"), PeerSuspected("h2"), p=TP)
    assert acts == [TakeOver(NAMED, LEASE)]


def test_a_lost_campaign_answered_after_a_newer_record_keeps_the_newer_one():
    """Our campaign lost to h2, but its answer came after the watch told us h2 had since named us
    successor (batched campaigns under load: scale-20261207-004905, 68 VIPs). The answer's record
    is older: taken as is, it erased the naming, and when h2 died its VIPs waited for its lease
    (10 s) instead of being taken over."""
    won_by_h2 = OwnerRecord("h2", epoch=12, lease=99, revision=12)  # what our losing transaction saw
    s, _ = run(backup(owner=None, sub=Sub.CAMPAIGNING), OwnerObserved(NAMED), p=TP)  # the watch: rev 13
    s, acts = run(s, CampaignLost(won_by_h2), p=TP)
    assert s.owner == NAMED and acts == []
    s, acts = run(s, PeerSuspected("h2"), p=TP)
    assert acts == [TakeOver(NAMED, LEASE)]
    s, _ = run(backup(owner=OTHER, sub=Sub.CAMPAIGNING), CampaignLost(NAMED), p=TP)  # newer: taken
    assert s.owner == NAMED

"""The ownership core as a whole: the transition and sub-state tables, the timer property, health,
placement, preemption, anycast, and the timing decisions that used to misfire between pieces."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.unit.fsm_helpers import (ALL_EVENTS, AP, LEASE, MINE, OTHER, P, PP, TP, acquiring, backup, every_state,
                                    owner, run)
from vipd.model import (AddressAdded, AddressRemoved, Campaign, CampaignLost, CampaignWon, ClaimAddress, DeleteOwnerKey, HealthChanged,
                        KeyReleased, LeaseGone, LeaseValid, OwnerObserved, OwnerRecord, PeerSuspected, Placement,
                        PreemptGranted, ReleaseRequested, RemoveAddress, RequestPreempt, ReturnPreemptToken, State, StopAnnouncing,
                        TakeOver, Tick)
from vipd.ownership import fsm
from vipd.ownership import state as st
from vipd.ownership.fsm import InvalidTransition, step
from vipd.ownership.state import Preempt, Sub, VipState

NOWS = (100.0, 100.15, 101.6, 200.0)


def test_transition_table_is_enforced(monkeypatch):
    monkeypatch.setitem(st.TRANSITIONS, State.FENCED, frozenset({State.STOPPED}))
    fenced = replace(owner(), state=State.FENCED, sub=Sub.REMOVING)
    with pytest.raises(InvalidTransition, match="fenced -> backup on AddressRemoved"):
        step(P, fenced, AddressRemoved(), 100.0)


def test_sub_state_table_is_enforced(monkeypatch):
    monkeypatch.setitem(st.SUBSTATES, State.OWNER, frozenset({Sub.HANDING_OVER}))
    with pytest.raises(InvalidTransition, match="owner has no sub-state serving"):
        step(P, acquiring(), AddressAdded(), 100.0)


@pytest.mark.parametrize("params", [P, PP, AP, replace(P, conflict_check=True), TP],
                         ids=["p", "preempt", "anycast", "probe", "takeover"])
def test_every_state_and_event_stays_in_the_tables(params):
    """Every state x sub-state x event x instant: no step leaves the tables (step raises if it does),
    and every table entry is exercised."""
    seen = set()
    for s0 in every_state():
        for ev in ALL_EVENTS:
            for now in NOWS:
                s1, _ = step(params, s0, ev, now)
                seen.add((s0.state, s1.state))
    allowed = {(a, b) for a, bs in st.TRANSITIONS.items() for b in bs}
    moved = set()
    for a, b in seen:  # a step may pass through BACKUP (fenced/released, then at once campaigning)
        if a is b:
            continue
        if (a, b) not in allowed:
            assert (a, State.BACKUP) in allowed and (State.BACKUP, b) in allowed, (a, b)
            moved |= {(a, State.BACKUP), (State.BACKUP, b)}
        else:
            moved.add((a, b))
    if params is P:
        assert moved == allowed, f"table entries never exercised: {allowed - moved}"


@pytest.mark.parametrize("params", [P, PP, AP, TP], ids=["p", "preempt", "anycast", "takeover"])
def test_wakeup_covers_every_tick_that_would_act(params):
    """Whenever step(s, Tick) would do something at `now`, wakeup(s) is set and not later than now:
    the controller never sleeps through a deadline the state depends on."""
    for s0 in every_state():
        for ev in [None, *ALL_EVENTS]:
            s = s0 if ev is None else step(params, s0, ev, 100.0)[0]
            for now in NOWS:
                if s.state is State.STOPPED:
                    continue
                s2, acts = step(params, s, Tick(), now)
                if acts or s2.state is not s.state or s2.sub is not s.sub:
                    w = st.wakeup(params, s, now)
                    assert w is not None and w <= now + 1e-9, (s, now, acts)


@pytest.mark.parametrize("params", [P, TP], ids=["p", "takeover"])
def test_wakeup_never_asks_for_a_tick_that_does_nothing(params):
    """No busy loop: a wakeup in the past means the Tick acts."""
    for s0 in every_state():
        for now in NOWS:
            w = st.wakeup(params, s0, now)
            if w is not None and w <= now and s0.state is not State.STOPPED:
                s2, acts = step(params, s0, Tick(), now)
                assert acts or s2 != s0, (s0, now)


# ---- health, placement, preemption --------------------------------------------------------------

def test_unhealthy_backup_does_not_campaign_until_healthy():
    s, acts = run(backup(healthy=False), LeaseValid(LEASE, 102.0), p=PP)
    assert acts == [] and s.why_not == "unhealthy"
    s, acts = run(s, HealthChanged(True), p=PP)
    assert acts == [Campaign(LEASE)]


def test_unhealthy_owner_releases_address_first():
    s, acts = run(owner(), HealthChanged(False, "check api failed"), p=PP)
    assert s.state is State.RELEASING and acts == [StopAnnouncing(), RemoveAddress()]
    assert "unhealthy" in s.reason
    s, acts = run(s, AddressRemoved(), p=PP)
    assert acts == [DeleteOwnerKey(11, lease=LEASE)]


def test_campaign_is_staggered_by_ranking_so_the_preferred_host_wins():
    base = backup(valid_until=105.0, owner=OTHER)
    s, acts = run(base, Placement(("h3", "h1", "h2")), OwnerObserved(OwnerRecord(None, revision=50)), p=PP)
    assert acts == [] and st.wakeup(PP, s, 100.0) == pytest.approx(100.2)
    s2, acts = run(s, Tick(), now=100.2, p=PP)
    assert acts == [Campaign(LEASE)]
    # the host that just let go does not count: if h3 held it, h1 is first
    base3 = backup(valid_until=105.0, owner=replace(OTHER, node="h3"))
    s, acts = run(base3, Placement(("h3", "h1", "h2")), OwnerObserved(OwnerRecord(None, revision=50)), p=PP)
    assert acts == [Campaign(LEASE)]


def test_a_host_that_just_joined_campaigns_for_its_share_before_the_others():
    """Cold start: h3 came up at 99.5 and ranks first; h1 has run for a while. Without the join
    grace h1 campaigned 0.2 s after the key was absent, before h3's controllers had campaigned at
    all, and took h3's share (which preemption then moved back, in waves)."""
    joined = Placement(("h3", "h1", "h2"), (99.5, 10.0, 10.0))
    none = OwnerObserved(OwnerRecord(None, revision=50))
    base = backup(valid_until=112.0, owner=replace(OTHER, node="h9"))  # (a host gone meanwhile)
    s, acts = run(base, joined, none, now=100.0, p=PP)
    assert acts == [] and s.why_not == "waiting for better-ranked hosts"
    assert st.wakeup(PP, s, 100.0) == pytest.approx(99.5 + 5.0 + 0.2)
    assert run(s, Tick(), now=104.6, p=PP)[1] == []
    assert run(s, Tick(), now=104.7, p=PP)[1] == [Campaign(LEASE)]
    # the host that joined campaigns at once; one further back waits its stagger after the grace
    assert run(base, joined, none, now=100.0, p=replace(PP, node="h3"))[1] == [Campaign(LEASE)]
    h2 = replace(PP, node="h2")
    s2, _ = run(base, joined, none, now=100.0, p=h2)
    assert st.wakeup(h2, s2, 100.0) == pytest.approx(99.5 + 5.0 + 0.4)
    # hosts seen long ago, an unknown join time, or no grace: the stagger alone, as before
    for ev, p in ((Placement(("h3", "h1", "h2"), (50.0, 10.0, 10.0)), PP), (Placement(("h3", "h1", "h2")), PP),
                  (joined, replace(PP, join_grace=0.0))):
        s3, acts = run(base, ev, none, now=100.0, p=p)
        assert acts == [] and st.wakeup(p, s3, 100.0) == pytest.approx(100.2), ev
    # a host that joined behind us never delays us
    s4, acts = run(base, Placement(("h1", "h3"), (10.0, 99.9)), none, now=100.0, p=PP)
    assert acts == [Campaign(LEASE)]


def test_stagger_skips_hosts_in_their_release_hold_off():
    """A held-off host publishes it (HoldOff -> presence), so the others' rankings skip it: h3 does
    not wait a stagger for h2, which could not campaign anyway (the demo's 219 ms planned stop)."""
    s, acts = run(owner(), ReleaseRequested("operator"), AddressRemoved(), KeyReleased(), p=PP)
    assert ("HoldOff", True) in [(type(a).__name__, getattr(a, "active", None)) for a in acts]
    h3 = replace(PP, node="h3")
    base = backup(valid_until=105.0, owner=replace(OTHER, node="h1"))  # h1, the preferred host, holds it
    # h1 stops; h2 (second) is in its hold-off, so its presence removed it from the ranking
    s, acts = run(base, Placement(("h1", "h3")), OwnerObserved(OwnerRecord(None, revision=80)), p=h3)
    assert acts == [Campaign(LEASE)]


def test_returning_preferred_host_campaigns_first_even_with_little_lease_left():
    """The preferred host came back; the key went absent when the interim owner handed it back.
    It used to skip its turn when less than a second of address lifetime was left (8 of 25 trials),
    letting the third host win and preemption move the VIP again 5 s later."""
    marked = replace(OTHER, node="h2", released=True, revision=90)
    s = backup(valid_until=101.3, owner=marked)
    s, acts = run(s, Placement(("h1", "h2", "h3")), p=PP)
    assert acts == [TakeOver(marked, LEASE)]  # the handed-back key, at once (its delete: not waited for)
    s2, acts = run(replace(s, sub=Sub.TAKING_OVER), OwnerObserved(replace(MINE, epoch=91, revision=91)),
                   CampaignWon(replace(MINE, epoch=91, revision=91), handed_back=True), p=PP)
    assert s2.state is State.ACQUIRING and s2.reason == "took over a handed-back key"
    assert not any(type(a).__name__ == "ProbeConflicts" for a in acts)  # its owner removed the address first
    # the takeover lost because the stop's revoke deleted the key first: campaign at once, no retry wait
    gone = OwnerRecord(None, revision=92)
    s3, acts = run(replace(s, sub=Sub.TAKING_OVER), OwnerObserved(gone), CampaignLost(gone, handed_back=True), p=PP)
    assert acts == [Campaign(LEASE)] and s3.retry_at == 0.0
    s = backup(valid_until=101.3, owner=OwnerRecord(None, revision=91), last_owner="h2", last_clean=True)
    s, acts = run(s, Placement(("h1", "h2", "h3")), p=PP)
    assert acts == [Campaign(LEASE)]


def test_not_a_candidate_never_campaigns():
    s, acts = run(backup(valid_until=105.0), Placement(("h2", "h3")), Tick(), p=PP)
    assert acts == [] and st.wakeup(PP, s, 100.0) is None and "not a candidate" in s.why_not


def test_preemption_after_hold_down_then_one_token_at_a_time():
    s, _ = run(owner(valid_until=200.0), Placement(("h2", "h1")), p=PP)
    assert s.preempt == Preempt("h2", 100.0) and st.wakeup(PP, s, 100.0) == pytest.approx(105.0)
    assert run(s, Tick(), now=104.9, p=PP)[1] == []
    s, acts = run(s, Tick(), now=105.0, p=PP)
    assert acts == [RequestPreempt("h2")] and s.sub is Sub.HANDING_OVER
    s, acts = run(s, Tick(), now=106.0, p=PP)
    assert acts == []  # asked once
    s, acts = run(s, PreemptGranted(), now=106.0, p=PP)
    assert s.state is State.RELEASING and s.release.preempt and acts == [StopAnnouncing(), RemoveAddress()]
    s, acts = run(s, AddressRemoved(), KeyReleased(), now=106.0, p=PP)
    assert s.state is State.BACKUP and ReturnPreemptToken() in acts  # the token goes back at the end


def test_flapping_target_restarts_the_hold_down():
    s, _ = run(owner(valid_until=200.0), Placement(("h2", "h1")), p=PP)
    s, _ = run(s, Placement(("h1",)), now=103.0, p=PP)
    assert s.preempt is None
    s, _ = run(s, Placement(("h2", "h1")), now=104.0, p=PP)
    s, acts = run(s, Tick(), now=106.0, p=PP)
    assert acts == [] and s.preempt.since == 104.0
    assert run(s, Tick(), now=109.0, p=PP)[1] == [RequestPreempt("h2")]


def test_preemption_disabled_never_asks():
    s, _ = run(owner(valid_until=200.0), Placement(("h2", "h1")))
    s, acts = run(s, Tick(), now=150.0)
    assert acts == [] and s.preempt is None


def test_grant_that_arrives_too_late_is_returned_at_once():
    s, _ = run(owner(valid_until=200.0), Placement(("h2", "h1")), p=PP)
    s, _ = run(s, Tick(), now=105.0, p=PP)
    s, _ = run(s, Placement(("h1", "h2")), now=105.1, p=PP)  # we are preferred again
    s, acts = run(s, PreemptGranted(), now=105.2, p=PP)
    assert (s.state, s.sub) == (State.OWNER, Sub.SERVING) and acts == [ReturnPreemptToken()]


def test_grant_after_a_health_release_is_returned_at_once():
    s, _ = run(owner(valid_until=200.0), Placement(("h2", "h1")), p=PP)
    s, _ = run(s, Tick(), now=105.0, p=PP)
    s, _ = run(s, HealthChanged(False, "down"), now=105.1, p=PP)
    s, acts = run(s, PreemptGranted(), now=105.2, p=PP)
    assert acts == [ReturnPreemptToken()]
    s, acts = run(s, AddressRemoved(), KeyReleased(), now=105.3, p=PP)
    assert ReturnPreemptToken() not in acts  # never returned twice


def test_lone_host_reclaims_after_its_own_release_and_holdoff():
    s, _ = run(owner(valid_until=200.0), Placement(("h1",)), p=PP)
    s, _ = run(s, ReleaseRequested(), AddressRemoved(), KeyReleased(), p=PP)
    s, acts = run(s, OwnerObserved(OwnerRecord(None, revision=70)), now=100.1, p=PP)
    assert acts == [] and s.last_owner == "h1"
    s, acts = run(s, Tick(), now=103.0, p=PP)  # hold-off over; nobody else is a candidate
    assert Campaign(LEASE) in acts


def test_anycast_holds_without_election_while_fit():
    s, acts = run(VipState(state=State.BACKUP, sub=Sub.IDLE), LeaseValid(LEASE, 102.0), p=AP)
    assert s.state is State.ACQUIRING and acts == [ClaimAddress()]
    s, acts = run(s, AddressAdded(), p=AP)
    assert s.state is State.OWNER
    s, acts = run(s, OwnerObserved(replace(OTHER, revision=50)), p=AP)
    assert s.state is State.OWNER and acts == []
    s, acts = run(s, HealthChanged(False, "down"), AddressRemoved(), p=AP)
    assert s.state is State.BACKUP and not any(isinstance(a, DeleteOwnerKey) for a in acts)
    s2, _ = run(replace(owner(), epoch=0), LeaseGone(LEASE), p=AP)
    assert s2.state is State.FENCED


def test_adopting_our_own_key_after_a_restart_keeps_the_epoch():
    s, acts = run(backup(owner=MINE), Tick())
    assert s.epoch == MINE.epoch and acts == [ClaimAddress()]


def test_with_fast_takeover_the_next_host_waits_longer_for_a_preferred_host_that_is_heard():
    """h3 hands the key back; h2 is preferred, we (h1) rank second. With fast takeover on and h2's
    heartbeats arriving we wait the stagger plus HEARD_WAIT (at a planned stop's wave h2's own
    takeovers took longer than the stagger, and h1 took many of them, moved back by preemption
    5 s later); once h2 is suspected, the stagger alone, as without fast takeover."""
    tp = replace(PP, takeover=True)
    marked = replace(OTHER, node="h3", released=True, revision=90)
    base = backup(valid_until=110.0, owner=replace(OTHER, node="h3"))
    s, acts = run(base, Placement(("h2", "h1")), OwnerObserved(marked), p=tp)
    assert acts == [] and s.why_not == "waiting for better-ranked hosts"
    assert st.wakeup(tp, s, 100.0) == pytest.approx(100.0 + 0.2 + st.HEARD_WAIT)
    assert run(s, Tick(), now=100.2 + st.HEARD_WAIT - 0.01, p=tp)[1] == []
    assert run(s, Tick(), now=100.2 + st.HEARD_WAIT, p=tp)[1] == [TakeOver(marked, LEASE)]
    # h2 suspected meanwhile: at its stagger (or at once, once past it)
    s2, acts = run(s, PeerSuspected("h2"), now=100.1, p=tp)
    assert acts == [] and st.wakeup(tp, s2, 100.1) == pytest.approx(100.2)
    assert run(s, PeerSuspected("h2"), now=100.5, p=tp)[1] == [TakeOver(marked, LEASE)]
    # without fast takeover (no heartbeats to tell a live host from a dead one): the stagger alone
    s3, _ = run(base, Placement(("h2", "h1")), OwnerObserved(marked), p=PP)
    assert st.wakeup(PP, s3, 100.0) == pytest.approx(100.2)
    # the preferred host itself does not wait
    assert run(base, Placement(("h1", "h2")), OwnerObserved(marked), p=tp)[1] == [TakeOver(marked, LEASE)]

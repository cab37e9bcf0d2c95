"""The ownership state of one election unit, its parameters, and every timer derived from it.

No I/O and no clock: `now` is always passed in. The state type names its sub-states explicitly
(`Sub`), so what the machine is waiting for is read from the state, never from a combination of
flags; `SUBSTATES` says which sub-states each state admits, and `wakeup` derives from the state
alone the next instant at which `step(..., Tick(), now)` would act.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

from vipd.model import OwnerRecord, State

if TYPE_CHECKING:
    from typing_extensions import Unpack  # (typing's from 3.11; only read by mypy)

S = State


class Sub(enum.Enum):
    NONE = "-"
    IDLE = "idle"  # BACKUP: watching the key; campaigns when allowed (`why_not` says what it waits for)
    CAMPAIGNING = "campaigning"  # BACKUP: the create transaction is in flight
    CLEARING = "clearing"  # BACKUP: deleting our own key left on a lease we no longer keep alive
    TAKING_OVER = "taking_over"  # BACKUP: the fast-takeover transaction (owner suspect, we are successor) in flight
    PROBING = "probing"  # ACQUIRING: conflict probe before the first claim
    ADDING = "adding"  # ACQUIRING: addresses being added and fences armed
    DEFERRED = "deferred"  # ACQUIRING: less than a second of lease was left: waiting for the renewal asked
    SERVING = "serving"  # OWNER
    HANDING_OVER = "handing_over"  # OWNER: the host-wide preemption token was asked for
    REMOVING = "removing"  # RELEASING / FENCED: address removal asked (retried at retry_at after a failure)
    DELETING = "deleting"  # RELEASING: owner key delete in flight
    RETRY_DELETE = "retry_delete"  # RELEASING: the key delete failed; again at retry_at


SUBSTATES: dict[State, frozenset[Sub]] = {
    S.INIT: frozenset({Sub.NONE}),
    S.BACKUP: frozenset({Sub.IDLE, Sub.CAMPAIGNING, Sub.CLEARING, Sub.TAKING_OVER}),
    S.ACQUIRING: frozenset({Sub.PROBING, Sub.ADDING, Sub.DEFERRED}),
    S.OWNER: frozenset({Sub.SERVING, Sub.HANDING_OVER}),
    S.RELEASING: frozenset({Sub.REMOVING, Sub.DELETING, Sub.RETRY_DELETE}),
    S.FENCED: frozenset({Sub.REMOVING}),
    S.STOPPED: frozenset({Sub.NONE}),
}

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

RETRY_REMOVE = 0.2  # seconds between attempts to remove an address the kernel refused to remove
RETRY_DELETE = 0.5  # seconds between attempts to give an owner key back
RETRY_CAMPAIGN = 0.2  # seconds after a failed campaign (etcd did not answer) before the next
# seconds a candidate behind the preferred host waits for it on top of its stagger while the
# preferred host's heartbeats arrive (fast takeover on, not suspected): see campaign_at
HEARD_WAIT = 2.0


@dataclass(frozen=True)
class Params:
    node: str
    fence_margin: float
    release_holdoff: float
    preempt_delay: float | None = None  # hand a unit to its preferred host after this hold-down; None: never
    campaign_stagger: float = 0.2  # per place behind in the ranking, wait this long before campaigning
    join_grace: float = 5.0  # a better-ranked host that joined less than this ago campaigns first (cold start)
    anycast: bool = False  # every fit host holds the unit at once: no owner key, no election
    conflict_check: bool = False  # probe for another machine answering before the first claim
    takeover: bool = False  # fast takeover: take the unit from a suspect owner that names us successor


@dataclass(frozen=True)
class Release:
    """Why and how a RELEASING unit gives up."""

    reason: str
    then: State = S.BACKUP  # BACKUP, or STOPPED at shutdown
    clean: bool = True  # we served fine (not an address failure or conflict): mark the hand-back clean
    preempt: bool = False  # a handover to the preferred host: the host-wide token returns at the end
    revoke: bool = False  # a daemon stop (then is STOPPED) that revokes the lease: a clean key is only marked


@dataclass(frozen=True)
class Preempt:
    """OWNER: the preferred host we should hand over to, and since when it has been the target."""

    target: str
    since: float


@dataclass(frozen=True)
class VipState:
    state: State = S.INIT
    sub: Sub = Sub.NONE
    owner: OwnerRecord | None = None  # None until the first observation of the owner key
    lease: int = 0  # current host lease (0: none)
    valid_until: float = 0.0  # the lease cannot expire in etcd before this instant
    epoch: int = 0  # our ownership epoch (owner key create_revision) while we hold or release it
    healthy: bool = True  # host and unit checks pass: may campaign and keep serving
    ranking: tuple[str, ...] | None = None  # healthy candidates, target first (None: no placement yet)
    joined: tuple[float, ...] = ()  # when each host of `ranking` started, our clock (its order; () unknown)
    absent_since: float = 0.0  # when the owner key was last seen disappearing
    last_owner: str | None = None  # who held the key before it disappeared
    last_clean: bool = False  # ... and whether it marked its hand-back clean (address removed first)
    holdoff_until: float = 0.0  # BACKUP: no campaign before this instant (after a release)
    retry_at: float = 0.0  # the instant a failed step (campaign, removal, key delete) is tried again
    release: Release | None = None  # RELEASING: why and how
    preempt: Preempt | None = None  # OWNER: the preferred host and since when
    probed: bool = False  # the conflict probe ran once and found nobody
    conflicts: int = 0  # consecutive claims refused because another machine answers for the address
    changed_at: float = -math.inf  # when we last asked the kernel to add or remove the addresses
    reason: str = ""  # why the last state change happened
    why_not: str = ""  # BACKUP: why this host does not campaign right now ("" = it may)
    suspects: frozenset[str] = frozenset()  # peers whose heartbeats stopped (vipd/peers), as last told


_FIELDS = frozenset(VipState.__dataclass_fields__)


class Noted(TypedDict, total=False):
    """Every field of VipState but the four that `moves.to` sets (checked against VipState's
    fields by tests/unit/test_state_evolve.py)."""

    owner: OwnerRecord | None
    lease: int
    valid_until: float
    epoch: int
    healthy: bool
    ranking: tuple[str, ...] | None
    joined: tuple[float, ...]
    absent_since: float
    last_owner: str | None
    last_clean: bool
    holdoff_until: float
    retry_at: float
    release: Release | None
    preempt: Preempt | None
    probed: bool
    conflicts: int
    changed_at: float
    suspects: frozenset[str]


class Changes(Noted, total=False):
    state: State
    sub: Sub
    reason: str
    why_not: str


def evolve(s: VipState, **changes: Unpack[Changes]) -> VipState:
    """`dataclasses.replace(s, **changes)` without its cost: every step of the pure core makes one
    or more, every keepalive one per owner it steps (the before/after of taking the core's changes
    through it: README, Scale, session 19). VipState has no __post_init__, no init=False field and
    no cached property, so copying its fields and setting the changed ones builds the object
    replace would. Every VipState change of the core goes through it (fsm.py, moves.py,
    observe.py). mypy checks the names and types of `changes` through Changes; an unknown name
    raises TypeError here too, as replace does."""
    unknown = changes.keys() - _FIELDS
    if unknown:
        raise TypeError(f"VipState has no field {sorted(unknown)[0]!r}")
    new = object.__new__(VipState)
    d = new.__dict__
    d.update(s.__dict__)
    d.update(changes)
    return new


def fence_deadline(p: Params, s: VipState) -> float:
    """The instant by which the address must be gone: margin before the lease can expire."""
    return s.valid_until - p.fence_margin


def lifetime(p: Params, s: VipState, now: float) -> int:
    """Whole seconds of kernel address lifetime that still end before the fence deadline."""
    return max(0, math.floor(fence_deadline(p, s) - now))


def campaign_at(p: Params, s: VipState) -> float:
    """Candidates campaign in ranking order: the best (other than the host that just let go)
    at once, each further one `campaign_stagger` later, so the preferred host wins without a race.
    With fast takeover on, the others also wait HEARD_WAIT for a preferred host whose heartbeats
    arrive (it is told to the unit when suspected: vipd/suspicions.py): in a planned stop's wave
    the preferred host's takeovers took longer than the stagger, the next host took many of
    them, and preemption moved them back 5 s later in a second wave (bench/scale.py, 3,000 VIPs,
    `planned_stop.after.handovers`: 190-595 of the 1,000 moved). A preferred host that is lost is suspected within the
    heartbeats' grace, and the others then campaign at their stagger."""
    earliest = max(s.holdoff_until, s.retry_at)
    if s.ranking is None:
        return earliest
    order = [h for h in s.ranking if h != s.last_owner]
    if p.node == s.last_owner and p.node in s.ranking:
        place = len(order)  # we just let go: campaign last, after everyone else had their turn
    elif p.node in order:
        place = order.index(p.node)
    else:
        return math.inf
    wait = place * p.campaign_stagger
    if place and p.takeover and order[0] == s.ranking[0] and order[0] not in s.suspects:
        wait += HEARD_WAIT
    return max(earliest, max(s.absent_since, joined_ahead(p, s, order[:place])) + wait)


def joined_ahead(p: Params, s: VipState, ahead: list[str]) -> float:
    """The end of the join grace of the better-ranked hosts that joined last (-inf: none did).
    A host that just came up ranks first for its share of the units before its controllers have
    campaigned for them: at a cold start the first host up would take them all (its campaigns go
    out while the others register) and preemption would move most of them again, in waves. So a
    unit without an owner waits for the hosts ranked ahead of it until `join_grace` after they
    started (vipd/election/hosts.py `joined_at`); a host that stays silent only delays it by that much."""
    seen = [t for h, t in zip(s.ranking or (), s.joined) if h in ahead]
    return max(seen) + p.join_grace if seen else -math.inf


def why_not_campaign(p: Params, s: VipState, now: float) -> str:
    """"" when a BACKUP unit may act on the owner key now; otherwise what it waits for."""
    if not s.healthy:
        return "unhealthy"
    if s.lease == 0:
        return "no lease"
    if now >= fence_deadline(p, s):
        return "lease not proven"
    if now < s.holdoff_until and not (may_take_over(p, s) and not s.conflicts):
        return "release hold-off"  # (not for a takeover the dead owner named us for: availability first)
    if p.anycast:
        return ""
    if s.owner is None:
        return "owner key not read yet"
    if s.owner.node == p.node and s.owner.released:
        return "own key being handed back"
    if s.owner.node is not None and not released_by_other(p, s.owner):
        if s.owner.node == p.node:
            return ""
        if may_take_over(p, s):
            return "" if now >= s.retry_at else "takeover retry"
        return f"owned by {s.owner.node}"
    at = campaign_at(p, s)
    if at == math.inf:
        return "not a candidate (placement)"
    if now < at:
        return "waiting for better-ranked hosts"
    return ""


def released_by_other(p: Params, o: OwnerRecord) -> bool:
    """Another host handed the key back (`<node> released`): it wrote that mark only after its
    addresses were removed and its fences disarmed (vipd/ownership/moves.py `release`, then
    vipd/election/owners.py), so the key is as free as a deleted one. Its lease deletes it only
    when that host's stop revokes it (seconds later at 1,000 VIPs), or its own delete follows: the
    candidates do not wait for either; they take the marked key over (vipd/ownership/tasks.py
    `_take_released`), in the order they campaign for an absent key."""
    return o.released and o.node is not None and o.node != p.node


def may_take_over(p: Params, s: VipState) -> bool:
    """The owner named us its successor and its heartbeats stopped: a fast takeover is allowed."""
    o = s.owner
    return (p.takeover and o is not None and o.node is not None and o.node != p.node
            and o.successor == p.node and o.node in s.suspects)


def wakeup(p: Params, s: VipState, now: float) -> float | None:
    """The latest instant at which the controller must call step(Tick): every timer the state
    machine waits on, derived from the state alone."""
    times: list[float] = []
    if s.state in HOLDING:
        times.append(fence_deadline(p, s))
        if s.sub is Sub.SERVING and s.preempt is not None and p.preempt_delay is not None:
            times.append(s.preempt.since + p.preempt_delay)
    elif s.sub in (Sub.REMOVING, Sub.RETRY_DELETE) and s.retry_at:
        times.append(s.retry_at)
    elif s.state is S.BACKUP and s.sub is Sub.IDLE:
        if s.holdoff_until:
            times.append(s.holdoff_until)  # its end is published
        if not why_not_campaign(p, s, now):
            times.append(now)  # something to do at once (the event that made it so acts already)
        elif s.owner is not None and (s.owner.node is None or released_by_other(p, s.owner)) and not p.anycast:
            times.extend(t for t in (campaign_at(p, s), s.retry_at) if t > now)
        elif may_take_over(p, s) and s.retry_at > now:
            times.append(s.retry_at)
    finite = [t for t in times if t < math.inf]
    return min(finite) if finite else None

"""Value types shared by the state machine and the I/O around it. No I/O here."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Union


class State(enum.Enum):
    INIT = "init"
    BACKUP = "backup"
    ACQUIRING = "acquiring"
    OWNER = "owner"
    RELEASING = "releasing"
    FENCED = "fenced"
    STOPPED = "stopped"


@dataclass(frozen=True)
class OwnerRecord:
    """What etcd says about a VIP's owner key. node is None when the key is absent."""

    node: str | None
    epoch: int = 0  # create_revision of the owner key: the fencing token
    lease: int = 0
    revision: int = 0  # etcd revision at which this was observed
    released: bool = False  # the owner marked it as handed back cleanly (address already removed)


# ---- events (inputs to fsm.step) -------------------------------------------------------------

@dataclass(frozen=True)
class Start:
    pass


@dataclass(frozen=True)
class LeaseValid:
    """A keepalive (or grant) was acknowledged: the lease cannot expire in etcd before valid_until."""

    lease: int
    valid_until: float


@dataclass(frozen=True)
class LeaseGone:
    """The lease expired or was revoked (etcd said so, or its deadline passed unconfirmed)."""

    lease: int


@dataclass(frozen=True)
class EtcdRestored:
    """etcd answers again after a failure streak."""


@dataclass(frozen=True)
class OwnerObserved:
    record: OwnerRecord


@dataclass(frozen=True)
class CampaignWon:
    record: OwnerRecord


@dataclass(frozen=True)
class CampaignLost:
    record: OwnerRecord


@dataclass(frozen=True)
class CampaignFailed:
    error: str


@dataclass(frozen=True)
class AddressAdded:
    pass


@dataclass(frozen=True)
class AddressFailed:
    error: str
    conflict: bool = False  # another machine answers for the address


@dataclass(frozen=True)
class ClaimDeferred:
    """Too little lease left to add the address (a probe took time): wait for the next keepalive."""


@dataclass(frozen=True)
class AddressRemoved:
    pass


@dataclass(frozen=True)
class RemoveFailed:
    error: str


@dataclass(frozen=True)
class KeyReleased:
    pass


@dataclass(frozen=True)
class ReleaseFailed:
    error: str


@dataclass(frozen=True)
class ReleaseRequested:
    reason: str = "requested"


@dataclass(frozen=True)
class ShutdownRequested:
    pass


@dataclass(frozen=True)
class LinkUp:
    pass


@dataclass(frozen=True)
class Reconcile:
    """Level-triggered check of the kernel: is any of the unit's addresses missing, any present?"""

    missing: bool
    present: bool
    taken_at: float = field(default=0.0, compare=False)  # trio clock of the kernel snapshot (0: now)


@dataclass(frozen=True)
class HealthChanged:
    """This host's fitness to serve the unit (host checks and the unit's own checks) changed."""

    healthy: bool
    reason: str = ""


@dataclass(frozen=True)
class Placement:
    """Candidate hosts for the unit, best first (healthy ones only; the first is its target)."""

    ranking: tuple[str, ...]


@dataclass(frozen=True)
class PreemptGranted:
    """This host's one-at-a-time token for handing a unit to its preferred host."""


@dataclass(frozen=True)
class Tick:
    """Time passed (a deadline may have been reached)."""


Event = Union[Start, LeaseValid, LeaseGone, EtcdRestored, OwnerObserved, CampaignWon, CampaignLost,
              CampaignFailed, AddressAdded, AddressFailed, ClaimDeferred, AddressRemoved, RemoveFailed, KeyReleased,
              ReleaseFailed, ReleaseRequested, ShutdownRequested, LinkUp, Reconcile, HealthChanged, Placement,
              PreemptGranted, Tick]


# ---- actions (outputs of fsm.step) -----------------------------------------------------------

@dataclass(frozen=True)
class ClaimAddress:
    """Add or refresh the VIP address with a kernel lifetime of `lifetime` whole seconds; state tied
    to the lease with finer timers (egress rules) may stay until `until` (trio clock)."""

    lifetime: int
    until: float = field(default=0.0, compare=False)  # derived from the lease: not part of identity
    refresh: bool = field(default=False, compare=False)  # we hold it already: restart the countdown only


@dataclass(frozen=True)
class RemoveAddress:
    pass


@dataclass(frozen=True)
class Announce:
    pass


@dataclass(frozen=True)
class StopAnnouncing:
    pass


@dataclass(frozen=True)
class Campaign:
    lease: int


@dataclass(frozen=True)
class DeleteOwnerKey:
    epoch: int
    clean: bool = False  # a hand-back after serving: mark it released first


@dataclass(frozen=True)
class RequestPreempt:
    """Ask for the host-wide token to hand this unit to `target` (one handover at a time)."""

    target: str


Action = Union[ClaimAddress, RemoveAddress, Announce, StopAnnouncing, Campaign, DeleteOwnerKey, RequestPreempt]

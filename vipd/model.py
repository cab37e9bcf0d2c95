"""Value types shared by the state machine and the I/O around it. No I/O here."""

from __future__ import annotations

import enum
import functools
import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from vipd.config_dsr import ServiceSpec
    from vipd.health.spec import CheckSpec

IPInterface = Union[ipaddress.IPv4Interface, ipaddress.IPv6Interface]


@dataclass(frozen=True)
class VipSpec:
    """One virtual IP: where it lives and how it is announced."""

    name: str
    address: IPInterface  # address with prefix length, e.g. 10.0.0.10/24
    interface: str
    announce_count: int = 3
    announce_interval: float = 0.2
    announce_reply: bool = False
    group: str | None = None  # VIPs of one group always have the same owner
    prefer: tuple[str, ...] = ()  # placement: hosts to prefer, best first
    avoid: tuple[str, ...] = ()  # placement: hosts to use only when nothing else is healthy
    checks: tuple["CheckSpec", ...] = ()  # failing any releases the VIP (its whole group)
    conflict_check: bool = True  # ARP probe / DAD before the first claim on a NIC
    mode: str = "single"  # single: one owner (elected); anycast: every fit host holds it (routed VIPs)
    services: tuple["ServiceSpec", ...] = ()  # DSR: [[vip.service]], see vipd/config_dsr.py

    @property
    def unit(self) -> str:
        """The election unit this VIP belongs to: its group, or itself."""
        return self.group or self.name

    @functools.cached_property  # (frozen; address.ip builds a new object on every access)
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return self.address.ip

    @property
    def version(self) -> int:
        return self.address.version

    @property
    def on_loopback(self) -> bool:
        return self.interface == "lo"


@dataclass(frozen=True)
class Unit:
    """What one owner key elects: a single VIP, or every VIP of a group (they move together)."""

    name: str
    vips: tuple[VipSpec, ...]

    @property
    def checks(self) -> tuple["CheckSpec", ...]:
        return tuple(c for v in self.vips for c in v.checks)

    @property
    def prefer(self) -> tuple[str, ...]:
        return self.vips[0].prefer

    @property
    def anycast(self) -> bool:
        return self.vips[0].mode == "anycast"

    @property
    def avoid(self) -> tuple[str, ...]:
        return self.vips[0].avoid




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
    epoch: int = 0  # the fencing token: create_revision, or (after a fast takeover) the replaced mod revision + 1
    lease: int = 0
    revision: int = 0  # the key's mod revision (an absent key: the revision at which it was seen absent)
    released: bool = False  # the owner marked it as handed back cleanly (address already removed)
    successor: str | None = None  # the standby the owner designated for a fast takeover


# ---- events (inputs to fsm.step) -------------------------------------------------------------
# Facts the controller reports; the core decides what they mean.

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
    handed_back: bool = False  # won by taking over a key its owner had handed back (released mark)


@dataclass(frozen=True)
class CampaignLost:
    record: OwnerRecord
    handed_back: bool = False  # a takeover of a handed-back key that lost (the key was deleted, or taken)


@dataclass(frozen=True)
class CampaignFailed:
    error: str


@dataclass(frozen=True)
class ProbeDone:
    """The conflict probe before a first claim finished; `conflict` names the other machine's MAC
    (or the reason) when another machine answers for an address of the unit."""

    conflict: str | None = None


@dataclass(frozen=True)
class AddressAdded:
    pass


@dataclass(frozen=True)
class AddressFailed:
    error: str


@dataclass(frozen=True)
class ClaimDeferred:
    """At the netlink call less than one whole second of lease was left: nothing was added."""


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
    """Stop the unit: an owner removes its addresses and hands its key back. `revoke`: the whole
    daemon stops and revokes its lease once no unit's address can remain (vipd/shutdown.py), which
    deletes every key at once, so a clean hand-back only marks the key released (one write per unit, one
    request for all deletions: a 3,300-VIP stop spent seconds deleting keys one batch at a time).
    A reload's removed units get revoke=False: the lease lives on, their keys are deleted."""

    revoke: bool = False


@dataclass(frozen=True)
class LinkUp:
    pass


@dataclass(frozen=True)
class Reconcile:
    """Level-triggered check of the kernel: is any of the unit's addresses missing, any present?"""

    missing: bool
    present: bool
    taken_at: float = field(default=0.0, compare=False)  # clock of the kernel snapshot (0: now)


@dataclass(frozen=True)
class HealthChanged:
    """This host's fitness to serve the unit (host checks and the unit's own checks) changed."""

    healthy: bool
    reason: str = ""


@dataclass(frozen=True)
class Placement:
    """Candidate hosts for the unit, best first (healthy ones only; the first is its target), and
    when each of them started, on this host's clock (the same order; () when not known)."""

    ranking: tuple[str, ...]
    joined: tuple[float, ...] = ()


@dataclass(frozen=True)
class PreemptGranted:
    """This host's one-at-a-time token for handing a unit to its preferred host."""


@dataclass(frozen=True)
class PeerSuspected:
    """This host's heartbeats from `peer` stopped for longer than the peers' grace (vipd/peers):
    if a unit's owner is `peer` and names this host its successor, this host may take it over."""

    peer: str


@dataclass(frozen=True)
class PeerRecovered:
    """A heartbeat from a suspected `peer` arrived again."""

    peer: str


@dataclass(frozen=True)
class Tick:
    """Time passed (a deadline the state names may have been reached)."""


Event = Union[Start, LeaseValid, LeaseGone, EtcdRestored, OwnerObserved, CampaignWon, CampaignLost,
              CampaignFailed, ProbeDone, AddressAdded, AddressFailed, ClaimDeferred, AddressRemoved, RemoveFailed,
              KeyReleased, ReleaseFailed, ReleaseRequested, ShutdownRequested, LinkUp, Reconcile, HealthChanged,
              Placement, PreemptGranted, PeerSuspected, PeerRecovered, Tick]


# ---- actions (outputs of fsm.step) -----------------------------------------------------------
# The controller carries them out in order and reports the outcome as an event.

@dataclass(frozen=True)
class ProbeConflicts:
    """RFC 5227 ARP probe / IPv6 DAD for every NIC address of the unit: answered by ProbeDone."""


@dataclass(frozen=True)
class ClaimAddress:
    """Add the unit's addresses and arm every fence until `until` (the address lifetime is the
    whole seconds left at the netlink call): answered by AddressAdded, AddressFailed or ClaimDeferred."""

    until: float = field(default=0.0, compare=False)  # derived from the lease: not part of identity


@dataclass(frozen=True)
class ArmFence:
    """We hold the addresses: extend every fence (address lifetime, kernel tokens) to `until`."""

    until: float = field(default=0.0, compare=False)


@dataclass(frozen=True)
class RemoveAddress:
    """Disarm every fence and remove the unit's addresses: answered by AddressRemoved or RemoveFailed."""


@dataclass(frozen=True)
class Announce:
    pass


@dataclass(frozen=True)
class StopAnnouncing:
    pass


@dataclass(frozen=True)
class Campaign:
    """Create the owner key on `lease`: answered by CampaignWon, CampaignLost or CampaignFailed."""

    lease: int


@dataclass(frozen=True)
class TakeOver:
    """Fast takeover: replace `record` (the owner key naming this host successor, at its mod
    revision) with our own on `lease`, only if it is unchanged and the owner is still suspect at
    the moment of sending: answered by CampaignWon, CampaignLost or CampaignFailed."""

    record: OwnerRecord
    lease: int


@dataclass(frozen=True)
class DeleteOwnerKey:
    """Delete our owner key of `epoch`: answered by KeyReleased or ReleaseFailed. With `lease` (a
    clean hand-back: the address is gone) the key is first marked released on that lease; with
    `leave` too it is only marked, and the lease's revoke deletes it (ShutdownRequested.revoke)."""

    epoch: int
    lease: int = 0
    leave: bool = False  # only mark it released (with `lease`): the host revokes the lease next


@dataclass(frozen=True)
class RenewLease:
    """Ask the host lease for a keepalive now (a claim found less than a second of lease left)."""


@dataclass(frozen=True)
class HoldOff:
    """Tell the other hosts (through this host's presence) that it will not campaign for the unit
    for a while after a release (`active`), or that it may again: their campaign order skips it."""

    active: bool


@dataclass(frozen=True)
class RequestPreempt:
    """Ask for the host-wide token to hand this unit to `target` (one handover at a time)."""

    target: str


@dataclass(frozen=True)
class ReturnPreemptToken:
    """The handover the token was taken for is over (or not needed): give the token back."""


Action = Union[ProbeConflicts, ClaimAddress, ArmFence, RemoveAddress, Announce, StopAnnouncing, Campaign,
               TakeOver, DeleteOwnerKey, RenewLease, HoldOff, RequestPreempt, ReturnPreemptToken]

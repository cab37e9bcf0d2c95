"""In-memory fakes of the controller's ports, for the controller tier (no root, no etcd, no kernel).

FakeEtcd keeps owner keys with etcd's semantics that matter here (create only if absent, delete
only our own epoch, keys vanish with their lease) and can fail any request on demand. FakeKernel
holds each host's addresses with their lifetimes on the trio clock, so an expired lifetime really
removes the address. Time is trio's MockClock (autojump): every timer of the real controller runs.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import trio

from vipd.errors import AddressError, CampaignWithdrawn, EtcdUnavailable
from vipd.fence import LifetimeFence
from vipd.model import OwnerObserved, OwnerRecord, State, Unit, VipSpec
from vipd.ownership.controller import Controller
from vipd.ownership.state import Params


def vip(name: str = "api", address: str = "10.0.0.10/24") -> VipSpec:
    return VipSpec(name, ipaddress.ip_interface(address), "eth0")


class FakeEtcd:
    def __init__(self) -> None:
        self.revision = 1
        self.keys: dict[str, OwnerRecord] = {}
        self.fail: set[str] = set()  # operations that raise EtcdUnavailable: "campaign", "release"
        self.calls: list[tuple[str, str]] = []
        self.watchers: list[Controller] = []

    def _publish(self, name: str) -> None:
        rec = self.keys.get(name, OwnerRecord(None, revision=self.revision))
        for c in self.watchers:
            c.post(OwnerObserved(rec))

    def expire_lease(self, lease: int) -> None:
        for name, rec in list(self.keys.items()):
            if rec.lease == lease:
                self.revision += 1
                del self.keys[name]
                self._publish(name)


@dataclass
class FakeKeys:
    etcd: FakeEtcd
    node: str

    async def campaign(self, name: str, lease: int, still: Callable[[], bool] = lambda: True) -> tuple[bool, OwnerRecord]:
        await trio.sleep(0.002)
        if not still():
            raise CampaignWithdrawn(name)
        self.etcd.calls.append(("campaign", self.node))
        if "campaign" in self.etcd.fail:
            raise EtcdUnavailable("etcd down (fake)")
        if name in self.etcd.keys:
            return False, self.etcd.keys[name]
        self.etcd.revision += 1
        rec = OwnerRecord(self.node, self.etcd.revision, lease, self.etcd.revision)
        self.etcd.keys[name] = rec
        self.etcd._publish(name)
        return True, rec

    async def take_over(self, name: str, record: OwnerRecord, lease: int) -> tuple[bool, OwnerRecord]:
        """A handed-back key replaced by ours, only if it still has record's mod revision."""
        await trio.sleep(0.002)
        self.etcd.calls.append(("take_over", self.node))
        if "campaign" in self.etcd.fail:
            raise EtcdUnavailable("etcd down (fake)")
        rec = self.etcd.keys.get(name)
        if rec is None or rec.revision != record.revision:
            return False, rec or OwnerRecord(None, revision=self.etcd.revision)
        self.etcd.revision += 1
        self.etcd.keys[name] = won = OwnerRecord(self.node, record.revision + 1, lease, self.etcd.revision)
        self.etcd._publish(name)
        return True, won

    async def release(self, name: str, epoch: int, lease: int = 0, leave: bool = False) -> bool:
        await trio.sleep(0.002)
        self.etcd.calls.append(("release", self.node))
        if "release" in self.etcd.fail:
            raise EtcdUnavailable("etcd down (fake)")
        rec = self.etcd.keys.get(name)
        if rec is None or rec.node != self.node or rec.epoch != epoch:
            return False
        if lease:  # a clean hand-back: marked released first, as vipd.election.owners does
            self.etcd.revision += 1
            self.etcd.keys[name] = replace(rec, revision=self.etcd.revision, released=True)
            self.etcd._publish(name)
            if leave:  # the lease's revoke deletes it (expire_lease)
                return True
        self.etcd.revision += 1
        del self.etcd.keys[name]
        self.etcd._publish(name)
        return True


@dataclass
class FakeKernel:
    """One host's addresses: name -> expiry on the trio clock."""

    held: dict[str, float] = field(default_factory=dict)
    fail_add: bool = False
    fail_remove: bool = False
    claim_delay: float = 0.0  # a claim that waits in a batch of thousands
    history: list[tuple[float, str, str]] = field(default_factory=list)

    def holds(self, name: str) -> bool:
        exp = self.held.get(name)
        return exp is not None and trio.current_time() < exp

    async def claim(self, v: VipSpec, lifetime: int) -> None:
        if self.fail_add:
            raise AddressError("no interface 'eth0' (fake)")
        await trio.sleep(self.claim_delay)
        self.held[v.name] = trio.current_time() + lifetime
        self.history.append((trio.current_time(), "add", v.name))

    async def release(self, v: VipSpec) -> None:
        if self.fail_remove:
            raise AddressError("EIO (fake)")
        self.held.pop(v.name, None)
        self.history.append((trio.current_time(), "del", v.name))

    async def refresh(self, v: VipSpec, lifetime: int) -> None:
        if v.name in self.held:
            self.held[v.name] = trio.current_time() + lifetime


class FakeAnnouncer:
    def __init__(self) -> None:
        self.sent = 0

    async def announce(self, v: VipSpec) -> int:
        self.sent += 1
        return 1


class FakeMetrics:
    def __init__(self) -> None:
        self.transitions: list[tuple[State, State]] = []
        self.errors: list[str] = []
        self.takeovers: list[tuple[str, float | None]] = []

    def record_transition(self, vip: str, old: State, new: State) -> None:
        self.transitions.append((old, new))

    def set_epoch(self, vip: str, epoch: int) -> None:
        pass

    def count_announcements(self, vip: str, frames: int) -> None:
        pass

    def count_dataplane_error(self, vip: str, op: str) -> None:
        self.errors.append(op)

    def record_takeover(self, vip: str, cause: str, seconds: float | None = None) -> None:
        self.takeovers.append((cause, seconds))

    def count_conflict(self, vip: str) -> None:
        pass


class FakeLease:
    """The host lease: valid_until moves with each keepalive while `up`; renew() keeps it alive now."""

    def __init__(self, lease_id: int, ttl: float = 3.0) -> None:
        self.lease_id, self.ttl = lease_id, ttl
        self.renewals = 0
        self.controllers: list[Controller] = []

    def renew(self) -> None:
        self.renewals += 1
        from vipd.model import LeaseValid
        for c in self.controllers:
            c.post(LeaseValid(self.lease_id, trio.current_time() + self.ttl))


@dataclass
class FakeHost:
    node: str
    controller: Controller
    kernel: FakeKernel
    lease: FakeLease
    metrics: FakeMetrics


def make_host(etcd: FakeEtcd, node: str, lease_id: int, vips: Sequence[VipSpec] = (), *,
              params: Params | None = None, conflicts: object = None) -> FakeHost:
    vips = tuple(vips) or (vip(),)
    kernel, lease, metrics = FakeKernel(), FakeLease(lease_id), FakeMetrics()
    p = params or Params(node, fence_margin=0.5, release_holdoff=1.0)
    c = Controller(Unit(vips[0].unit, vips), p, kernel, FakeAnnouncer(), FakeKeys(etcd, node), metrics,
                   LifetimeFence(kernel), conflicts=conflicts, lease=lease)  # type: ignore[arg-type]
    etcd.watchers.append(c)
    lease.controllers.append(c)
    return FakeHost(node, c, kernel, lease, metrics)

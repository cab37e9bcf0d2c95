"""The controller's ports (vipd/ownership/controller.py): what a unit's task needs from the
dataplane, etcd, the host's lease, hooks and metrics. The daemon wires the real ones (vipd/app.py);
the controller tests wire fakes (tests/unit/controller_fakes.py)."""

from __future__ import annotations

from typing import Callable, Protocol

from vipd.model import OwnerRecord, State, VipSpec


class AddressPort(Protocol):
    async def claim(self, vip: VipSpec, lifetime: int) -> None: ...
    async def release(self, vip: VipSpec) -> None: ...


class AnnouncePort(Protocol):
    async def announce(self, vip: VipSpec) -> int: ...


class KeysPort(Protocol):
    async def campaign(self, vip: str, lease: int, still: Callable[[], bool] = ...) -> tuple[bool, OwnerRecord]: ...
    async def release(self, vip: str, epoch: int, lease: int = 0, leave: bool = False) -> bool: ...
    async def take_over(self, vip: str, record: OwnerRecord, lease: int) -> tuple[bool, OwnerRecord]: ...


class TakeoverPort(Protocol):
    async def take_over(self, unit: str, record: OwnerRecord, lease: int) -> tuple[bool, OwnerRecord]:
        """Replace the suspect owner's record, only if the owner is still suspect at the moment of
        sending (vipd/succession.py): (won, the key's record now)."""


class ConflictPort(Protocol):
    async def check_free(self, vip: VipSpec) -> None:
        """Raise an AddressError (AddressConflict, with .mac) when another machine answers for the VIP."""


class LeasePort(Protocol):
    def renew(self) -> None:
        """Send a keepalive now (the result arrives as LeaseValid)."""


class GatePort(Protocol):
    async def acquire(self) -> None: ...
    def release(self) -> None: ...


class HooksPort(Protocol):
    def fire(self, event: str, *, vip: str, address: object = "", interface: str = "", reason: str = "",
             epoch: int = 0) -> bool: ...


class MetricsPort(Protocol):
    def record_transition(self, vip: str, old: State, new: State) -> None: ...
    def set_epoch(self, vip: str, epoch: int) -> None: ...
    def count_announcements(self, vip: str, frames: int) -> None: ...
    def count_dataplane_error(self, vip: str, op: str) -> None: ...
    def count_conflict(self, vip: str) -> None: ...
    def record_takeover(self, vip: str, cause: str, seconds: float | None = None) -> None: ...


class NoLease:
    def renew(self) -> None:
        pass

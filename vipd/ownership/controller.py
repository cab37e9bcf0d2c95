"""One task per VIP: feeds events to the pure state machine and carries out its actions.

Kernel actions (add/refresh/remove the address) run inline, in order, so no two address operations
for a VIP ever interleave. etcd actions and announcements run as child tasks whose results come
back as events; a fence therefore never waits on etcd.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol, Sequence

import trio

from vipd import log
from vipd.config import Unit, VipSpec
from vipd.errors import AddressError, DataplaneError, EtcdError
from vipd.model import (Action, AddressAdded, AddressFailed, AddressRemoved, Announce, Campaign,
                        CampaignFailed, CampaignLost, CampaignWon, ClaimAddress, DeleteOwnerKey, Event,
                        ClaimDeferred, KeyReleased, OwnerRecord, PreemptGranted, Reconcile, ReleaseFailed, RemoveAddress,
                        RemoveFailed, RequestPreempt, Start, State, StopAnnouncing, Tick)
from vipd.ownership import fsm


class AddressPort(Protocol):
    async def claim(self, vip: VipSpec, lifetime: int) -> None: ...
    async def release(self, vip: VipSpec) -> None: ...


class AnnouncePort(Protocol):
    async def announce(self, vip: VipSpec) -> int: ...


class KeysPort(Protocol):
    async def campaign(self, vip: str, lease: int) -> tuple[bool, OwnerRecord]: ...
    async def release(self, vip: str, epoch: int, lease: int = 0) -> bool: ...


class RefreshPort(Protocol):
    async def refresh(self, vip: VipSpec, lifetime: int) -> None: ...


class ConflictPort(Protocol):
    async def check_free(self, vip: VipSpec) -> None:
        """Raise an AddressError (AddressConflict) when another machine answers for the VIP."""


class EgressPort(Protocol):
    """Lease-bound state besides the address (egress SNAT rules), with a finer deadline."""

    def covers(self, vips: Sequence[VipSpec]) -> bool: ...
    async def arm(self, vips: Sequence[VipSpec], until: float) -> None: ...
    async def disarm(self, vips: Sequence[VipSpec]) -> None: ...


class HooksPort(Protocol):
    def fire(self, event: str, *, vip: str, address: object = "", interface: str = "", reason: str = "",
             epoch: int = 0) -> bool: ...


class MetricsPort(Protocol):
    def record_transition(self, vip: str, old: State, new: State) -> None: ...
    def set_epoch(self, vip: str, epoch: int) -> None: ...
    def count_announcements(self, vip: str, frames: int) -> None: ...
    def count_dataplane_error(self, vip: str, op: str) -> None: ...
    def count_conflict(self, vip: str) -> None: ...


class Controller:
    """Owns one election unit: a VIP, or the VIPs of a group, always held together."""

    def __init__(self, unit: Unit, params: fsm.Params, addresses: AddressPort, announcer: AnnouncePort,
                 keys: KeysPort, metrics: MetricsPort, *, conflicts: ConflictPort | None = None,
                 hooks: HooksPort | None = None, preempt_gate: trio.Semaphore | None = None,
                 healthy: bool = True, egress: EgressPort | None = None,
                 ownership: Callable[[Sequence[VipSpec], bool], None] | None = None,
                 refresher: RefreshPort | None = None) -> None:
        self.name = unit.name
        self.vips = unit.vips
        self._conflicts = conflicts if unit.vips[0].conflict_check else None
        self._probed = False  # conflict detection runs before the first claim only
        self._hooks = hooks
        self._ownership = ownership  # told when we start/stop owning (duplicate-responder watch)
        self._refresher = refresher  # batched, listing-free lifetime refresh of addresses we hold
        self._egress = egress if egress is not None and egress.covers(unit.vips) else None
        self._gate = preempt_gate
        self._holds_token = False
        self._address_changed_at = 0.0  # trio clock of our last address claim/removal
        self.params = params
        self._addresses = addresses
        self._announcer = announcer
        self._keys = keys
        self._metrics = metrics
        self.state = fsm.VipState(healthy=healthy)
        self._send, self._recv = trio.open_memory_channel[Event](math.inf)
        self._announcing = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self.stopped = trio.Event()

    def post(self, ev: Event) -> None:
        """Queue an event; never blocks."""
        self._send.send_nowait(ev)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._handle(Start())
            task_status.started()
            while self.state.state is not State.STOPPED:
                wake = fsm.wakeup(self.params, self.state, trio.current_time())
                ev: Event = Tick()
                with trio.move_on_at(wake if wake is not None else math.inf):
                    ev = await self._recv.receive()
                await self._handle(ev)
            self._announcing.cancel()
            nursery.cancel_scope.cancel()
        self.stopped.set()

    async def _handle(self, first: Event) -> None:
        queue = [first]
        while queue:
            ev = queue.pop(0)
            now = trio.current_time()
            if isinstance(ev, Reconcile) and ev.taken_at and ev.taken_at < self._address_changed_at:
                continue  # a kernel snapshot older than our own last address change says nothing
            old = self.state
            self.state, actions = fsm.step(self.params, old, ev, now)
            if isinstance(ev, Reconcile) and ev.missing and old.state is State.OWNER:
                if actions:
                    log.warning("address_missing", vip=self.name, address=self.addresses, action="re-adding")
                else:  # the last lifetime ran out just before the fence deadline: expected when etcd is silent
                    log.info("address_expired", vip=self.name, address=self.addresses, reason="lease not renewed")
            if self.state.state is not old.state:
                self._transitioned(old, ev)
            if self._holds_token and not (self.state.state is State.RELEASING or self.state.preempt_asked):
                self._holds_token = False  # the handover finished or was not needed
                assert self._gate is not None
                self._gate.release()
            for action in actions:
                follow = await self._do(action)
                if follow is not None:
                    queue.append(follow)

    @property
    def addresses(self) -> str:
        return ",".join(str(v.address) for v in self.vips)

    def _transitioned(self, old: fsm.VipState, ev: Event) -> None:
        new = self.state
        if self._ownership is not None and State.OWNER in (old.state, new.state):
            self._ownership(self.vips, new.state is State.OWNER)  # before any address is removed
        self._metrics.record_transition(self.name, old.state, new.state)
        self._metrics.set_epoch(self.name, new.epoch)
        owner = new.owner.node if new.owner else None
        hook = ("owner" if new.state is State.OWNER else "fenced" if new.state is State.FENCED
                else "fault" if isinstance(ev, AddressFailed)
                else "backup" if old.state in (State.OWNER, State.RELEASING) else None)
        if hook and self._hooks is not None:
            for vip in self.vips:
                self._hooks.fire(hook, vip=self.name, address=vip.address, interface=vip.interface,
                                 reason=new.reason or type(ev).__name__, epoch=new.epoch or old.epoch)
        log.info("transition", vip=self.name, address=self.addresses, **{"from": old.state.value},
                 to=new.state.value, reason=new.reason or type(ev).__name__, epoch=new.epoch or None,
                 lease=f"{new.lease:x}" if new.lease else None, owner=owner)

    async def _do(self, action: Action) -> Event | None:
        if isinstance(action, ClaimAddress):
            self._address_changed_at = trio.current_time()
            if self._conflicts is not None and not self._probed and not self.state.last_clean:
                # first claim, and no vipd peer handed it back cleanly: someone else may answer for it
                failed = await self._probe()
                if failed is not None:
                    return failed
            for vip in self.vips:
                # the lifetime is computed now, from the deadline: a slow probe or netlink call before
                # this point must never stretch the address past the fence deadline
                life = math.floor(action.until - trio.current_time()) if action.until else action.lifetime
                if life < 1:
                    log.info("address_claim_deferred", vip=self.name, address=vip.address,
                             reason="less than 1 s of lease left; waiting for the next keepalive")
                    return ClaimDeferred()
                try:
                    if action.refresh and self._refresher is not None:
                        await self._refresher.refresh(vip, life)
                    else:
                        await self._addresses.claim(vip, life)
                except DataplaneError as e:
                    self._metrics.count_dataplane_error(self.name, "claim")
                    log.error("address_claim_failed", vip=self.name, address=vip.address, error=e)
                    return AddressFailed(str(e))
            if self._egress is not None:
                try:
                    await self._egress.arm(self.vips, action.until)
                except DataplaneError as e:  # inbound still works: log loudly, keep serving
                    self._metrics.count_dataplane_error(self.name, "egress")
                    log.error("egress_arm_failed", vip=self.name, error=e)
            return AddressAdded()
        if isinstance(action, RemoveAddress):
            self._address_changed_at = trio.current_time()
            failed: DataplaneError | None = None
            if self._egress is not None:
                try:
                    await self._egress.disarm(self.vips)
                except DataplaneError as e:  # the rules' timeouts end them anyway
                    self._metrics.count_dataplane_error(self.name, "egress")
                    log.error("egress_disarm_failed", vip=self.name, error=e)
            for vip in self.vips:  # remove every address even if one fails
                try:
                    await self._addresses.release(vip)
                except DataplaneError as e:
                    self._metrics.count_dataplane_error(self.name, "remove")
                    log.error("address_remove_failed", vip=self.name, address=vip.address, error=e)
                    failed = e
            return RemoveFailed(str(failed)) if failed else AddressRemoved()
        if isinstance(action, Announce):
            self._announcing.cancel()
            self._announcing = trio.CancelScope()
            self._spawn(self._announce_all, self._announcing)
        elif isinstance(action, StopAnnouncing):
            self._announcing.cancel()
        elif isinstance(action, Campaign):
            self._spawn(self._campaign, action.lease)
        elif isinstance(action, DeleteOwnerKey):
            self._spawn(self._delete_key, action.epoch, action.clean)
        elif isinstance(action, RequestPreempt):
            self._spawn(self._preempt_token, action.target)
        return None

    async def _probe(self) -> Event | None:
        """RFC 5227 ARP probe / IPv6 DAD for every NIC address before the first claim."""
        assert self._conflicts is not None
        for vip in self.vips:
            try:
                await self._conflicts.check_free(vip)
            except AddressError as e:
                self._metrics.count_conflict(self.name)
                log.error("address_conflict", vip=self.name, address=vip.address, interface=vip.interface,
                          error=e, mac=getattr(e, "mac", None))
                return AddressFailed(str(e), conflict=True)
            except DataplaneError as e:
                log.warning("conflict_probe_failed", vip=self.name, address=vip.address, error=e)
        self._probed = True
        return None

    async def _preempt_token(self, target: str) -> None:
        if self._gate is None:
            self.post(PreemptGranted())
            return
        await self._gate.acquire()
        self._holds_token = True
        log.info("handover_to_preferred", vip=self.name, target=target)
        self.post(PreemptGranted())

    def _spawn(self, fn, *args) -> None:  # type: ignore[no-untyped-def]
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    async def _announce_all(self, scope: trio.CancelScope) -> None:
        with scope:
            async with trio.open_nursery() as nursery:
                for vip in self.vips:
                    nursery.start_soon(self._announce, vip)

    async def _announce(self, vip: VipSpec) -> None:
        try:
            sent = await self._announcer.announce(vip)
        except DataplaneError as e:
            self._metrics.count_dataplane_error(self.name, "announce")
            log.warning("announce_failed", vip=self.name, address=vip.address, error=e)
            return
        if sent:
            self._metrics.count_announcements(self.name, sent)
            log.info("announced", vip=self.name, address=vip.address, frames=sent)

    async def _campaign(self, lease: int) -> None:
        try:
            won, record = await self._keys.campaign(self.name, lease)
        except EtcdError as e:
            self.post(CampaignFailed(str(e)))
            return
        self.post(CampaignWon(record) if won else CampaignLost(record))

    async def _delete_key(self, epoch: int, clean: bool) -> None:
        try:
            await self._keys.release(self.name, epoch, self.state.lease if clean else 0)
        except EtcdError as e:
            log.warning("owner_key_delete_failed", vip=self.name, epoch=epoch, error=e)
            self.post(ReleaseFailed(str(e)))
            return
        self.post(KeyReleased())

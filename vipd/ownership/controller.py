"""One task per election unit: feeds events to the pure core and carries out its actions.

The controller decides nothing. Kernel actions (probe, add, arm, remove) run inline and in order,
so no two address operations of a unit interleave, and their outcome comes back as the next event;
etcd actions and announcements run as child tasks (vipd/ownership/tasks.py) whose results are
posted as events, so a fence never waits on etcd. Every timer is the core's `wakeup(state)`.
"""

from __future__ import annotations

import math
from typing import Any, Awaitable, Callable, Sequence

import trio

from vipd import log
from vipd.errors import AddressError, DataplaneError
from vipd.fence import Fence, LifetimeFence, whole_seconds_before
from vipd.model import (Action, AddressAdded, AddressFailed, AddressRemoved, Announce, ArmFence, Campaign,
                        ClaimAddress, ClaimDeferred, DeleteOwnerKey, Event, HoldOff, LeaseValid, ProbeConflicts,
                        ProbeDone, Reconcile, RemoveAddress, RemoveFailed, RenewLease, RequestPreempt,
                        ReturnPreemptToken, Start, State, StopAnnouncing, TakeOver, Tick, Unit, VipSpec)
from vipd.ownership import fsm
from vipd.ownership.ports import (AddressPort, AnnouncePort, ConflictPort, GatePort, HooksPort, KeysPort, LeasePort,
                                  MetricsPort, TakeoverPort, NoLease)
from vipd.ownership.state import HOLDING, Params, Sub, VipState, wakeup
from vipd.ownership.tasks import ChildTasks
from vipd.takeover import takeover


class Controller(ChildTasks):
    """Owns one election unit: a VIP, or the VIPs of a group, always held together."""

    def __init__(self, unit: Unit, params: Params, addresses: AddressPort, announcer: AnnouncePort,
                 keys: KeysPort, metrics: MetricsPort, lifetime: LifetimeFence, *,
                 fences: Sequence[Fence] = (), conflicts: ConflictPort | None = None,
                 hooks: HooksPort | None = None, preempt_gate: GatePort | None = None,
                 lease: LeasePort | None = None, healthy: bool = True,
                 ownership: Callable[[Sequence[VipSpec], bool], None] | None = None,
                 holdoff: Callable[[str, bool], None] | None = None,
                 takeover: TakeoverPort | None = None) -> None:
        self.name = unit.name
        self.vips = unit.vips
        # (for the log lines, formatted once: a stopping host logs a transition for every unit)
        self.addresses = ",".join(str(v.address) for v in unit.vips)
        self.params = params
        self._addresses = addresses
        self._announcer = announcer
        self._keys = keys
        self._metrics = metrics
        self._lifetime = lifetime
        self._fences = [f for f in fences if f.covers(unit.vips)]
        self.fences = tuple(self._fences)  # (vipd/refresh.py arms the same ones, without asking again)
        self._conflicts = conflicts
        self._hooks = hooks
        self._gate = preempt_gate
        self._lease = lease or NoLease()
        self._ownership = ownership  # told when we start/stop owning (duplicate-responder watch)
        self._holdoff = holdoff  # publishes this host's release hold-off for the unit (presence)
        self._takeover = takeover
        self.state = VipState(healthy=healthy)  # replaced by every step, through _set_state only
        self.on_state: Callable[[str], None] | None = None  # told each time (vipd/parked.py)
        self._peer_takeover = False  # this acquisition replaced a suspect owner's key (not a deletion)
        self._send, self._recv = trio.open_memory_channel[Event](math.inf)
        self._announcing = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._busy = False  # inside handle(): kernel actions of a step in progress
        self._remove_failed = False  # the last address removal failed (an address may remain)
        self._wait: trio.CancelScope | None = None  # the receive's timer, while the task waits
        # the newest keepalive not stepped yet: taken before the unit's next event (a marker in the
        # channel wakes the task for it, unless defer_lease kept it without one)
        self._kept: LeaseValid | None = None
        self._lease_marked = False  # a LeaseValid marker is in the channel
        self._queued = 0  # events in the channel
        self.stopped = trio.Event()

    def post(self, ev: Event) -> None:
        """Queue an event; never blocks. A LeaseValid still queued is replaced by a newer one
        instead (keepalives are monotonic: a busy unit takes the newest, not a backlog)."""
        if isinstance(ev, LeaseValid):
            self._kept = ev
            if self._lease_marked:
                return
            self._lease_marked = True
        self._queued += 1
        self._send.send_nowait(ev)

    def defer_lease(self, ev: LeaseValid) -> bool:
        """A keepalive for a unit that holds nothing and knows this lease already: nothing to arm
        and no timer of its state depends on the lease's validity, so it is kept, not stepped, and
        taken before the unit's next event (no wake-up: thousands of units, a keepalive every
        TTL/10). False: step it now (holding, or a new lease)."""
        if self.state.state in HOLDING or ev.lease != self.state.lease or not ev.lease:
            return False
        self._kept = ev
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self.handle(Start())
            task_status.started()
            while self.state.state is not State.STOPPED:
                ev = await self._next()
                if ev is not None:
                    await self.handle(ev)
            self._announcing.cancel()
            nursery.cancel_scope.cancel()
        self.stopped.set()

    async def _next(self) -> Event | None:
        """The next event, or Tick at the state's timer. A queued LeaseValid goes ahead of a timer
        that has passed: a unit busy with a long step (a claim in a batch of thousands) takes the
        keepalive that extends its deadline before the deadline's Tick fences it. None: a
        LeaseValid marker whose lease was taken that way already."""
        now = trio.current_time()
        wake = wakeup(self.params, self.state, now)
        if wake is not None and wake <= now and self._kept is not None:
            taken, self._kept = self._kept, None
            return taken
        ev: Event = Tick()
        with trio.move_on_at(wake if wake is not None else math.inf) as self._wait:
            ev = await self._recv.receive()
            self._queued -= 1
        self._wait = None
        if isinstance(ev, LeaseValid):  # the marker: the newest keepalive, unless taken already
            self._lease_marked = False
            latest, self._kept = self._kept, None
            return latest
        return ev

    async def handle(self, first: Event) -> None:
        """Step the core with one event and with every outcome its kernel actions report."""
        queue = [first]
        self._busy = True
        try:
            while queue:
                ev = queue.pop(0)
                if self._kept is not None and not isinstance(ev, LeaseValid):
                    # a keepalive not stepped yet (kept by defer_lease, or arrived during the last
                    # action: a probe, a claim batch): first, so the event meets the lease as it is now
                    queue.insert(0, ev)
                    ev, self._kept = self._kept, None
                old = self.state
                new, actions = fsm.step(self.params, old, ev, trio.current_time())
                self._set_state(new)
                if self.state.state is State.BACKUP and self.state.sub is not Sub.TAKING_OVER:
                    self._peer_takeover = False  # a takeover attempt that did not win
                self._log_step(old, ev, actions)
                for action in actions:
                    follow = await self._do(action)
                    if follow is not None:
                        queue.append(follow)
        finally:
            self._busy = False

    def offer(self, ev: Event) -> None:
        """post(), except that an event which only updates what the unit notes (a placement, a
        peer suspected, an owner record: the step keeps the state and sub-state and asks for
        nothing) is stepped right here, without waking the task: a host-wide event reaches
        thousands of units at once, and each wake-up is a task switch and a channel receive."""
        if isinstance(ev, LeaseValid) or self._kept is not None:
            self.post(ev)  # (a kept keepalive is stepped before any other event, by the task)
        else:
            self._step_here(ev, (), same_sub=True)

    def step_if_idle(self, ev: Event, only: tuple[type, ...]) -> list[Action] | None:
        """Step the core with `ev` right here, without waking the task (vipd/refresh.py: one
        keepalive refreshes every unit in one batch): only while the task waits for its next event
        and only when the step keeps the state and asks for actions of the types `only`, which
        the caller then carries out. Otherwise `ev` is posted as usual and None returned."""
        actions = self._step_here(ev, only, same_sub=False)
        if actions is not None:
            self._kept = None  # (older than ev)
        return actions

    def _step_here(self, ev: Event, only: tuple[type, ...], *, same_sub: bool) -> list[Action] | None:
        wait = self._wait
        if wait is None or self._busy or self._queued:
            self.post(ev)
            return None
        now = trio.current_time()
        new, actions = fsm.step(self.params, self.state, ev, now)
        if (new.state is not self.state.state or (same_sub and new.sub is not self.state.sub)
                or any(not isinstance(a, only) for a in actions)):
            self.post(ev)  # the step is pure: the task takes it again, with its actions
            return None
        old = self.state
        self._set_state(new)
        self._log_step(old, ev, actions)
        wake = wakeup(self.params, new, now)
        wait.deadline = wake if wake is not None else math.inf
        return actions

    def _set_state(self, new: VipState) -> None:
        self.state = new
        if self.on_state is not None:
            self.on_state(self.name)

    @property
    def address_gone(self) -> bool:
        """Every address of the unit is out of the kernel for good (a stop may revoke the lease):
        its last removal did not fail, and it is past it (RELEASING with only the key left, or
        STOPPED with every action of its last step done). A unit stopped after a failed removal (a
        fenced one) is not: its address may serve until its lifetime ends."""
        s = self.state
        if self._remove_failed:
            return False
        if s.state is State.RELEASING:
            return s.sub in (Sub.DELETING, Sub.RETRY_DELETE)
        return s.state is State.STOPPED and (self.stopped.is_set() or not self._busy)

    @property
    def valid_until(self) -> float:
        """The unit's lease validity, counting a keepalive kept for it (defer_lease)."""
        kept = self._kept
        return kept.valid_until if kept is not None and kept.lease == self.state.lease else self.state.valid_until

    def _log_step(self, old: VipState, ev: Event, actions: list[Action]) -> None:
        new = self.state
        if isinstance(ev, Reconcile) and ev.missing and old.state is State.OWNER and new.state is State.OWNER:
            if any(isinstance(a, ClaimAddress) for a in actions):
                log.warning("address_missing", vip=self.name, address=self.addresses, action="re-adding")
            elif not actions and not fsm.stale(old, ev):  # (a snapshot from before our last claim says nothing)
                log.info("address_expired", vip=self.name, address=self.addresses, reason="lease not renewed")
        if new.why_not != old.why_not and new.why_not and new.owner is not None and new.owner.node is None:
            log.info("not_campaigning", vip=self.name, reason=new.why_not)
        if new.state is not old.state:
            self._transitioned(old, ev)

    def _transitioned(self, old: VipState, ev: Event) -> None:
        new = self.state
        if self._ownership is not None and State.OWNER in (old.state, new.state):
            self._ownership(self.vips, new.state is State.OWNER)  # before any address is removed
        self._metrics.record_transition(self.name, old.state, new.state)
        self._metrics.set_epoch(self.name, new.epoch)
        took = takeover(self.params.node, new, trio.current_time()) if new.state is State.OWNER else None
        if took is not None and not self._peer_takeover:  # a peer takeover is counted by vipd/succession.py
            self._metrics.record_takeover(self.name, *took)
        if new.state is not State.ACQUIRING:
            self._peer_takeover = False
        owner = new.owner.node if new.owner else None
        hook = ("owner" if new.state is State.OWNER else "fenced" if new.state is State.FENCED
                else "fault" if isinstance(ev, (AddressFailed, ProbeDone))
                else "backup" if old.state in (State.OWNER, State.RELEASING) else None)
        if hook and self._hooks is not None:
            for vip in self.vips:
                self._hooks.fire(hook, vip=self.name, address=vip.address, interface=vip.interface,
                                 reason=new.reason or type(ev).__name__, epoch=new.epoch or old.epoch)
        log.info("transition", vip=self.name, address=self.addresses, **{"from": old.state.value},
                 to=new.state.value, reason=new.reason or type(ev).__name__, epoch=new.epoch or None,
                 lease=f"{new.lease:x}" if new.lease else None, owner=owner)

    # ---- actions ------------------------------------------------------------------------------
    async def _do(self, action: Action) -> Event | None:
        if isinstance(action, ProbeConflicts):
            return await self._probe()
        if isinstance(action, ClaimAddress):
            return await self._claim(action.until)
        if isinstance(action, ArmFence):
            return await self._arm(action.until)
        if isinstance(action, RemoveAddress):
            return await self._remove()
        if isinstance(action, Announce):
            self._announcing.cancel()
            self._announcing = trio.CancelScope()
            self._spawn(self._announce_all, self._announcing)
        elif isinstance(action, StopAnnouncing):
            self._announcing.cancel()
        elif isinstance(action, Campaign):
            self._spawn(self._campaign, action.lease)
        elif isinstance(action, TakeOver):
            self._peer_takeover = not action.record.released  # (a hand-back is counted here, like a campaign)
            self._spawn(self._take_over, action.record, action.lease)
        elif isinstance(action, DeleteOwnerKey):
            self._spawn(self._delete_key, action.epoch, action.lease, action.leave)
        elif isinstance(action, HoldOff):
            if self._holdoff is not None:
                self._holdoff(self.name, action.active)
        elif isinstance(action, RenewLease):
            self._lease.renew()
        elif isinstance(action, RequestPreempt):
            self._spawn(self._preempt_token, action.target)
        elif isinstance(action, ReturnPreemptToken):
            if self._gate is not None:
                self._gate.release()
        return None

    async def _probe(self) -> Event:
        """RFC 5227 ARP probe / IPv6 DAD for every NIC address before the first claim."""
        for vip in self.vips:
            if self._conflicts is None or vip.on_loopback:
                continue
            try:
                await self._conflicts.check_free(vip)
            except AddressError as e:
                self._metrics.count_conflict(self.name)
                log.error("address_conflict", vip=self.name, address=vip.address, interface=vip.interface,
                          error=e, mac=getattr(e, "mac", None))
                return ProbeDone(conflict=str(e))
            except DataplaneError as e:
                log.warning("conflict_probe_failed", vip=self.name, address=vip.address, error=e)
        return ProbeDone()

    async def _claim(self, until: float) -> Event:
        # the lifetime is computed now, from the deadline: a slow probe or netlink call before this
        # point must never stretch the address past the fence deadline
        if whole_seconds_before(until, trio.current_time()) < 1:
            log.info("address_claim_deferred", vip=self.name, address=self.addresses,
                     reason="less than 1 s of lease left; renewing the lease now")
            return ClaimDeferred()
        await self._arm_tokens(until)
        for vip in self.vips:
            life = whole_seconds_before(until, trio.current_time())
            try:
                if life < 1:
                    return ClaimDeferred()
                await self._addresses.claim(vip, life)
            except DataplaneError as e:
                self._metrics.count_dataplane_error(self.name, "claim")
                log.error("address_claim_failed", vip=self.name, address=vip.address, error=e)
                return AddressFailed(str(e))
        self._lifetime.claimed(self.vips, until)
        return AddressAdded()

    async def _arm(self, until: float) -> Event | None:
        await self._arm_tokens(until)
        try:
            await self._lifetime.arm(self.vips, until)
        except DataplaneError as e:
            self._metrics.count_dataplane_error(self.name, "claim")
            log.error("address_refresh_failed", vip=self.name, address=self.addresses, error=e)
            return AddressFailed(str(e))
        return None

    async def _arm_tokens(self, until: float) -> None:
        for fence in self._fences:
            try:
                await fence.arm(self.vips, until)
            except DataplaneError as e:  # it ends at its previous deadline: loud, never unsafe
                self._metrics.count_dataplane_error(self.name, "fence")
                log.error("fence_arm_failed", vip=self.name, fence=type(fence).__name__, error=e)

    async def _remove(self) -> Event:
        failed: DataplaneError | None = None
        for fence in [*self._fences, self._lifetime]:
            try:
                await fence.disarm(self.vips)
            except DataplaneError as e:  # its deadline ends it anyway
                self._metrics.count_dataplane_error(self.name, "fence")
                log.error("fence_disarm_failed", vip=self.name, fence=type(fence).__name__, error=e)
        for vip in self.vips:  # remove every address even if one fails
            try:
                await self._addresses.release(vip)
            except DataplaneError as e:
                self._metrics.count_dataplane_error(self.name, "remove")
                log.error("address_remove_failed", vip=self.name, address=vip.address, error=e)
                failed = e
        self._remove_failed = failed is not None
        return RemoveFailed(str(failed)) if failed else AddressRemoved()

    def _spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

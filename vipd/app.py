"""The supervisor: root nursery, signals, sd_notify, one controller per VIP, reconcile, metrics."""

from __future__ import annotations

import math
import os
import signal

import trio

from vipd import log, shutdown, signals, systemd
from vipd.config import Config, check_host
from vipd.lease_gate import KeepaliveGate
from vipd.model import Unit
from vipd.dataplane.address import AddressManager, RefreshBatcher
from vipd.dataplane.announce import Announcer
from vipd.dataplane.conflict import check_free, probe_many
from vipd.dataplane.duplicates import DuplicateResponderWatch
from vipd.dataplane.start_probe import StartProbe
from vipd.dataplane.netlink import Netlink
from vipd.election.etcd import EtcdClient
from vipd.election.hosts import HostDirectory
from vipd.election.lease import HostLease, forget_recorded_lease, lease_record_path, read_recorded_lease
from vipd.election.owners import OwnerKeys
from vipd.errors import DataplaneError, EtcdError
from vipd.fitness import Fitness
from vipd.interfaces import InterfaceWatch
from vipd.drain import Drain
from vipd.reload import Reloader
from vipd.routing import Routing
from vipd.handover import HandoverGate
from vipd.hooks import HookRunner
from vipd.heap import collector_held, freeze_heap
from vipd.loopwatch import LoopWatch, TaskTimes
from vipd.metrics import Metrics, serve
from vipd.model import (Event, OwnerObserved, Placement, ReleaseRequested, ShutdownRequested,
                        State)
from vipd.fence import Fence, LifetimeFence
from vipd.ownership.controller import Controller
from vipd.ownership.state import Params
from vipd import control
from vipd.dataplane.fence_nft import NftFence
from vipd.election.hosts import HostInfo
from vipd.peers.protocol import Event as PeerEvent
from vipd.peers.grants import GrantWriter
from vipd.peers.metrics import PeerCollector
from vipd.peers.service import PeerService
from vipd.pacing import Pacer
from vipd.succession import Succession
from vipd.suspicions import Suspicions
from vipd.wiring_dsr import DsrWiring
from vipd.wiring_duplicates import DuplicateWatching
from vipd.wiring_l2 import L2Gate
from vipd.hostview import UnitIndex
from vipd.kernel_view import KernelView
from vipd.refresh import BatchedFence, HostLifetimeFence, HostRefresh, Inflight, lazy_timing

# a LAN answers an ARP probe in well under a millisecond: 2 x 0.1 s is plenty, and keeps a takeover
# after a crash short
PROBE_WAIT = 0.1
SHUTDOWN_GRACE = shutdown.SHUTDOWN_GRACE  # seconds the controllers get to remove addresses and give keys back


class Daemon(KernelView, DuplicateWatching):
    def __init__(self, cfg: Config, client: EtcdClient, nl: Netlink, path: str | None = None) -> None:
        self.cfg = cfg
        self.client = client
        self.metrics = Metrics(cfg.node)
        self.addresses = AddressManager(nl)
        self.announcer = Announcer(nl)
        self.nl = nl
        self.keys = OwnerKeys(client, cfg.etcd.prefix, cfg.node)
        self.routing = Routing(cfg, nl, self.addresses, client)

        # fast takeover (vipd/succession.py): a token fence on the VIPs' NICs, bounded by the successor's acks
        self.nft = NftFence(nl) if cfg.peers.enabled else None
        self.peers = PeerService(cfg, client, nl, self._peer_event)  # type: ignore[arg-type]
        self.succession = Succession(cfg.node, self.nft, self.keys, self.peers,  # type: ignore[arg-type]
                                     lease=cfg.peers.lease, interval=cfg.peers.interval,
                                     placement=lambda u: self.directory.successors.get(u, ()),
                                     broadcast=self.tell, metrics=self.metrics)
        if self.nft is None:
            self.succession.enabled = False
        self.keys.listeners.append(self.succession.observe)
        self.suspicions = Suspicions(lambda: self.controllers, self.post)
        # NIC VIPs probe for a conflict before their first claim: their campaigns go first, so the
        # probe's wait overlaps the routed VIPs' campaigns and claims rather than following them
        self.keys.rank_campaigns(self._campaign_rank)
        self.metrics.registry.register(PeerCollector(
            lambda: self.peers.transport.peers.links if self.peers.transport else {}, self.nft, self.succession,
            lambda: self.peers.transport.grants if self.peers.transport else None))

        self.hooks = HookRunner.from_config(cfg.hooks, node=cfg.node)
        self.fitness = Fitness(cfg, self.post, lambda: self.lease.presence_changed(), self.metrics, nl)
        gate = HandoverGate(cfg.placement.handover_batch)  # handovers to preferred hosts in flight, per host
        inflight = Inflight()  # host-level refresh batches (vipd/refresh.py): disarms wait for them
        self.lifetime: LifetimeFence = HostLifetimeFence(RefreshBatcher(self.addresses), inflight)
        self.dsr = DsrWiring(cfg, nl, self.metrics.registry, self.fitness)
        self.l2 = L2Gate(cfg, nl, self.metrics, self.fitness)
        self._units_gate = KeepaliveGate()  # keepalives reach the units once they run (see run)
        # every fence a controller arms is also armed by the host-level refresh (the DSR deadline too)
        batched = [BatchedFence(f, inflight) for f in [self.routing, *self.dsr.fences]
                   + ([self.succession] if self.nft is not None else [])]  # type: ignore[list-item]
        self._fences: list[Fence] = list(batched)
        self._gate = gate
        self.controllers = {u.name: self.controller(u, self.fitness.initial(u.name)) for u in cfg.units}
        self.lease = HostLease(client, ttl=cfg.etcd.lease_ttl, keepalives_per_ttl=cfg.timing.keepalives_per_ttl,
                               presence_key=f"{cfg.etcd.prefix}hosts/{cfg.node}", presence=self.fitness.presence,
                               publish=self.l2.gate(self._units_gate.gate(lambda ev: self.refresh.publish(ev))),
                               metrics=self.metrics,
                               record_path=lease_record_path(cfg))
        self.duplicates: dict[str, DuplicateResponderWatch] = {}
        self.watch_duplicates_of(nl, cfg.vips)  # (run() runs every watch)
        self.start_probe = StartProbe(lambda ifname, ips: probe_many(nl, ifname, ips, wait=PROBE_WAIT),
                                      lambda vip: check_free(nl, vip, wait=PROBE_WAIT))
        hold, catch_up_after = lazy_timing(cfg.etcd.lease_ttl / cfg.timing.keepalives_per_ttl)
        self.pacer = Pacer(self._offer)  # host-wide deliveries, ~PER_TURN per trio batch (vipd/pacing.py)
        self.refresh = HostRefresh(self.controllers, self.lifetime, batched, self.addresses, self.metrics, inflight,
                                   hold=hold, catch_up_after=catch_up_after, pacer=self.pacer)
        self.index = UnitIndex(self.controllers)  # rebuilt by a reload that adds or removes units
        self._reconcile_now = trio.Event()  # a kernel event overflow: reconcile before the next tick
        self._present: set[str] = set()  # VIP names in the kernel: the last relist, then notifications
        self._running: list[Controller] = []  # started controllers (a stop during startup waits for these)
        self.directory = HostDirectory(client, cfg.etcd.prefix, cfg.units, self._deliver_placement, self._hosts)
        self.directory.listeners.append(self.succession.placement_changed)
        self.fitness.peer_address = lambda: self.peers.address
        self.interfaces = InterfaceWatch(nl, self.fitness, lambda: self.cfg.units)
        self.drain = Drain(self)
        self.reloader = Reloader(self, path)

    def params(self, u: Unit) -> Params:
        cfg, pl = self.cfg, self.cfg.placement
        return Params(cfg.node, cfg.timing.fence_margin, cfg.timing.release_holdoff,
                      pl.preempt_delay if pl.preempt else None, pl.campaign_stagger, pl.join_grace, u.anycast,
                      conflict_check=any(v.conflict_check and not v.on_loopback for v in u.vips),
                      takeover=self.nft is not None and not u.anycast and self.nft.covers(u.vips))

    def controller(self, u: Unit, healthy: bool) -> Controller:
        return Controller(u, self.params(u), self.addresses, self.announcer, self.keys, self.metrics,
                          self.lifetime, fences=self._fences, conflicts=self, hooks=self.hooks, preempt_gate=self._gate,
                          lease=self, healthy=healthy, ownership=self.owning, holdoff=self.fitness.hold,
                          takeover=self.succession)

    def _campaign_rank(self, unit: str) -> int:
        """0 for a unit with a VIP on a NIC (it probes before claiming), else 1; read from the
        running controllers, so units a reload adds are ranked too."""
        c = self.controllers.get(unit)
        return 0 if c is not None and any(not v.on_loopback for v in c.vips) else 1

    def _hosts(self, hosts: dict[str, HostInfo]) -> None:
        self.peers.set_hosts({n: h.peer for n, h in hosts.items()})
        self.dsr.update_hosts(hosts)

    def _peer_event(self, ev: PeerEvent) -> None:
        self.succession.on_peer_event(ev)

    async def start_fast_takeover(self, nursery: trio.Nursery) -> None:
        """The token fence's table, then the heartbeats (their key may wait for etcd), then successors."""
        if self.nft is None:
            return
        try:
            await self.nft.ensure(self.cfg.vips)
        except DataplaneError as e:
            self.succession.disable(f"nftables token fence unavailable: {e}")
            return
        ip = await self.peers.resolve()
        if ip is None:
            self.succession.disable("no IPv4 address for heartbeats on the VIPs' interface (set [peers] address)")
            return

        async def heartbeats() -> None:
            try:
                async with trio.open_nursery() as inner:
                    await inner.start(self.peers.run, ip)
                    transport, nft = self.peers.transport, self.nft
                    if transport is not None and nft is not None:  # grants re-armed as echoes arrive
                        transport.grants = GrantWriter(nft.nl.netns, nft.timeout_update, transport.clock,
                                                       2 * self.cfg.peers.interval)
                        nft.grant_source = transport.grants.written
                    self.lease.presence_changed()  # publish our heartbeat address
            except OSError as e:  # bind failed: the address or port is not usable
                self.succession.disable(f"heartbeat socket on {ip}:{self.cfg.peers.port}: {e.strerror or e}")

        nursery.start_soon(heartbeats)
        await nursery.start(self.succession.run)

    async def check_free(self, vip) -> None:  # type: ignore[no-untyped-def]
        await self.start_probe.check_free(vip)  # (the start's answer, once and fresh; else a probe now)

    def renew(self) -> None:
        self.lease.renew()

    def post(self, unit: str, ev: Event) -> None:
        """A host-level event for one unit, paced (vipd/pacing.py)."""
        self.pacer.post(unit, ev)

    def _offer(self, unit: str, ev: Event) -> None:
        c = self.controllers.get(unit)
        if c is not None:  # None: a reload just removed it
            c.offer(ev)

    def broadcast(self, ev: Event) -> None:
        for name in list(self.controllers):
            self.pacer.post(name, ev)

    def tell(self, ev: Event) -> None:
        """Peer suspicions to the units they concern (vipd/suspicions.py); anything else to all."""
        if not self.suspicions.tell(ev):
            self.broadcast(ev)

    def release(self, name: str, reason: str = "operator request") -> str:
        c = self.controllers[self.cfg.unit_of(name)]  # KeyError: no such VIP or group
        if c.state.state not in (State.OWNER, State.ACQUIRING):
            return f"not owner ({c.state.state.value})"
        c.post(ReleaseRequested(reason))
        return "releasing"

    def status(self) -> dict[str, dict[str, object]]:
        now = trio.current_time()
        return {name: {"state": c.state.state.value, "sub": c.state.sub.value, "epoch": c.state.epoch,
                       "why_not": c.state.why_not or None,
                       "owner": c.state.owner.node if c.state.owner else None,
                       "lease_left": round(max(0.0, c.valid_until - now), 3) if c.state.lease else 0.0,
                       "successor": self.succession.successor(name) if c.state.state is State.OWNER else None,
                       "unfit": self.fitness.reasons(name) or None, "dsr": self.dsr.status(c.vips),
                       "unavailable": self.fitness.unavailable(name) or None}
                for name, c in self.controllers.items()}

    async def revoke_recorded(self) -> None:
        """A previous run's lease (crash without ExecStopPost): its addresses are gone, so revoke it."""
        old = read_recorded_lease(lease_record_path(self.cfg))
        if old is None:
            return
        try:
            with trio.move_on_after(2 * self.cfg.etcd.request_timeout):
                await self.client.revoke(old)
                log.info("previous_lease_revoked", lease=f"{old:x}")
        except EtcdError as e:
            log.warning("previous_lease_revoke_failed", lease=f"{old:x}", error=e)
        forget_recorded_lease(lease_record_path(self.cfg))

    async def watchdog(self, interval: float) -> None:
        """Feed systemd's watchdog only while the loop runs and the netlink thread answers."""
        while True:
            with trio.move_on_after(interval) as scope:
                await self.nl.call(lambda ipr: None)
            if not scope.cancelled_caught:
                systemd.notify("WATCHDOG=1")
            await trio.sleep(interval)

    async def stop_on_signal(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
            early = signals.early()
            if early is not None:
                log.info("signal", signal=signal.Signals(early).name, during="startup")
            else:
                async for signum in sigs:
                    log.info("signal", signal=signal.Signals(signum).name)
                    break
        await self.stop()
        scope.cancel()

    async def stop(self) -> None:
        """Bounded (vipd/shutdown.py): remove addresses and mark keys released, then revoke the lease
        (it deletes the keys), only once no unit's address can remain; else the lease path."""
        systemd.notify("STOPPING=1", "STATUS=releasing VIPs")
        # first, the presence says this host is leaving (drained, units untouched: they stop below):
        # the others' placement drops it at once, so no host names it successor of a unit while it
        # stops, and the units it succeeds are renamed while its heartbeats still grant them (the
        # wait below, before the revoke). Named successor of VIPs taken over from it, it exited with their grant: their
        # fence closed and their announcements were refused until a rename; a stopped standby's
        # owner went dark for 20-40 ms (tests/lab/test_fast_takeover.py, 40 VIPs: 3 of 3 before)
        self.directory.stop_placing()  # (no Placement reaches a unit from now on)
        self.fitness.stopping()
        self.succession.begin_stop()  # no token is armed from now on; one flush removes them all below
        self.broadcast(ShutdownRequested(revoke=True))  # the lease is revoked after: keys are only marked
        hung: list[shutdown.Stoppable] = []

        async def units() -> None:
            hung.extend(await shutdown.wait_stopped(self._running))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.succession.flush_tokens)  # (each unit's disarm waits for it)
            nursery.start_soon(units)
            if self.succession.enabled:  # our heartbeats grant other owners' tokens until they rename,
                # and the revoke deletes our presence: their link to us, and with it the grant, goes
                nursery.start_soon(shutdown.within, shutdown.SHUTDOWN_GRACE, self.succession.unnamed)
        if not hung:
            await shutdown.revoke(self.client.revoke, self.lease.lease_id, 2 * self.cfg.etcd.request_timeout,
                                  lambda: forget_recorded_lease(lease_record_path(self.cfg)))
        if not hung:  # else the fences (egress, tokens) keep fencing a unit that did not let go, to their deadlines
            if self.peers.transport is not None and self.peers.transport.grants is not None:
                self.peers.transport.grants.stopped = True  # (our VIPs are gone: no grant bounds anything)
            await shutdown.drop_tables([t for t in (self.routing.nft, self.nft) if t is not None])
        with trio.move_on_after(shutdown.HOOK_GRACE):
            await self.hooks.wait_idle()  # let the "backup" hooks of the release finish

    async def run(self) -> None:
        if self.cfg.bgp.source is not None:
            self.routing.source = self.cfg.bgp.source  # known before start: keep it through remove_stale
        async with trio.open_nursery() as nursery:
            # first, so that SIGTERM during startup (etcd unreachable) still stops cleanly
            nursery.start_soon(self.stop_on_signal, nursery.cancel_scope)
            await nursery.start(self.reloader.serve, nursery)  # SIGHUP: from now on never fatal
            await nursery.start(self.pacer.run)
            # the wire's answers first (they only need the link): they take ~0.3 s, and no unit claims before
            nursery.start_soon(self.l2.run)  # units learn of the lease only once it is done (L2Gate.gate)
            nursery.start_soon(self.start_probe.run, [v for v in self.cfg.vips if v.conflict_check])
            await self.remove_stale()
            await self.revoke_recorded()
            await self.routing.start()
            self.fitness.bgp_source = str(self.routing.source or "")
            await self.start_fast_takeover(nursery)
            if self.cfg.metrics_listen:
                await nursery.start(serve, self.metrics, self.cfg.metrics_listen)
            await nursery.start(control.serve, self, self.cfg.control_socket)
            await nursery.start(self.hooks.run)
            await nursery.start(self.dsr.run)  # the director's maps exist before a controller arms them
            self.drain.restore()  # a drained host stays drained across restarts
            await self.interfaces.refresh()  # a missing NIC's VIPs unfit before any campaign
            granted = trio.Event()
            nursery.start_soon(self._take_lease, nursery, granted)
            with collector_held():
                await self._start_controllers(nursery)
            nursery.start_soon(self.fitness.run)
            for watch in self.duplicates.values():
                nursery.start_soon(self.run_duplicate_watch, watch)
            nursery.start_soon(self.watch_kernel)
            systemd.notify("STATUS=waiting for etcd")
            await nursery.start(self.keys.watch, list(self.controllers), self._deliver_owner)
            await nursery.start(self.directory.run)
            await nursery.start(self.refresh.run)
            await granted.wait()
            self._units_gate.open()  # the grant's keepalive (or a newer one) reaches the units now
            nursery.start_soon(self.lease.sync_presence)
            nursery.start_soon(self.reconcile)
            interval = systemd.watchdog_interval()
            if interval:
                nursery.start_soon(self.watchdog, interval)
            systemd.notify("READY=1", f"STATUS=running: {len(self.controllers)} VIPs")
            self.reloader.ready.set()
            frozen = freeze_heap()  # (once: vipd/heap.py)
            log.info("ready", node=self.cfg.node, vips=len(self.controllers), lease=f"{self.lease.lease_id:x}",
                     ttl=self.lease.granted_ttl, heap_frozen=frozen)
        log.info("stopped", node=self.cfg.node)

    async def _take_lease(self, nursery: trio.Nursery, granted: trio.Event) -> None:
        """The lease and this host's presence as early as the host's fitness is known, while the
        controllers start (~1 s at 3,000 VIPs here): hosts started together then see each other
        before any of them campaigns, and place every VIP over all of them, instead of the first
        one up taking every VIP and preemption moving two thirds of them again (bench/scale.py).
        Its keepalives reach the units only once they run and the owner keys and placement are
        known (`_units_gate`)."""
        await nursery.start(self.lease.run)
        granted.set()

    async def _start_controllers(self, nursery: trio.Nursery) -> None:
        """Start every controller at once (each one's Start removes leftovers: one batch for all)."""
        async def start(c: Controller) -> None:
            await nursery.start(c.run)
            self._running.append(c)

        async with trio.open_nursery() as starting:
            for c in self.controllers.values():
                starting.start_soon(start, c)

    def _deliver_owner(self, name: str, record) -> None:  # type: ignore[no-untyped-def]
        if name not in self.reloader.rewatched:  # a unit a reload started has a watch of its own
            self.post(name, OwnerObserved(record))
            self.suspicions.after_owner(name, record)

    def _deliver_placement(self, name: str, ranking: tuple[str, ...]) -> None:
        joined = self.directory.joined
        self.post(name, Placement(ranking, tuple(joined.get(h, -math.inf) for h in ranking)))
        self.suspicions.after_placement(name, ranking)


async def run(cfg: Config, path: str | None = None) -> None:
    check_host(cfg, allow_missing_interfaces=True)
    async with Netlink() as nl, EtcdClient.from_config(cfg.etcd) as client:
        with collector_held():
            daemon = Daemon(cfg, client, nl, path)
        # A grant is re-armed when it has moved 2 heartbeats (vipd/succession_tokens.py), so right
        # before a re-arm it has about L - 2h left: a batch longer than that can let it lapse and
        # blink this host's VIPs (vipd_fence_token_lapses_total counts it); name such batches.
        watch = LoopWatch(daemon.metrics.registry, warn=max(0.01, cfg.peers.lease - 2 * cfg.peers.interval))
        trio.lowlevel.add_instrument(watch)
        daemon.peers.loop_busy_since = watch.busy_since  # (the heartbeat thread: no check-in wake-ups)
        daemon.peers.wants_ack = daemon.succession.wants_ack  # (nor an ack's wake-up the loop does not need)
        if os.environ.get("VIPD_LOOP_TASKS") == "1":  # a diagnostic (vipd/loopwatch.py TaskTimes)
            trio.lowlevel.add_instrument(TaskTimes(watch.warn))
        watch.start_gc_watch()
        try:
            await daemon.run()
        finally:
            watch.stop_gc_watch()
            await daemon.routing.aclose()
            if daemon.nft is not None:
                await daemon.nft.aclose()
            await daemon.dsr.aclose()

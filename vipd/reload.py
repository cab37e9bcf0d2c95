"""SIGHUP (`systemctl reload vipd`) and `vipd reload`: re-read the config and apply the difference.

Contract:
- The new file is loaded and checked against this host exactly as at start (`config.load`,
  `check_host` with missing interfaces allowed). Invalid, or changing a setting only a restart can
  change (vipd/reload_diff.py: RESTART), it is refused as a whole with one log line naming the key
  and the reason (`reload_refused`), and the running config stays: nothing is touched.
- A unit that did not change is never touched: no event, no transition, no address change.
- Retuned units (checks, prefer/avoid, announcements) get their new definition in place; their
  controllers see no transition (new checks do not count against them until their first verdict).
- Removed and replaced units are released like at a stop (address removed, key handed back marked
  clean, so another host takes over at once without a conflict probe) and their controllers end;
  replaced and added units then start new controllers in the daemon's nursery, which campaign as
  usual (placement, health, lease events reach them like any other).
- Live timing (release_holdoff, campaign_stagger, join_grace, preempt, preempt_delay, handover_batch,
  reconcile_interval), host
  weight and checks, hooks and the log level apply at once.
- One reload at a time; a SIGHUP during startup is kept and applied once the daemon is ready.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Any

import trio

from vipd import config, log, signals
from vipd.errors import ConfigError, DataplaneError
from vipd.model import OwnerObserved, OwnerRecord, ShutdownRequested, Tick, Unit
from vipd.hostview import UnitIndex
from vipd.reload_diff import Diff, diff

if TYPE_CHECKING:
    from vipd.app import Daemon

STOP_WARN_AFTER = 5.0  # s: a unit still releasing after this is logged (its replacement waits for it)


class ReloadRefused(ConfigError):
    """The new config is invalid, or changes what only a restart can change."""


class Reloader:
    def __init__(self, daemon: "Daemon", path: str | None) -> None:
        self._d = daemon
        self.path = path
        self.ready = trio.Event()  # set by the daemon once every startup task runs
        self._lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self._extra_watch: trio.CancelScope | None = None  # owner-key watch of units started by reloads
        self.rewatched: frozenset[str] = frozenset()  # ... their names (the start-up watch's are dropped)

    async def serve(self, nursery: trio.Nursery, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Take SIGHUP from now on (queued until the daemon is ready), reload on each."""
        self._nursery = nursery
        with trio.open_signal_receiver(signal.SIGHUP) as hups:
            task_status.started()
            await self.ready.wait()
            if signals.early_reload():
                log.info("signal", signal="SIGHUP", during="startup")
                await self.reload_logged()
            async for _ in hups:
                log.info("signal", signal="SIGHUP")
                await self.reload_logged()

    async def reload_logged(self) -> str:
        try:
            return await self.reload()
        except ConfigError as e:
            return f"refused: {e}"

    async def reload(self) -> str:
        """Apply the config file's difference; ConfigError (the running config stays) when refused."""
        async with self._lock:
            if self.path is None:
                raise self._refused("<file>", "the daemon was started without a config file path")
            try:
                new = config.load(self.path)
                warnings = config.check_host(new, allow_missing_interfaces=True)
            except ConfigError as e:
                raise self._refused(e.key, e.reason) from None
            d = diff(self._d.cfg, new)
            if d.restart:
                raise self._refused(d.restart[0], "cannot change while running; restart vipd to apply it "
                                                  "(the running config stays)")
            for w in warnings:
                log.warning("config_warning", warning=w)
            if d.empty:
                log.info("reloaded", changes="nothing changed")
                return "nothing changed"
            await self._apply(new, d)
            log.info("reloaded", changes=d.summary(), unchanged=",".join(d.unchanged) or None)
            return d.summary()

    def _refused(self, key: str, reason: str) -> ReloadRefused:
        log.error("reload_refused", key=key, reason=reason, path=self.path)
        return ReloadRefused(key, reason)

    async def _apply(self, new: config.Config, d: Diff) -> None:
        dm = self._d
        going = [dm.controllers[n] for n in [*d.removed, *(u.name for u in d.replaced)]]
        for c in going:
            c.post(ShutdownRequested())  # released like at a stop: address, then key (clean)
        await self._wait_stopped(going)
        for c in going:
            del dm.controllers[c.name]
            if c in dm._running:
                dm._running.remove(c)
        dm.index = UnitIndex(dm.controllers)
        dm.cfg = new
        if new.log_level != log.level_name():
            log.setup(new.log_level)
        dm.hooks.commands = {e: tuple(argv) for e, argv in dict(new.hooks.commands).items() if argv}
        dm.hooks.timeout = new.hooks.timeout
        units = {u.name: u for u in new.units}
        for name, c in dm.controllers.items():  # kept units: the new live timing, the new definition
            u = units[name]
            c.vips = u.vips
            params = dm.params(u)
            if params != c.params:
                c.params = params
                c.post(Tick())  # its timers are derived from the params: recompute them now
        dm._gate.batch = new.placement.handover_batch
        dm.fitness.reconfigure(new)
        await dm.interfaces.refresh()
        assert self._nursery is not None
        for watch in dm.watch_duplicates_of(dm.nl, new.vips):  # (before the new units: one that owns finds it)
            self._nursery.start_soon(dm.run_duplicate_watch, watch)
        if dm.nft is not None and dm.succession.enabled and (d.replaced or d.added or d.removed):
            try:
                await dm.nft.ensure(new.vips)  # the token fence: exactly the configured VIPs again
            except DataplaneError as e:  # the new units' tokens fail to arm, loudly; their lifetimes still fence
                log.error("fence_update_failed", error=e)
        for u in [*d.replaced, *d.added]:
            await self._start(u)
        dm.index = UnitIndex(dm.controllers)  # kernel events find the new units
        dm.directory.set_units(new.units)  # placement for the new and retuned units
        await self._watch_owners([u.name for u in [*d.replaced, *d.added]])
        dm.lease.presence_changed()

    async def _wait_stopped(self, going: list[Any]) -> None:
        with trio.move_on_after(STOP_WARN_AFTER):
            for c in going:
                await c.stopped.wait()
            return
        log.warning("reload_waiting", vips=",".join(c.name for c in going if not c.stopped.is_set()),
                    reason="still releasing; the reload goes on when they have let go")
        for c in going:
            await c.stopped.wait()

    async def _start(self, u: Unit) -> None:
        dm = self._d
        assert self._nursery is not None
        c = dm.controller(u, dm.fitness.ok.get(u.name, False))
        dm.controllers[u.name] = c
        await self._nursery.start(c.run)
        dm._running.append(c)

    async def _watch_owners(self, started: list[str]) -> None:
        """The units started by reloads get their owner records from a watch of their own: its
        first listing gives each new controller the key as it is now (the start-up watch told only
        the controller it replaced). It is listening before the previous one ends, so no change
        is missed; from then on the start-up watch's deliveries for these names are dropped."""
        assert self._nursery is not None
        names = sorted(self.rewatched | set(started))
        if not started:
            return
        scope = trio.CancelScope()
        dm = self._d

        def deliver(name: str, record: OwnerRecord) -> None:
            dm.post(name, OwnerObserved(record))
            dm.suspicions.after_owner(name, record)

        async def watch(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await dm.keys.watch(names, deliver, task_status=task_status)
        await self._nursery.start(watch)
        self.rewatched = frozenset(names)
        if self._extra_watch is not None:
            self._extra_watch.cancel()
        self._extra_watch = scope


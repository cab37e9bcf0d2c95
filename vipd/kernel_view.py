"""The daemon's view of the kernel's addresses: the kernel's notifications, and the level-triggered
reconcile behind them (a mixin of vipd.app.Daemon, whose parts it uses).

Edge first: the kernel notifies every address change (vipd/dataplane/kernel_events.py). A VIP
address removed under an owner is posted to its unit at once; one of our tagged addresses added
where no unit of ours holds it (a stray) starts a relist at once; a notification overflow starts a
relist at once (the view built from notifications may be stale: it is never trusted).

Level behind it: every `timing.reconcile_interval` the tick re-checks what is cheap (interfaces,
BGP source routes, the token fence's table), and every RELIST_EVERY-th tick it also lists every
address of the namespace and compares it with every unit's state (vipd/hostview.py), removing
strays. The full relist is what costs at scale (a dump of every address, decoded in Python: ~2 %
of a core every second at 2,000 VIPs), and the notifications already bring every change it would
find; so it runs as the backstop for a lost or mis-handled notification, 10 s apart by default.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import trio

from vipd import log
from vipd.dataplane.address import VIPD_PROTO, AddressManager, TaggedAddress
from vipd.dataplane.kernel_events import AddressAdded, AddressRemoved, LinkChanged, Overflowed, kernel_events
from vipd.dataplane.netlink import Netlink
from vipd.errors import DataplaneError
from vipd.hostview import UnitIndex, reconcile_posts
from vipd.model import LinkUp, Reconcile, State

if TYPE_CHECKING:
    from vipd.config import Config
    from vipd.ownership.controller import Controller

RELIST_EVERY = 10  # reconcile ticks per full address relist while notifications flow


class KernelView:
    cfg: Config
    nl: Netlink
    addresses: AddressManager
    routing: Any
    interfaces: Any
    metrics: Any
    controllers: dict[str, Controller]
    nft: Any
    succession: Any
    index: UnitIndex
    _reconcile_now: trio.Event  # set: relist at once (a notification overflow, a stray added)
    _present: set[str]  # names of the VIPs in the kernel: the last relist's, kept by notifications
    _since_dump: dict[str, bool] | None = None  # during a relist: what notifications said since its dump
    relists = 0

    async def remove_stale(self) -> None:
        """At start we own nothing: remove every address we tagged earlier (but the BGP source)."""
        await self._remove_strays([t for t in await self.addresses.tagged() if not self.routing.is_source(t)],
                                  "stale_address_removed")

    async def _remove_strays(self, items: list[TaggedAddress], what: str, **why: str) -> None:
        """Remove many tagged addresses in one netlink job (remove_many)."""
        if not items:
            return
        try:
            await self.addresses.remove_many(items)
        except DataplaneError as e:  # their lifetimes end them anyway; the next tick tries again
            log.error("stray_address_remove_failed", addresses=len(items), error=e)
            return
        for t in items:
            log.info(what, interface=t.interface, address=t.address, **why)

    async def reconcile(self) -> None:
        """Level-triggered: the cheap checks every tick; every RELIST_EVERY-th tick (or at once when
        a notification asks) tell every controller whether its address is in the kernel, drop strays."""
        tick = 0
        while True:
            with trio.move_on_after(self.cfg.timing.reconcile_interval):
                await self._reconcile_now.wait()
            urgent = self._reconcile_now.is_set()
            self._reconcile_now = trio.Event()
            await self.interfaces.refresh()
            if urgent or tick % RELIST_EVERY == 0:
                await self._relist("notification" if urgent else "tick")
            tick += 1
            await self.routing.reconcile()
            if self.nft is not None and self.succession.enabled:
                try:
                    await self.nft.verify()  # rebuilds the token table if anything of it went missing
                except DataplaneError as e:
                    log.error("fence_verify_failed", error=e)

    async def _relist(self, found_by: str) -> None:
        configured = self.cfg.by_address  # (a reload replaces cfg)
        taken_at = trio.current_time()
        self._since_dump = {}
        try:
            tagged = await self.addresses.tagged()
        except DataplaneError as e:
            self._since_dump = None
            log.error("reconcile_failed", error=e)
            return
        self.relists += 1
        present, strays = set(), []
        for t in tagged:
            vip = configured.get((t.interface, t.ip))
            if vip is None and not self.routing.is_source(t):
                strays.append(t)
            elif vip is not None:
                present.add(vip.name)
        await self._remove_strays(strays, "stray_address_removed", found_by=found_by)
        since, self._since_dump = self._since_dump or {}, None  # newer than the dump: they win
        self._present = {n for n in present if since.get(n, True)} | {n for n, p in since.items() if p}
        for c in list(self.controllers.values()):
            self.metrics.set_address_present(c.name, self._all_present(c))
        reconcile_posts(list(self.controllers.values()), present, taken_at)  # only units that disagree

    async def watch_kernel(self) -> None:
        async with contextlib.aclosing(kernel_events()) as events:  # type: ignore[type-var]
            async for ev in events:
                if isinstance(ev, LinkChanged) and self.index.on_interface(ev.ifname):
                    await self.interfaces.refresh()  # a VIP's NIC may be gone, or back (and every tick)
                if isinstance(ev, LinkChanged) and ev.up:
                    for c in self.index.on_interface(ev.ifname):
                        c.post(LinkUp())
                elif isinstance(ev, AddressAdded):
                    if self.routing.source is not None and ev.address.ip == self.routing.source:
                        await self.routing.reconcile()  # the kernel dropped our prefsrc routes with it
                    elif ev.proto == VIPD_PROTO and not self._held_here(ev.ifname, ev.address.ip):
                        self._reconcile_now.set()  # one of ours where no unit holds it: a stray
                    elif ev.proto == VIPD_PROTO:
                        self._presence(ev.ifname, ev.address.ip, True)
                elif isinstance(ev, AddressRemoved):
                    self._presence(ev.ifname, ev.address.ip, False)
                    unit = self.index.holding(ev.ifname, ev.address.ip)
                    if unit is not None and unit.state.state in (State.OWNER, State.ACQUIRING):
                        unit.post(Reconcile(missing=True, present=False))
                elif isinstance(ev, Overflowed):  # notifications lost: re-list and reconcile now
                    log.warning("kernel_events_overflowed", action="reconciling now")
                    self._reconcile_now.set()  # (link changes come again from the events' re-dump)

    def _presence(self, ifname: str, ip: Any, present: bool) -> None:
        """A VIP's address added (tagged) or removed: its unit's address_present gauge follows at
        once, not at the next relist (the relist replaces this view). A lifetime refresh notifies
        as an add too: a name already present changes nothing."""
        vip = self.cfg.by_address.get((ifname, ip))
        unit = self.index.holding(ifname, ip)
        if vip is None or unit is None:
            return
        if self._since_dump is not None:  # a relist in flight: its dump may predate this
            self._since_dump[vip.name] = present
        if (vip.name in self._present) == present:
            return
        if present:
            self._present.add(vip.name)
        else:
            self._present.discard(vip.name)
        self.metrics.set_address_present(unit.name, self._all_present(unit))

    def _all_present(self, unit: Controller) -> bool:
        return all(v.name in self._present for v in unit.vips)

    def _held_here(self, ifname: str, ip: Any) -> bool:
        unit = self.index.holding(ifname, ip)
        return unit is not None and unit.state.state in (State.OWNER, State.ACQUIRING, State.RELEASING)

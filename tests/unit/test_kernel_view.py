"""The reconcile tick's cadence (vipd/kernel_view.py): cheap checks every tick, the full address
relist every RELIST_EVERY-th tick or at once when a notification asks; strays go either way."""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace
from typing import Any

import trio
import trio.testing

from vipd import config
from vipd.dataplane.address import TaggedAddress
from vipd.errors import DataplaneError
from vipd.hostview import UnitIndex
from vipd.kernel_view import RELIST_EVERY, KernelView
from vipd.model import State


class Parts:
    def __init__(self) -> None:
        self.listed = 0
        self.removed: list[TaggedAddress] = []
        self.checks = 0
        self.tagged_now: list[TaggedAddress] = []

    async def tagged(self) -> list[TaggedAddress]:
        self.listed += 1
        return list(self.tagged_now)

    async def remove_many(self, items: list[TaggedAddress]) -> None:
        self.removed += items
        self.tagged_now = [t for t in self.tagged_now if t not in items]

    async def refresh(self) -> None:
        self.checks += 1

    async def reconcile(self) -> None:
        pass

    def is_source(self, t: TaggedAddress) -> bool:
        return False


class View(KernelView):
    def __init__(self) -> None:
        self.cfg = config.parse({"node": "n1", "timing": {"reconcile_interval": 1.0},
                                 "vip": [{"name": "api", "address": "10.0.0.10/24", "interface": "eth0"}]})
        self.parts = Parts()
        self.addresses = self.parts  # type: ignore[assignment]
        self.interfaces = self.routing = self.parts
        self.metrics = SimpleNamespace(set_address_present=lambda name, present: None)
        self.controllers = {}
        self.index = UnitIndex({})
        self.nft: Any = None
        self._reconcile_now = trio.Event()
        self._present: set[str] = set()


def stray(ip: str) -> TaggedAddress:
    iface = ipaddress.ip_interface(ip)
    return TaggedAddress("eth0", iface, 5, iface.ip)


async def test_full_relist_every_nth_tick_and_at_once_when_asked(autojump_clock) -> None:  # type: ignore[no-untyped-def]
    view = View()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(view.reconcile)
        await trio.sleep(2 * RELIST_EVERY + 0.5)  # ticks at 1 .. 2N s: relists at the 1st and the N+1st
        assert view.parts.checks == 2 * RELIST_EVERY and view.parts.listed == 2
        view.parts.tagged_now = [stray("10.9.9.9/32")]
        view._reconcile_now.set()  # a notification: relisted now, not at the next N-th tick
        await trio.testing.wait_all_tasks_blocked()
        assert view.parts.listed == 3 and view.parts.removed == [stray("10.9.9.9/32")]
        nursery.cancel_scope.cancel()
    assert view.relists == 3



class Gauges(dict):  # type: ignore[type-arg]
    def set_address_present(self, name: str, present: bool) -> None:
        self[name] = present


async def test_address_present_follows_notifications_and_a_relist_never_undoes_a_newer_one() -> None:
    view = View()
    api = view.cfg.units[0]
    posted: list[Any] = []  # (the relist also tells the unit; this test reads only the gauge)
    unit = SimpleNamespace(name=api.name, vips=api.vips, state=SimpleNamespace(state=State.OWNER), post=posted.append)
    view.controllers = {api.name: unit}  # type: ignore[dict-item]
    view.index = UnitIndex(view.controllers)
    view.metrics = gauges = Gauges()  # type: ignore[assignment]
    ip = api.vips[0].ip
    view._presence("eth0", ip, True)  # a claim notified: the gauge follows at once
    assert gauges == {"api": True} and view._present == {"api"}
    view._presence("eth0", ip, True)  # a lifetime refresh notifies as an add: nothing changes
    view._presence("eth0", ipaddress.ip_address("10.0.0.99"), False)  # not ours: ignored
    assert gauges == {"api": True}

    ours = TaggedAddress("eth0", api.vips[0].address, 5, ip)
    view.parts.tagged_now = [ours]
    listed = view.parts.tagged

    async def dump_then_removed() -> list[TaggedAddress]:  # the removal is notified while the dump returns
        got = await listed()
        view._presence("eth0", ip, False)
        return got

    view.parts.tagged = dump_then_removed  # type: ignore[method-assign]
    await view._relist("tick")
    assert gauges == {"api": False} and view._present == set() and view._since_dump is None
    view.parts.tagged = listed  # type: ignore[method-assign]
    view.parts.tagged_now = []
    view._presence("eth0", ip, True)
    view.parts.tagged_now = [ours]
    await view._relist("tick")  # a plain relist agrees with the kernel
    assert gauges == {"api": True} and view._present == {"api"}


async def test_a_relist_whose_dump_fails_changes_no_gauge_and_leaves_no_relist_in_flight() -> None:
    """The dump fails (a DataplaneError): logged, the gauges stay as notifications left them, and
    later notifications are no longer held for a relist that is not coming."""
    view = View()
    api = view.cfg.units[0]
    unit = SimpleNamespace(name=api.name, vips=api.vips, state=SimpleNamespace(state=State.OWNER), post=lambda ev: None)
    view.controllers = {api.name: unit}  # type: ignore[dict-item]
    view.index = UnitIndex(view.controllers)
    view.metrics = gauges = Gauges()  # type: ignore[assignment]
    ip = api.vips[0].ip
    view._presence("eth0", ip, True)

    async def broken() -> list[TaggedAddress]:
        raise DataplaneError("dump failed")

    view.parts.tagged = broken  # type: ignore[method-assign]
    await view._relist("tick")
    assert view._since_dump is None and view.relists == 0
    assert gauges == {"api": True} and view._present == {"api"}
    view._presence("eth0", ip, False)
    assert gauges == {"api": False} and view._since_dump is None

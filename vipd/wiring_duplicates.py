"""The daemon's duplicate-responder watches (a mixin of vipd.app.Daemon, as vipd/kernel_view.py
is): one DuplicateResponderWatch per interface carrying NIC VIPs with `conflict_check`, told by
the controllers which VIPs this host owns (`owning`), restarted when its interface goes away and
comes back. Another MAC answering for an owned VIP is counted as a conflict of its unit and
logged (`duplicate_responder`); a reload adds the watches of new interfaces (vipd/reload.py)."""

from __future__ import annotations

from typing import Any, Iterable

import trio

from vipd import log
from vipd.dataplane.duplicates import DuplicateResponderWatch
from vipd.dataplane.netlink import Netlink
from vipd.errors import DataplaneError, find_in_group
from vipd.model import VipSpec


class DuplicateWatching:
    metrics: Any
    interfaces: Any
    duplicates: dict[str, DuplicateResponderWatch]
    _unit_of_ip: dict[Any, str]

    def watch_duplicates_of(self, nl: Netlink, vips: Iterable[VipSpec]) -> list[DuplicateResponderWatch]:
        """A watch for every interface of `vips` that needs one and has none yet (at start, and by a
        reload, before its new units start: a unit that comes to own a VIP finds its watch); the
        new ones are returned for the caller to run. Every VIP's unit by address, for the log."""
        vips = list(vips)
        new = [DuplicateResponderWatch(nl, ifname, self._duplicate)
               for ifname in sorted({v.interface for v in vips if v.conflict_check and not v.on_loopback})
               if ifname not in self.duplicates]
        self.duplicates.update((w.ifname, w) for w in new)
        self._unit_of_ip = {v.ip: v.unit for v in vips}
        return new

    def owning(self, vips, owned: bool) -> None:  # type: ignore[no-untyped-def]
        """Controllers report ownership changes: watch for another MAC answering for our VIPs."""
        for v in vips:
            watch = self.duplicates.get(v.interface)
            if watch is not None:
                (watch.watch if owned else watch.unwatch)(v.ip)

    def _duplicate(self, ip, mac: str) -> None:  # type: ignore[no-untyped-def]
        unit = self._unit_of_ip.get(ip, "?")
        self.metrics.count_conflict(unit)
        log.error("duplicate_responder", vip=unit, address=ip, mac=mac,
                  reason="another machine answers for a VIP this host owns")

    async def run_duplicate_watch(self, watch: DuplicateResponderWatch) -> None:
        while True:  # restarted when the interface goes away and comes back
            try:
                await watch.run()
            except Exception as e:  # noqa: BLE001 - a DataplaneError, maybe inside a group: its NIC was deleted
                err = find_in_group(e, DataplaneError)
                if err is None:
                    raise
                log.warning("duplicate_watch_failed", interface=watch.ifname, error=err)
            await trio.sleep(1.0)
            await self.interfaces.wait_present(watch.ifname)

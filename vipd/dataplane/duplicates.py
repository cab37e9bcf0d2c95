"""While owning: another machine claiming one of our VIPs (vipd/dataplane/conflict.py's frames and
sockets, listening instead of probing)."""

from __future__ import annotations

import contextlib
import ipaddress
import math
from typing import Callable

import trio

from vipd.dataplane.conflict import (ETH_P_ARP, ETH_P_IPV6, IPAddress, _our_mac, _PacketSocket, arp_probe_frame,
                                     dad_ns_frame)
from vipd.dataplane.netlink import Netlink


class DuplicateResponderWatch:
    """Reports another MAC claiming an owned VIP on one interface: ``on_duplicate(ip, mac)``, at
    most once per (ip, mac) every ``repeat_after`` seconds. :meth:`watch` / :meth:`unwatch` say
    which VIPs are owned right now (plain calls, from any task). Run it in a nursery:
    ``await nursery.start(watch.run)``; started once its sockets listen. It raises
    ConflictProbeError when the interface has no MAC or its sockets fail (e.g. the interface was
    deleted): restart it when the link comes back. Unwatch a VIP *before* removing its address,
    so the next owner's announcements are not reported against us.
    """

    def __init__(self, nl: Netlink, ifname: str, on_duplicate: Callable[[IPAddress, str], None], *,
                 mac: str | None = None, repeat_after: float = 10.0, probe_interval: float | None = None) -> None:
        self.nl, self.ifname, self.on_duplicate = nl, ifname, on_duplicate
        self.mac = mac.lower() if mac else None
        self.repeat_after = repeat_after
        self.probe_interval = probe_interval
        self._owned: set[IPAddress] = set()
        self._last: dict[tuple[IPAddress, str], float] = {}
        self._changed = trio.Event()

    @property
    def owned(self) -> frozenset[IPAddress]:
        return frozenset(self._owned)

    def watch(self, ip: IPAddress | str) -> None:
        self._owned.add(ipaddress.ip_address(ip))
        self._changed.set()

    def unwatch(self, ip: IPAddress | str) -> None:
        addr = ipaddress.ip_address(ip)
        self._owned.discard(addr)
        self._last = {k: t for k, t in self._last.items() if k[0] != addr}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        mine = self.mac or await _our_mac(self.nl, self.ifname)
        async with _PacketSocket(self.nl, self.ifname, ETH_P_ARP) as arp, \
                _PacketSocket(self.nl, self.ifname, ETH_P_IPV6) as nd:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._listen, arp, mine, "arp")
                nursery.start_soon(self._listen, nd, mine, "na")
                if self.probe_interval is not None:
                    nursery.start_soon(self._probe_owned, arp, nd, mine)
                task_status.started()

    async def _listen(self, ps: _PacketSocket, mine: str, kind: str) -> None:
        async with contextlib.aclosing(ps.claims(mine)) as claims:  # type: ignore[type-var]
            async for claim in claims:
                if claim.kind != kind or claim.ip not in self._owned:
                    continue
                now = trio.current_time()
                key = (claim.ip, claim.mac)
                if now - self._last.get(key, -math.inf) >= self.repeat_after:
                    self._last[key] = now
                    self.on_duplicate(claim.ip, claim.mac)

    async def _probe_owned(self, arp: _PacketSocket, nd: _PacketSocket, mine: str) -> None:
        assert self.probe_interval is not None
        while True:
            while not self._owned:  # nothing owned: sleep until something is
                self._changed = trio.Event()
                await self._changed.wait()
            for ip in sorted(self._owned, key=lambda a: (a.version, a)):
                if isinstance(ip, ipaddress.IPv4Address):
                    await arp.send(arp_probe_frame(mine, ip))
                else:
                    await nd.send(dad_ns_frame(mine, ip))
            await trio.sleep(self.probe_interval)

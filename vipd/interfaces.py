"""Do the NICs the VIPs live on exist? A missing one (deleted, renamed, not created yet) makes only
the units with a VIP on it unfit: Fitness.set_unavailable releases them (address, then key), keeps
them from campaigning, and says why in `vipd state` and this host's presence. When the NIC is back
they are fit again and campaign as usual; the other units never notice.

Level-triggered: `refresh` lists the links and compares them with the configured interfaces (the
current config: a reload may add some). The daemon calls it once before its controllers start,
on every kernel link event of a VIP interface, and on every reconcile tick (a NIC deleted while
it was down brings no link event). `wait_present(ifname)` parks a task (the duplicate-responder
watch of that NIC) until the NIC exists. `lo` is never missing.
"""

from __future__ import annotations

import socket
from typing import Any, Callable, Protocol, Sequence

import trio

from vipd import log
from vipd.dataplane import addrdump
from vipd.errors import DataplaneError
from vipd.model import Unit


class NetlinkPort(Protocol):
    async def call_checked(self, what: str, fn: Callable[[Any], Any], error: type[Exception]) -> Any: ...

    def route_socket(self) -> tuple[socket.socket, int]: ...


class FitnessPort(Protocol):
    def set_unavailable(self, reasons: dict[str, str]) -> None: ...


def _names(nl: NetlinkPort) -> set[str]:
    """Inside a job: the interface names (a raw link dump: this runs on every reconcile tick)."""
    return set(addrdump.link_names(*nl.route_socket()).values())


def unavailable(units: Sequence[Unit], present: set[str]) -> dict[str, str]:
    """unit -> why it cannot be served here, for every unit with a VIP on a missing NIC."""
    out = {}
    for u in units:
        gone = sorted({v.interface for v in u.vips if not v.on_loopback and v.interface not in present})
        if gone:
            out[u.name] = f"interface {', '.join(gone)} missing"
    return out


class InterfaceWatch:
    def __init__(self, nl: NetlinkPort, fitness: FitnessPort, units: Callable[[], Sequence[Unit]]) -> None:
        self._nl = nl
        self._fitness = fitness
        self._units = units
        self.missing: frozenset[str] = frozenset()
        self._units_seen: Sequence[Unit] | None = None
        self._wanted: frozenset[str] = frozenset()  # the NICs of the units seen
        self._changed = trio.Event()
        self._lock = trio.Lock()

    async def refresh(self) -> None:
        async with self._lock:  # one listing at a time: results are applied in order
            try:
                present = await self._nl.call_checked("list interfaces", lambda _ipr: _names(self._nl), DataplaneError)
            except DataplaneError as e:
                log.error("interface_list_failed", error=e)
                return
            units = self._units()
            if units is not self._units_seen:  # (a reload's new config: every tick read every VIP)
                self._units_seen = units
                self._wanted = frozenset(v.interface for u in units for v in u.vips if not v.on_loopback)
            missing = frozenset(self._wanted - present)
            for ifname in sorted(missing - self.missing):
                vips = ",".join(v.name for u in units for v in u.vips if v.interface == ifname)
                log.warning("interface_missing", interface=ifname, vips=vips,
                            reason="its VIPs are released and not claimed on this host until it returns")
            for ifname in sorted(self.missing - missing):
                log.info("interface_back", interface=ifname)
            if missing != self.missing:
                self.missing = missing
                self._changed.set()
                self._changed = trio.Event()
            # (every such unit has a VIP on a missing interface: none while none is missing)
            self._fitness.set_unavailable(unavailable(units, present) if missing else {})

    async def wait_present(self, ifname: str) -> None:
        while ifname in self.missing:
            await self._changed.wait()

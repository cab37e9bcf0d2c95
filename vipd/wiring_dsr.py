"""DSR in the daemon: the DsrService (vipd/dsr/service.py) run, fenced and reported like the rest.

Contract (what vipd/app.py gets from DsrWiring; all of it is inert when no VIP has a service):
- `fences`: [ServiceFence] to append to the controllers' fence list *before* the controllers are
  built (a controller keeps the fences that cover its unit). The controllers arm it before the
  address claim and with every lease proof, and disarm it on release / fence, so a director directs
  a VIP only while this host proves ownership of it (its deadline in the program's map).
- `run()` (nursery.start, before the controllers start): removes what a previous run left (vipd's tc
  filter on the director interfaces, DSR-tagged addresses on lo), then starts the service (director
  and backend role) and is started once both are up. BPF missing: the service says why
  (svc.unavailable) and every other feature runs. A backend role that refuses (this host would
  answer ARP for the VIP) vetoes the units it backs (Fitness), with the reason. The service failing
  (an unexpected kernel error) never stops the daemon: logged (`dsr_failed`), started again after
  1 s, 2 s, ... 30 s; meanwhile this host does not direct.
- `update_hosts(hosts)`: every host-directory change (etcd presence and health) -> backend sets.
- `status(vips)`: the live view per service (`vipd state`); metrics registered at construction.
- `aclose()` after the daemon's nursery ended: the service's own stop has detached and restored;
  the cleanups run again (idempotent) so nothing of DSR stays in the kernel.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence

import trio
from prometheus_client import CollectorRegistry
from pyroute2.netlink.exceptions import NetlinkError

from vipd import log
from vipd.config import Config, VipSpec
from vipd.dataplane.netlink import Netlink
from vipd.dsr import backend as dsr_backend
from vipd.dsr import director as dsr_director
from vipd.dsr.metrics import register
from vipd.dsr.service import DsrService, interface_of
from vipd.election.hosts import HostInfo
from vipd.errors import DataplaneError
from vipd.fence import Fence

SOURCE = "dsr"
RESTART_MIN, RESTART_MAX = 1.0, 30.0  # seconds before a failed service is started again (doubling)


class Vetoes(Protocol):
    def veto(self, unit: str, reason: str | None, *, source: str) -> None: ...


class ServiceFence:
    """The Fence port over DsrFence: covers the VIPs with services; arms only those."""

    def __init__(self, svc: DsrService) -> None:
        self._svc = svc
        self._names = {v.name for v in svc.vips}
        self._armed: dict[str, float] = {}

    def _mine(self, vips: Sequence[VipSpec]) -> list[VipSpec]:
        return [v for v in vips if v.name in self._names]

    def covers(self, vips: Sequence[VipSpec]) -> bool:
        return bool(self._mine(vips))

    async def arm(self, vips: Sequence[VipSpec], until: float) -> None:
        mine = self._mine(vips)
        try:
            await self._svc.fence.arm(mine, until)
        except OSError as e:  # a map update the kernel refused: the previous deadline still ends it
            raise DataplaneError(f"DSR fence: {e}") from None
        if self._svc.directing:
            self._armed.update((v.name, until) for v in mine)

    async def disarm(self, vips: Sequence[VipSpec]) -> None:
        mine = self._mine(vips)
        for v in mine:
            self._armed.pop(v.name, None)
        try:
            await self._svc.fence.disarm(mine)
        except OSError as e:
            raise DataplaneError(f"DSR fence: {e}") from None

    def armed_until(self, vips: Sequence[VipSpec]) -> float | None:
        times = [self._armed.get(v.name) for v in self._mine(vips)]
        return None if not times or any(t is None for t in times) else min(t for t in times if t is not None)


def director_interfaces(vips: Sequence[VipSpec]) -> list[str]:
    return sorted({interface_of(v, s) for v in vips for s in v.services})


class DsrWiring:
    def __init__(self, cfg: Config, nl: Netlink, registry: CollectorRegistry, fitness: Vetoes) -> None:
        self._cfg = cfg
        self._nl = nl
        self._fitness = fitness
        self.service: DsrService | None = None
        self.fences: list[Fence] = []
        if any(v.services for v in cfg.vips):
            self.service = DsrService(cfg.node, cfg.vips, nl)
            self.fences.append(ServiceFence(self.service))
            register(registry, self.service)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        svc = self.service
        if svc is None:
            task_status.started()
            return
        await self._remove_leftovers()
        delay = RESTART_MIN
        while True:
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(svc.run)
                    self._started(svc)
                    task_status.started()
                    task_status = trio.TASK_STATUS_IGNORED
                    delay = RESTART_MIN
            except Exception as e:  # noqa: BLE001 - DSR failing must not take the VIPs down with it
                # the service's own finally has detached the program and stopped the backend role
                svc.unavailable = f"failed: {e!r}"
                log.error("dsr_failed", error=repr(e), restart_in=delay,
                          effect="this host does not direct DSR traffic until the restart; every other feature runs")
                task_status.started()
                task_status = trio.TASK_STATUS_IGNORED
                await trio.sleep(delay)
                delay = min(RESTART_MAX, 2 * delay)
                svc.unavailable = svc.backend_refused = None

    def _started(self, svc: DsrService) -> None:
        for unit in sorted({v.unit for v in svc.backend_role.vips}):
            self._fitness.veto(unit, svc.backend_refused, source=SOURCE)  # None lifts an earlier refusal
        log.info("dsr_ready", directing=svc.directing, unavailable=svc.unavailable,
                 backend_refused=svc.backend_refused, services=sum(len(v.services) for v in svc.vips))

    async def _remove_leftovers(self) -> None:
        """What a SIGKILLed run left: its filter (the service replaces it too) and its lo addresses."""
        try:
            n = await dsr_backend.cleanup(self._nl)
        except (DataplaneError, OSError, NetlinkError) as e:
            log.warning("dsr_cleanup_failed", error=e)
            return
        if n:
            log.info("dsr_stale_removed", addresses=n)

    def update_hosts(self, hosts: Mapping[str, HostInfo]) -> None:
        if self.service is not None:
            self.service.update_hosts(hosts)

    def status(self, vips: Sequence[VipSpec]) -> list[dict[str, Any]] | None:
        """The live service rows of these VIPs (None when none of them has a service)."""
        if self.service is None:
            return None
        names = {v.name for v in vips}
        rows = [r for r in self.service.status() if r["vip"] in names]
        if not rows:
            return None
        for r in rows:
            r["unavailable"] = self.service.unavailable
            r["backend_refused"] = self.service.backend_refused
        return rows

    async def aclose(self) -> None:
        """After the service stopped: nothing of DSR may stay (filters on the director interfaces,
        DSR-tagged addresses). Never raises: a failure is logged."""
        if self.service is None:
            return
        with trio.CancelScope(shield=True):
            await cleanup_all(self._nl, director_interfaces(self.service.vips))


async def cleanup_all(nl: Netlink, interfaces: Sequence[str]) -> None:
    """vipd's DSR filter on `interfaces` and every DSR-tagged address; logged, never raises."""
    try:
        detached = await dsr_director.cleanup(nl, interfaces)
        removed = await dsr_backend.cleanup(nl)
    except (DataplaneError, OSError, NetlinkError) as e:
        log.warning("dsr_cleanup_failed", error=e)
        return
    if detached or removed:
        log.info("dsr_cleanup", detached=",".join(detached) or None, addresses=removed)

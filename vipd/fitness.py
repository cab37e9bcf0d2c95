"""Is this host fit to serve each unit? Host checks, unit checks and vetoes -> HealthChanged per unit,
and this host's presence value in etcd (health, weight, units it cannot serve, and why).

A veto is a reason from outside the health checks that makes one unit unfit here (an L2 interface
on a proxy-ARP segment, a DSR backend role that refused): `veto(unit, reason)`, lifted with None."""

from __future__ import annotations

from typing import Callable, Protocol


from vipd import log
from vipd.config import Config
from vipd.election.hosts import HostInfo
from vipd.health import HealthMonitor
from vipd.health.spec import check_name
from vipd.model import Event, HealthChanged


class FitnessMetrics(Protocol):
    def set_healthy(self, vip: str, healthy: bool) -> None: ...


class Fitness:
    def __init__(self, cfg: Config, post: Callable[[str, Event], None], presence_changed: Callable[[], None],
                 metrics: FitnessMetrics, nl: object = None) -> None:
        self._cfg = cfg
        self._vetoes: dict[str, list[str]] = {}  # unit -> reasons from outside the checks
        self._post = post
        self._presence_changed = presence_changed
        self._metrics = metrics
        self._host_checks = [(f"host/{i}:{check_name(c)}", c) for i, c in enumerate(cfg.host.checks)]
        self._unit_checks = {u.name: [(f"{u.name}/{i}:{check_name(c)}", c) for i, c in enumerate(u.checks)]
                             for u in cfg.units}
        checks = self._host_checks + [c for cs in self._unit_checks.values() for c in cs]
        self.monitor = HealthMonitor(checks, self._changed, nl=nl) if checks else None  # type: ignore[arg-type]
        self.ok = {u.name: self.initial(u.name) for u in cfg.units}
        self.bgp_source = ""  # set once routing knows it; published with the presence
        self.peer_address: Callable[[], str] = lambda: ""  # the heartbeat endpoint, published with the presence
        self._held: set[str] = set()  # units in their release hold-off: the others campaign first
        for name, ok in self.ok.items():
            metrics.set_healthy(name, ok)

    def initial(self, unit: str) -> bool:
        """Without checks a unit is healthy from the start; with checks, only after `rise` passes."""
        return not (self._host_checks or self._unit_checks[unit] or self._vetoes.get(unit))

    def veto(self, unit: str, reason: str | None, *, source: str) -> None:
        """Make the unit unfit here for `reason` (None: lift the veto `source` put); re-evaluates at once."""
        tag = f"{unit}/{source}: "  # like a unit check's "unit/0:name: reason"
        mine = [r for r in self._vetoes.get(unit, []) if not r.startswith(tag)]
        if reason is not None:
            mine.append(tag + reason)
        if mine:
            self._vetoes[unit] = mine
        else:
            self._vetoes.pop(unit, None)
        self._changed("", True, "")

    def reasons(self, unit: str) -> list[str]:
        """Why the unit is unfit here ([] when it is fit): failing checks and vetoes."""
        return (self._failing(self._host_checks) + self._failing(self._unit_checks[unit])  # type: ignore[arg-type]
                + self._vetoes.get(unit, []))

    def _failing(self, checks: list[tuple[str, object]]) -> list[str]:
        status = self.monitor.status() if self.monitor else {}
        return [f"{name}: {status[name].reason}" for name, _ in checks if status[name].healthy is not True]

    def _changed(self, name: str, healthy: bool, reason: str) -> None:
        host_bad = self._failing(self._host_checks)  # type: ignore[arg-type]
        for unit, checks in self._unit_checks.items():
            bad = host_bad + self._failing(checks) + self._vetoes.get(unit, [])  # type: ignore[arg-type]
            ok = not bad
            if ok != self.ok[unit]:
                self.ok[unit] = ok
                self._metrics.set_healthy(unit, ok)
                log.info("health", vip=unit, healthy=ok, reason="; ".join(bad) or "all checks pass")
                self._post(unit, HealthChanged(ok, "; ".join(bad)))
        self._presence_changed()

    def hold(self, unit: str, active: bool) -> None:
        """The unit's release hold-off started or ended on this host: publish it with the presence."""
        if active != (unit in self._held):
            (self._held.add if active else self._held.discard)(unit)
            self._presence_changed()

    def presence(self) -> str:
        host_bad = self._failing(self._host_checks)  # type: ignore[arg-type]
        unfit = [u for u, ok in self.ok.items() if not ok]
        down = tuple(u for u in self.ok if u in unfit or u in self._held) if not host_bad else ()
        reasons = tuple(host_bad + [r for u in unfit for r in self._failing(self._unit_checks[u])  # type: ignore
                                    + self._vetoes.get(u, [])]
                        + [f"{u}: release hold-off" for u in sorted(self._held)])
        return HostInfo(self._cfg.node, not host_bad, self._cfg.host.weight, down, reasons,
                        self.bgp_source, self.peer_address()).to_json()

    async def run(self) -> None:
        """Run the checks forever (returns at once when none are configured)."""
        if self.monitor is not None:
            await self.monitor.run()

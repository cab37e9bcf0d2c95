"""Is this host fit to serve each unit? Host checks, unit checks and the conditions outside them
(a unit's NIC is missing: vipd/interfaces.py; the operator drained the host: vipd/drain.py; a veto
from the dataplane wiring: an L2 interface on a proxy-ARP segment, a DSR backend role that refused)
-> HealthChanged per unit, and this host's presence value in etcd (health, weight, drained, units it
cannot serve, and why). `reconfigure` (SIGHUP, vipd/reload.py) swaps the checks: a check kept as it
was keeps its result, a new one does not count against its unit until its first verdict.
A veto: `veto(unit, reason, source=...)`, lifted with None."""

from __future__ import annotations

import time
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
        self.since: float | None = None  # wall clock of the first presence (the lease grant): placement's join grace
        self._vetoes: dict[str, list[str]] = {}  # unit -> reasons from outside the checks
        self._post = post
        self._presence_changed = presence_changed
        self._metrics = metrics
        self._host_checks = [(f"host/{i}:{check_name(c)}", c) for i, c in enumerate(cfg.host.checks)]
        self._unit_checks = {u.name: [(f"{u.name}/{i}:{check_name(c)}", c) for i, c in enumerate(u.checks)]
                             for u in cfg.units}
        checks = self._host_checks + [c for cs in self._unit_checks.values() for c in cs]
        self.monitor = HealthMonitor(checks, self._changed, nl=nl)  # type: ignore[arg-type]
        self._unavailable: dict[str, str] = {}  # unit -> why it cannot be served here outside its checks
        self.drained = ""  # why this host takes no VIPs (operator drain), "" when it may
        self._drain_units = False  # ... and its units are unfit already (a drain publishes first)
        self._grace: set[str] = set()  # checks added by a reload: unknown does not count until they decide
        self.ok = {u.name: self.initial(u.name) for u in cfg.units}
        self.bgp_source = ""  # set once routing knows it; published with the presence
        self.peer_address: Callable[[], str] = lambda: ""  # the heartbeat endpoint, published with the presence
        self._held: set[str] = set()  # units in their release hold-off: the others campaign first
        for name, ok in self.ok.items():
            metrics.set_healthy(name, ok)

    def initial(self, unit: str) -> bool:
        """Without checks a unit is healthy from the start; with checks, only after `rise` passes."""
        return not (self._host_checks or self._unit_checks.get(unit)) and not self._outside(unit)

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
        self._changed()

    def reasons(self, unit: str) -> list[str]:
        """Why the unit is unfit here ([] when it is fit): failing checks, drain, missing NIC, vetoes."""
        return (self._failing(self._host_checks) + self._failing(self._unit_checks.get(unit, []))  # type: ignore[arg-type]
                + self._outside(unit))

    def _failing(self, checks: list[tuple[str, object]]) -> list[str]:
        status = self.monitor.status()
        return [f"{name}: {status[name].reason}" for name, _ in checks
                if name in status and status[name].healthy is not True
                and not (status[name].healthy is None and name in self._grace)]

    def _outside(self, unit: str) -> list[str]:
        """Reasons outside the checks: drained, the unit's NIC missing, vetoes."""
        drained = f"drained: {self.drained}" if self.drained and self._drain_units else ""
        return [r for r in (drained, self._unavailable.get(unit, "")) if r] + self._vetoes.get(unit, [])

    def unavailable(self, unit: str) -> str:
        """Why the unit cannot be served here outside its checks ("" when it can), for `vipd state`."""
        return "; ".join(self._outside(unit))

    def _changed(self, name: str = "", healthy: bool = True, reason: str = "") -> None:
        host_bad = self._failing(self._host_checks)  # type: ignore[arg-type]
        for unit, checks in self._unit_checks.items():
            bad = host_bad + self._failing(checks) + self._outside(unit)  # type: ignore[arg-type]
            ok = not bad
            if ok != self.ok.get(unit):
                self.ok[unit] = ok
                self._metrics.set_healthy(unit, ok)
                log.info("health", vip=unit, healthy=ok, reason="; ".join(bad) or "all checks pass")
                self._post(unit, HealthChanged(ok, "; ".join(bad)))
        self._presence_changed()

    def set_unavailable(self, reasons: dict[str, str]) -> None:
        """Units that cannot be served here whatever their checks say (unit -> reason); the rest can."""
        if reasons != self._unavailable:
            self._unavailable = dict(reasons)
            self._changed()

    def set_drained(self, reason: str, *, units: bool = True) -> None:
        """Drain this host ("" undrains): the presence says drained (the others' placement skips
        it), and with `units` every unit is unfit here (owners release, nobody campaigns)."""
        units = bool(reason) and units
        if (reason, units) != (self.drained, self._drain_units):
            self.drained, self._drain_units = reason, units
            self._changed()

    def stopping(self) -> None:
        """A planned stop: the presence says drained (the others' placement drops this host at
        once) and the units' fitness stays as it is. An operator's drain is kept as it is: its
        units stay unfit (made fit again here, they would campaign on the way out)."""
        if not self.drained:
            self.set_drained("stopping", units=False)

    def reconfigure(self, cfg: Config) -> list[tuple[str, object]]:
        """Swap in cfg's checks and units: checks no longer named (or changed) stop, new ones start;
        returns the checks started. A check added to a unit (or the host) that stays does not count
        against it until its first verdict (a reload never drops a served VIP for an unproven
        check); a new unit's checks count from the start, as at start-up."""
        old = dict(self._host_checks + [c for cs in self._unit_checks.values() for c in cs])
        kept_units = set(self._unit_checks)
        self._cfg = cfg
        self._host_checks = [(f"host/{i}:{check_name(c)}", c) for i, c in enumerate(cfg.host.checks)]
        self._unit_checks = {u.name: [(f"{u.name}/{i}:{check_name(c)}", c) for i, c in enumerate(u.checks)]
                             for u in cfg.units}
        new = dict(self._host_checks + [c for cs in self._unit_checks.values() for c in cs])
        for gone in [n for n in old if n not in new or new[n] != old[n]]:
            self.monitor.remove(gone)
            self._grace.discard(gone)
        added = [(n, c) for n, c in new.items() if n not in old or old[n] != c]
        self._grace |= {n for n, _ in added if n.startswith("host/") or n.split("/", 1)[0] in kept_units}
        for unit in [u for u in self.ok if u not in self._unit_checks]:
            del self.ok[unit]
        self._unavailable = {u: r for u, r in self._unavailable.items() if u in self._unit_checks}
        for name, spec in added:
            self.monitor.add(name, spec)  # type: ignore[arg-type]
        for unit in self._unit_checks:
            if unit not in self.ok:  # a new unit: its controller starts with this
                self.ok[unit] = not (self._failing(self._host_checks) + self._failing(self._unit_checks[unit])  # type: ignore
                                     + self._outside(unit))
                self._metrics.set_healthy(unit, self.ok[unit])
        self._changed()  # a removed check may have been the one failing
        return added  # type: ignore[return-value]

    def hold(self, unit: str, active: bool) -> None:
        """The unit's release hold-off started or ended on this host: publish it with the presence."""
        if active != (unit in self._held):
            (self._held.add if active else self._held.discard)(unit)
            self._presence_changed()

    def presence(self) -> str:
        host_bad = self._failing(self._host_checks)  # type: ignore[arg-type]
        unfit = [u for u, ok in self.ok.items() if not ok]
        down = tuple(u for u in self.ok if u in unfit or u in self._held) if not host_bad else ()
        reasons = tuple(host_bad + [r for u in unfit for r in self._failing(self._unit_checks.get(u, []))  # type: ignore
                                    + self._vetoes.get(u, [])]
                        + [f"{u}: {r}" for u, r in sorted(self._unavailable.items())]
                        + [f"{u}: release hold-off" for u in sorted(self._held)]
                        + ([f"drained: {self.drained}"] if self.drained else []))
        return HostInfo(self._cfg.node, not host_bad, self._cfg.host.weight, down, reasons,
                        self.bgp_source, self.peer_address(), drained=bool(self.drained),
                        held=tuple(u for u in down if u in self._held and u not in unfit),
                        since=self._since()).to_json()

    def _since(self) -> float:
        if self.since is None:
            self.since = round(time.time(), 3)
        return self.since

    async def run(self) -> None:
        """Run the checks forever (a reload may add the first ones later)."""
        await self.monitor.run()

"""What a config reload changes, as a pure function: `diff(old, new) -> Diff`. No I/O.

Units are compared by name. A unit whose VIPs keep their name, address, interface, group, mode,
conflict check and services is *kept*: untouched when nothing else about it changed, or *retuned*
live (checks, prefer/avoid, announcements) without any transition; any other change makes it
*replaced*: released with a clean hand-back (another host takes it at once), then started anew.

Settings the running daemon cannot change (its identity, etcd session, sockets, kernel tables it
built at start, the fence timing its held leases were armed with) are named in `restart`; a
reload that changes any of them is refused as a whole (`vipd/reload.py`), so the running config
stays exactly as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from vipd.model import Unit, VipSpec

if TYPE_CHECKING:
    from vipd.config import Config

# VipSpec fields that decide what the kernel holds and how the unit is elected: changing one
# replaces the unit. The others (checks, prefer, avoid, announce_*) are applied live.
IDENTITY = ("name", "address", "interface", "group", "mode", "conflict_check", "services")

# top-level settings (dataclass fields of Config) that only a restart can change
RESTART = ("node", "state_dir", "metrics_listen", "etcd", "peers", "bgp", "egress")
RESTART_TIMING = ("fence_margin", "keepalives_per_ttl")  # the fences armed now were computed with them


@dataclass(frozen=True)
class Diff:
    added: tuple[Unit, ...] = ()
    removed: tuple[str, ...] = ()
    replaced: tuple[Unit, ...] = ()  # the new definition; released, then started again
    retuned: tuple[Unit, ...] = ()  # the new definition; applied live, no transition
    unchanged: tuple[str, ...] = ()
    live: tuple[str, ...] = ()  # other settings changed live (keys, for the log)
    restart: tuple[str, ...] = ()  # settings that need a restart (keys): the reload is refused

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.replaced or self.retuned or self.live or self.restart)

    def summary(self) -> str:
        parts = [f"{what} {','.join(names)}" for what, names in (
            ("added", [u.name for u in self.added]), ("removed", self.removed),
            ("replaced", [u.name for u in self.replaced]), ("retuned", [u.name for u in self.retuned]),
            ("changed", self.live)) if names]
        return "; ".join(parts) or "nothing changed"


def _identity(v: VipSpec) -> tuple[Any, ...]:
    return tuple(getattr(v, f) for f in IDENTITY)


def _changed_keys(prefix: str, old: Any, new: Any, skip: tuple[str, ...] = ()) -> list[str]:
    return [f"{prefix}{f.name}" for f in fields(old) if f.name not in skip
            and getattr(old, f.name) != getattr(new, f.name)]


def diff(old: "Config", new: "Config") -> Diff:
    restart = [k for k in RESTART if getattr(old, k) != getattr(new, k)]
    restart += [f"timing.{k}" for k in RESTART_TIMING if getattr(old.timing, k) != getattr(new.timing, k)]
    live = _changed_keys("timing.", old.timing, new.timing, RESTART_TIMING)
    live += _changed_keys("placement.", old.placement, new.placement)
    live += _changed_keys("host.", old.host, new.host)
    live += ["hooks"] if old.hooks != new.hooks else []
    live += ["log_level"] if old.log_level != new.log_level else []
    before = {u.name: u for u in old.units}
    after = {u.name: u for u in new.units}
    added = tuple(u for n, u in after.items() if n not in before)
    removed = tuple(n for n in before if n not in after)
    replaced, retuned, unchanged = [], [], []
    for name, u in after.items():
        was = before.get(name)
        if was is None:
            continue
        if was == u:
            unchanged.append(name)
        elif [_identity(v) for v in was.vips] == [_identity(v) for v in u.vips]:
            retuned.append(u)
        else:
            replaced.append(u)
    # egress rules name VIPs; the rules were built at start from their addresses
    egress_vips = {e.vip for e in old.egress}
    for u in replaced:
        for v in before[u.name].vips:
            if v.name in egress_vips:
                restart.append(f"egress (VIP {v.name} used by an egress rule changed)")
    for name in removed:
        if any(v.name in egress_vips for v in before[name].vips):
            restart.append(f"egress (VIP of {name} used by an egress rule removed)")
    # the DSR director and backend roles (vipd/wiring_dsr.py) are built at start from the services
    dsr_old = {v.name: v.services for v in old.vips if v.services}
    dsr_new = {v.name: v.services for v in new.vips if v.services}
    if dsr_old != dsr_new:
        changed = sorted(n for n in {*dsr_old, *dsr_new} if dsr_old.get(n) != dsr_new.get(n))
        restart.append(f"services (DSR of VIP {', '.join(changed)} changed)")
    return Diff(added, removed, tuple(replaced), tuple(retuned), tuple(unchanged), tuple(live), tuple(restart))

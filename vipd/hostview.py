"""The kernel's view of this host's addresses, handed to the units that can act on it (issue 13).

The reconcile tick lists the tagged addresses once; instead of one Reconcile event per unit per
tick (a task wake-up each), `reconcile_posts` picks the units whose kernel view disagrees with
their state, which are exactly the ones the core acts on (vipd/ownership/fsm.py: a unit holding
its addresses re-adds a missing one; a unit not holding them removes a present one). Everything
else would be a no-op step. Level-triggered still: a unit whose view keeps disagreeing is posted
on every tick.

`UnitIndex` maps an interface and an IP to its controller once, for kernel events (no scan of
every controller per event).
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, Mapping, Sequence, Union

from vipd.model import Reconcile, State
from vipd.ownership.controller import Controller
from vipd.ownership.state import HOLDING

IP = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def disagrees(state: State, missing: bool, present: bool) -> bool:
    """The kernel view differs from what the unit's state implies (holding: all present;
    otherwise: none present)."""
    return missing if state in HOLDING else present


def reconcile_posts(controllers: Iterable[Controller], present: set[str], taken_at: float) -> int:
    """Post Reconcile to every unit whose view disagrees with its state; returns how many."""
    posted = 0
    for c in controllers:
        held = [v.name in present for v in c.vips]
        missing, any_held = not all(held), any(held)
        if disagrees(c.state.state, missing, any_held):
            c.post(Reconcile(missing=missing, present=any_held, taken_at=taken_at))
            posted += 1
    return posted


class UnitIndex:
    def __init__(self, controllers: Mapping[str, Controller]) -> None:
        self.by_if: dict[str, list[Controller]] = {}
        self.by_ip: dict[tuple[str, IP], Controller] = {}
        for c in controllers.values():
            for v in c.vips:
                units = self.by_if.setdefault(v.interface, [])
                if c not in units:
                    units.append(c)
                self.by_ip[(v.interface, v.ip)] = c

    def on_interface(self, ifname: str) -> Sequence[Controller]:
        return self.by_if.get(ifname, ())

    def holding(self, ifname: str, ip: IP) -> Controller | None:
        return self.by_ip.get((ifname, ip))

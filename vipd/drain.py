"""`vipd drain` / `vipd undrain`: hand every VIP this host owns to another host, make before
break, and keep the host ineligible until undrained, across daemon restarts.

Drain, in this order:
1. Persist: `<state_dir>/drained` is written (fsynced) first, so a daemon restarted from here on
   comes back drained: owning nothing and campaigning for nothing (`restore`, before any campaign).
2. Publish: the presence says drained while the units are still served here, so every host's
   placement drops this host. Wait (at most PUBLISH_WAIT) until this host's own view of the
   directory shows it drained and, for each unit it owns, a candidate other than itself: the
   successor is healthy, holds a lease and campaigns first as soon as the key is handed back.
3. Hand over: every unit becomes unfit here; each owner removes its addresses, then hands the key
   back marked clean, and the successor claims at once, without a conflict probe: one planned
   handover per VIP, nothing more.
4. Report, after at most HANDOVER_WAIT: each VIP's new owner, or that nobody took it (no other
   healthy host: the VIP is down until one comes or the host is undrained).
Undrain removes the file; the presence and every unit are fit again (preemption may bring VIPs
back here, as for any host that turned healthy).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import trio

from vipd import log
from vipd.model import OwnerRecord, State

if TYPE_CHECKING:
    from vipd.app import Daemon

PUBLISH_WAIT = 5.0  # s: how long the drain waits for the successors to see this host drained
HANDOVER_WAIT = 10.0  # s: how long it waits for other hosts to own what this host let go


def drained_path(state_dir: str) -> str:
    return os.path.join(state_dir, "drained")


def read_drained(state_dir: str) -> str | None:
    """The persisted drain reason, or None when the host is not drained."""
    try:
        with open(drained_path(state_dir)) as f:
            return f.read().strip() or "drained"
    except FileNotFoundError:
        return None


class Drain:
    def __init__(self, daemon: "Daemon") -> None:
        self._d = daemon
        self._owners: dict[str, OwnerRecord] = {}
        self._owner_seen = trio.Event()
        daemon.keys.listeners.append(self._saw)

    def _saw(self, name: str, record: OwnerRecord) -> None:
        self._owners[name] = record
        self._owner_seen.set()

    @property
    def path(self) -> str:
        return drained_path(self._d.cfg.state_dir)

    def restore(self) -> None:
        reason = read_drained(self._d.cfg.state_dir)
        if reason is not None:
            log.info("drained", reason=reason, since="before this start", vips=0)
            self._d.fitness.set_drained(reason)

    async def drain(self) -> dict[str, Any]:
        d = self._d
        reason = f"since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"
        if d.fitness.drained:
            reason = d.fitness.drained
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write(reason + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        owned = sorted(n for n, c in d.controllers.items() if c.state.state in (State.OWNER, State.ACQUIRING))
        log.info("draining", vips=",".join(owned) or "-")
        d.fitness.set_drained(reason, units=False)
        with trio.move_on_after(PUBLISH_WAIT) as waited:
            await d.directory.wait(lambda: self._published(owned))
        if waited.cancelled_caught:
            log.warning("drain_unconfirmed", reason=f"no successor seen within {PUBLISH_WAIT:g}s for "
                        f"{','.join(n for n in owned if not self._successors(n)) or '-'}; handing over anyway")
        d.fitness.set_drained(reason, units=True)  # every owner releases now
        with trio.move_on_after(HANDOVER_WAIT):
            while not self._handed_over(owned):
                self._owner_seen = trio.Event()
                await self._owner_seen.wait()
        moved = {n: self._owner_of(n) for n in owned}
        for n, to in moved.items():
            log.info("drain_handover", vip=n, to=to or "-")
        return {"drained": True, "vips": moved,
                "still_here": sorted(n for n in owned if d.controllers.get(n) is not None
                                     and d.controllers[n].state.state is not State.BACKUP)}

    def undrain(self) -> dict[str, Any]:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        was = bool(self._d.fitness.drained)
        self._d.fitness.set_drained("")
        log.info("undrained", was_drained=was)
        return {"drained": False, "was_drained": was}

    def _successors(self, unit: str) -> list[str]:
        return [h for h in self._d.directory.placement.get(unit, ()) if h != self._d.cfg.node]

    def _published(self, owned: list[str]) -> bool:
        me = self._d.directory.hosts.get(self._d.cfg.node)
        return me is not None and me.drained and all(self._successors(n) for n in owned)

    def _owner_of(self, unit: str) -> str | None:
        rec = self._owners.get(unit)
        return rec.node if rec is not None and rec.node != self._d.cfg.node else None

    def _handed_over(self, owned: list[str]) -> bool:
        return all(self._owner_of(n) is not None for n in owned)

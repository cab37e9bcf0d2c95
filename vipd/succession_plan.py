"""Fast takeover, the owner's plan: which peer each unit it owns should name as successor, when
to look again, and when a peer's newer generation may count (a mixin of vipd.succession.Succession,
whose state it reads; the rules are stated in that module's docstring, under Liveness)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Sequence

from vipd import log
from vipd.model import OwnerRecord
from vipd.peers.protocol import Generation
from vipd.succession_ports import Link, PeersPort

HOLD_DOWN = 1.0  # seconds a peer must have been heard without a suspicion before it is named successor
# seconds a better-ranked peer must have been nameable before it replaces a live successor: a
# rename away from a late successor is followed by no rename back for that long. At 1 s (= HOLD_DOWN)
# the two fed each other on a loaded host: each rename of hundreds of units (etcd, token arms, every
# peer's watch) made the next echo late, and units flipped between two live peers every second.
REBALANCE_AFTER = 10.0
PLAN_EVERY = 1.0  # seconds: the longest the planner goes without a pass over the units
# seconds a peer that was renamed away because it was late is not named again at most (`_hold_late`):
# HOLD_DOWN the first time, twice the last hold when it is late again within this long of the
# last hold's end. Without it, two hosts left after a planned stop of the third, each late to the
# other now and then under the takeover's load, renamed every unit to nobody and back each second
# (bench/scale.py at 3,000 VIPs: `planned_stop.after.renames_to_nobody`)
LATE_HOLD_MAX = 16.0


class Planning:
    node: str
    enabled: bool
    _peers: PeersPort
    _lease: float
    _placement: Callable[[str], Sequence[str]]
    _records: dict[str, OwnerRecord]
    _owned: dict[str, Any]
    _naming: dict[str, tuple[str | None, Generation | None]]
    _suspected_at: dict[str, float]
    _eligible_since: dict[str, float]
    _short_kept: set[str]  # peers short of grant but not late, as of the last _plan_inputs: kept as successor
    _version: int

    _late_hold: dict[str, tuple[float, float]]  # peer -> (when renamed away for being late, for how long)
    _late_units: set[str]  # units the last plan renamed away from their successor because it was late
    _fresh: dict[str, tuple[int, Generation | None]]
    _uncertain: dict[str, dict[str, Generation | None]]

    if TYPE_CHECKING:
        def _peers_used(self) -> tuple[set[str], set[str]]: ...
        def _depends(self, unit: str) -> list[str]: ...

    def _eligible(self, peer: str, now: float) -> bool:
        link = self._peers.link(peer)
        if link is None or link.suspected or link.peer_gen is None:
            return False
        if now - self._suspected_at.get(peer, -math.inf) < HOLD_DOWN:
            return False
        at, hold = self._late_hold.get(peer, (-math.inf, 0.0))
        if now - at < hold:
            return False
        granted = link.granted_until(link.peer_gen)
        return granted is not None and granted > now + self._lease / 2

    def _late(self, peer: str, now: float) -> bool:
        """Has the peer left a heartbeat of ours unechoed for L/2 (the oldest we sent after the
        newest it echoed went out that long ago), or been suspected within HOLD_DOWN? A successor
        whose grant runs short but is not late is kept: what is late is this host (its loop or
        its heartbeat thread did not send or did not read: a collector pause stops both), and a
        rename would churn every unit the successor has. After such a pause the first heartbeat
        goes out before its echo can be back: judged by our newest send, as it was, every peer
        looked late at once. And L/4 (22 ms at the shipped timing) was shorter than the echo
        delays of a loaded host: at 3,000 VIPs on 3 hosts the steady state renamed thousands of
        units between two live peers (bench/scale.py, "successor renames while steady"), each
        rename (etcd, token arms, every peer's watch) loading the hosts into the next. A dead successor is late L/2 after the first heartbeat it left unechoed, which
        leaves the rename L/2 before the grant it bounds runs out."""
        link = self._peers.link(peer)
        if link is None or link.suspected or now - self._suspected_at.get(peer, -math.inf) < HOLD_DOWN:
            return True
        granted = link.granted_until()
        if granted is None:
            return True
        at = self._late_at(link, granted)
        return at is not None and now >= at

    def _late_at(self, link: Link, granted: float) -> float | None:
        """When the peer turns late by its echoes: L/2 after the oldest heartbeat we sent after the
        newest it echoed (whose send time is `granted` - L); None while we sent nothing since."""
        first = link.unechoed_since(granted - self._lease)
        return None if first is None else first + self._lease / 2

    def _choose(self, unit: str, now: float) -> str | None:
        for host in self._placement(unit):
            if host != self.node and self._eligible(host, now):
                return host
        return None

    def _plan_inputs(self, now: float) -> tuple[object, ...]:
        """Note since when each peer is nameable; return what a plan reads besides the units, their
        records and the placement (O(peers)): the same inputs make the same (empty) plan."""
        out: list[object] = [self._version]
        self._short_kept = set()
        for peer in self._peers.peer_names():
            if self._eligible(peer, now):
                self._eligible_since.setdefault(peer, now)
            else:
                self._eligible_since.pop(peer, None)
            link = self._peers.link(peer)
            since = self._eligible_since.get(peer)
            if since is None and not self._late(peer, now):
                self._short_kept.add(peer)
            out.append((peer, since is not None and now - since >= REBALANCE_AFTER, since is not None,
                        peer in self._short_kept, link.peer_gen if link else None,
                        link.validated if link else None))
        return tuple(out)

    def _plan(self, now: float) -> list[tuple[str, OwnerRecord, str | None]]:
        plan: list[tuple[str, OwnerRecord, str | None]] = []
        if not self.enabled:
            return plan
        self._plan_inputs(now)  # (and which peers are short of grant but not late, for this pass)
        late: set[str] = set()  # units renamed away from a successor because it is late (or suspected)
        for unit in self._owned:
            rec = self._records.get(unit)
            if rec is None or rec.node != self.node or rec.released or unit in self._naming:
                continue
            want = self._choose(unit, now)
            current = rec.successor
            if (current is not None and current != want and current in self._placement(unit)
                    and (want is not None and now - self._eligible_since.get(want, now) < REBALANCE_AFTER
                         if self._eligible(current, now) else current in self._short_kept)):
                want = current  # keep a live candidate: no churn while the ranking settles, or while we are late
            link = self._peers.link(current) if current else None
            stale = link is not None and link.peer_gen is not None and (
                link.validated is None or link.peer_gen > link.validated)
            if want != current or (stale and want == current):
                plan.append((unit, rec, want))
            if current is not None and want != current and current in self._placement(unit) \
                    and current not in self._short_kept and not self._eligible(current, now):
                late.add(unit)
        self._late_units = late
        return plan

    def _still_late(self, plan: list[tuple[str, OwnerRecord, str | None]], now: float,
                    ) -> list[tuple[str, OwnerRecord, str | None]]:
        """The plan's renames, less those away from a successor planned because it was late that is
        no longer late now, right before the transaction goes out (a pass over thousands of units
        on a loaded host can take longer than the echo: the first `successor_held_off` lines
        showed the successor's oldest unechoed heartbeat younger than the pass). A successor
        renamed away is held off (`_hold_late`)."""
        out, held = [], set()
        for item in plan:
            current = item[1].successor
            if item[0] in self._late_units and current is not None:
                if not self._late(current, now):
                    continue
                held.add(current)
            out.append(item)
        for peer in held:
            self._hold_late(peer, now)
        return out

    def _hold_late(self, peer: str, now: float) -> None:
        """Renames away from `peer` go out because it is late: it is not named again for
        HOLD_DOWN, or for twice its last hold if that ended less than LATE_HOLD_MAX ago. The units
        that still name it keep it while it answers (`_short_kept`); none is renamed back to it
        meanwhile, so a pair of loaded hosts each late now and then renames their units to nobody
        and back ever more rarely, not every second."""
        at, hold = self._late_hold.get(peer, (-math.inf, 0.0))
        if now - at < hold:  # (held already: a later pass re-planning the same episode)
            return
        hold = min(2 * hold, LATE_HOLD_MAX) if now - at - hold < LATE_HOLD_MAX else HOLD_DOWN
        self._late_hold[peer] = (now, hold)
        link = self._peers.link(peer)
        granted = link.granted_until() if link is not None else None
        first = link.unechoed_since(granted - self._lease) if link is not None and granted is not None else None
        log.info("successor_held_off", peer=peer, hold=hold,
                 why="gone" if link is None else "suspected" if link.suspected else "no grant" if granted is None
                 else "late",
                 unechoed_ms=round((now - first) * 1000) if first is not None else None)

    def _next_check(self, now: float) -> float:
        """When a named successor's grant falls within L/2 of running out (time to rename); for one
        short of grant already but not late (this host paused, or its echo is on the way), when it
        would be late, so the planner never spins on a check time in the past."""
        times = []
        for peer in self._peers_used()[0]:
            link = self._peers.link(peer)
            granted = link.granted_until() if link is not None else None
            if link is None or granted is None:
                continue
            check = granted - self._lease / 2
            if check <= now:
                at = self._late_at(link, granted)
                check = max(now + self._lease / 2 if at is None else at, now + self._lease / 8)
            times.append(check)
        times += [t + HOLD_DOWN for t in self._suspected_at.values() if t + HOLD_DOWN > now]
        times += [at + hold for at, hold in self._late_hold.values() if at + hold > now]
        times += [t + REBALANCE_AFTER for t in self._eligible_since.values() if t + REBALANCE_AFTER > now]
        return min(times, default=now + 1.0)

    # ---- when a peer's generation counts (the argument: vipd/succession.py) ----------------------

    def _validate_unused(self) -> None:
        """A peer no record of ours depends on cannot take anything over from us: accept its generation."""
        used = self._peers_used()[1]
        for peer in self._peers.peer_names():
            link = self._peers.link(peer)
            if peer not in used and link is not None and link.peer_gen is not None and (
                    link.validated is None or link.peer_gen > link.validated):
                self._peers.validate(peer, link.peer_gen)

    def _rewritten_since(self, peer: str, ours: set[str]) -> Generation | None:
        """The generation of `peer` that may be validated: some unit of ours depends on it, and
        the record of every one that does names it as written by a transaction of ours (a
        rename, or a rewrite naming it again) that started after we had seen that generation;
        the oldest such (each transaction saw its own). None if a unit is not so (never
        rewritten, changed since by another write, a rename of unknown outcome). A plan of
        thousands of units goes out in batches of RENAME_BATCH, so this spans the batches of a
        pass: before, each batch only counted its own units, and with more than one batch of
        units naming a peer whose generation had moved (a false suspicion) the generation was
        never validated: every pass rewrote them all again while their tokens stayed closed
        (tests/unit/test_succession.py, 250 units). Stops at the first unit that is not."""
        oldest: Generation | None = None
        for u in ours:
            if peer in self._depends(u):
                rec, fresh = self._records.get(u), self._fresh.get(u)
                if (rec is None or fresh is None or fresh[0] != rec.revision or rec.successor != peer
                        or fresh[1] is None or u in self._uncertain or u in self._naming):
                    return None
                if oldest is None or fresh[1] < oldest:
                    oldest = fresh[1]
        return oldest

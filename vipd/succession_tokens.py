"""Fast takeover, the owner's tokens: each owned unit's kernel token and its successor's grant,
computed from the unit's record, renames in flight and the peers' grants, and re-armed when they
move (a mixin of vipd.succession.Succession, whose state it reads; why these deadlines make a
takeover safe is that module's docstring: the token cap is the bound its argument uses)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import trio

from vipd import log
from vipd.errors import DataplaneError
from vipd.model import OwnerRecord, VipSpec
from vipd.peers.protocol import Generation
from vipd.succession_ports import PeersPort, TokenFence


@dataclass
class Owned:
    vips: Sequence[VipSpec]
    h_etcd: float
    armed: float = -math.inf  # the token's deadline last armed


class Tokens:
    node: str
    _fence: TokenFence
    _peers: PeersPort
    _clock: Any
    _step: float
    _owned: dict[str, Owned]
    _records: dict[str, OwnerRecord]
    _naming: dict[str, tuple[str | None, Generation | None]]
    _uncertain: dict[str, dict[str, Generation | None]]
    _version: int
    _lock: trio.Lock
    _refresh: trio.Event
    _handed: set[str]
    _heard: set[str]
    _scanned: int
    _direct: set[str]
    _grouped: set[str]
    _granted: dict[str, float]
    refreshes: int
    enabled: bool
    # a daemon stop (`begin_stop`, `flush_tokens`): set once it began (from then on no token is
    # armed and no successor named), and the units whose tokens its one flush removed
    _flush_done: trio.Event | None = None
    _flushed: frozenset[str] = frozenset()
    _to_flush: dict[str, Owned] = {}  # (replaced, never changed in place)

    # ---- a daemon stop ------------------------------------------------------------------------

    def begin_stop(self) -> None:
        """A daemon stop begins (vipd/app.py Daemon.stop, before the units are asked to stop): from
        now on no token is armed (`_arm`) and no successor named (Succession._rename: a record
        may name one only after the tokens are bounded by its grant), and each unit's disarm
        waits for `flush_tokens`."""
        self._flush_done = trio.Event()
        self._to_flush = dict(self._owned)  # (a unit's disarm may pop it before the flush runs)

    async def flush_tokens(self) -> None:
        """Every owned unit's token out of the kernel in one batch, at the start of a stop.

        Safety: `begin_stop` ran before anything waited, so every arm not yet writing returns
        without writing; the flush takes the lock, so the one arm that may be writing has written
        before it: from the flush on no VIP of this host passes its token. Each unit's own disarm
        then waits for the flush (`_flushed_already`) and goes on to remove its address and mark
        its key, as before: fence, address, etcd, in that order; the fence step is only earlier
        and shared. A flush that fails leaves every unit's own disarm to run as before. Without
        it the units' disarms queued on this lock behind the keepalive's arms and the renames
        (bench/scale.py: the stopping host's `keys_marked_s`)."""
        done = self._flush_done
        try:
            async with self._lock:
                units = self._to_flush
                vips = [v for o in units.values() for v in o.vips]
                if self.enabled and vips:
                    try:
                        await self._fence.disarm(vips)
                    except DataplaneError as e:
                        log.error("token_flush_failed", units=len(units), error=e)
                        return
                self._flushed = frozenset(units)
        finally:
            if done is not None:
                done.set()

    async def _flushed_already(self, items: Sequence[Sequence[VipSpec]]) -> bool:
        """True once the stop's flush removed the tokens of every unit of `items` (it waits for the
        flush): their disarm is done. False outside a stop."""
        done = self._flush_done
        if done is None:
            return False
        await done.wait()
        return all(vips[0].unit in self._flushed for vips in items)

    # ---- the token ---------------------------------------------------------------------------

    def _depends(self, unit: str) -> list[str]:
        """Peers whose grants bound the unit's token: the named successor, a rename's target, and the
        targets of renames whose outcome is unknown (etcd may name them)."""
        rec = self._records.get(unit)
        out = [rec.successor] if rec is not None and rec.node == self.node and rec.successor else []
        target = self._naming.get(unit, (None, None))[0]
        for peer in [target, *sorted(self._uncertain.get(unit, ()))]:
            if peer and peer not in out:
                out.append(peer)
        return out

    def _cap(self, unit: str, owned: Owned, memo: dict[tuple[str, Generation | None, bool], float | None] | None = None) -> float:
        """The unit's token deadline: H_etcd, bounded by the grants of every peer that may take it
        over; -inf (no token) once the key names another owner. `memo`: the peers' grants, read
        once per pass over thousands of units (a grant is a pure function of its link's state,
        which no pass awaits within)."""
        rec = self._records.get(unit)
        if rec is not None and rec.node != self.node:
            return -math.inf  # replaced (a takeover): never re-open, whatever the controller still thinks
        cap = owned.h_etcd
        target, gen = self._naming.get(unit, (None, None))
        for peer in self._depends(unit):
            link = self._peers.link(peer)
            if link is None:
                return -math.inf
            uncertain = self._uncertain.get(unit, {})
            if peer in uncertain:  # etcd may name it since a rename that started with this generation
                key = (peer, uncertain[peer], True)
            elif peer == target and (rec is None or rec.successor != target):
                key = (peer, gen, True)  # a rename in flight: generations seen at its start
            else:  # the named successor: validated generations only (it may have taken over already)
                key = (peer, None, False)
            if memo is not None and key in memo:
                granted = memo[key]
            else:
                granted = link.granted_upto(key[1]) if key[2] else link.granted_until()
                if memo is not None:
                    memo[key] = granted
            cap = min(cap, granted if granted is not None else -math.inf)
        return cap

    def _via(self, unit: str) -> str | None:
        """The successor in whose grant's group the unit is: its record (ours) names S, and no rename
        is in flight or of unknown outcome. Its token is then H_etcd and S's grant bounds it in the
        kernel (vipd/dataplane/fence_build.py): the same deadline as min(H_etcd, granted_until(S)),
        one element for every unit S succeeds. Any other unit: its token carries the whole cap."""
        rec = self._records.get(unit)
        if (rec is None or rec.node != self.node or not rec.successor or unit in self._naming
                or unit in self._uncertain):
            return None
        return rec.successor

    def _grant(self, peer: str) -> float:
        """The deadline of `peer`'s group: its grant from validated generations (as `_cap` reads a
        named successor's)."""
        link = self._peers.link(peer)
        granted = link.granted_until() if link is not None else None
        return granted if granted is not None else -math.inf

    def _grants_due(self, also: frozenset[str] = frozenset()) -> list[tuple[str, float]]:
        """Grants to re-arm: of every group in use (and of `also`: the groups of the units being
        armed), those that moved a step forward, fell, or were never armed."""
        out = []
        for peer in (self._grouped | also) - self._handed:  # (handed ones: the heartbeat thread's)
            g, was = self._grant(peer), self._granted.get(peer)
            if was is None or g < was or g - was >= self._step:
                out.append((peer, g))
        return out

    async def _arm(self, units: list[tuple[str, Owned]], caps: list[float] | None = None,
                   grants: list[tuple[str, float]] | None = None) -> None:
        """Arm each unit's token to its cap (`caps`: computed by the caller in this same step), put it
        in its successor's group or in none, and arm the grants due, in one batch (call with the
        lock held). Nothing once a daemon stop began (`begin_stop`)."""
        if self._flush_done is not None:  # (a stop began)
            return
        floor = self._clock() - 1.0  # "already over": the fence removes the token
        vias = [self._via(u) for u, _ in units]
        if caps is None:
            memo: dict[tuple[str, Generation | None, bool], float | None] = {}
            caps = [o.h_etcd if via else self._cap(u, o, memo) for (u, o), via in zip(units, vias)]
        if grants is None:
            grants = self._grants_due(frozenset(via for via in vias if via is not None))
        await self._fence.arm_many([(o.vips, max(cap, floor)) for (_, o), cap in zip(units, caps)],
                                   grants=[(p, max(g, floor)) for p, g in grants],
                                   groups=[(o.vips, via) for (_, o), via in zip(units, vias)])
        for (_, o), cap in zip(units, caps):
            o.armed = cap
        self._granted.update(grants)
        self.refreshes += 1
        # a grant now in the kernel goes to the heartbeat thread, which re-arms it as echoes
        # arrive (vipd/peers/grants.py: from the trio loop it lapsed in takeover waves); this side
        # never writes it again
        ids = {p: gid for p, _ in grants if (gid := self._fence.grant_id(p)) is not None}
        if ids and self._peers.hand_grants(ids):
            self._handed.update(ids)

    def wants_ack(self, peer: str) -> bool:
        """Asked by the heartbeat thread before an Acked wakes the loop (plain reads, no lock: each
        is one read of a field only this loop writes). Wanted while anything here follows acks:
        `peer` not heard since its last suspicion (the planner wakes once for it), a unit outside
        a group (its token's cap follows the grants), a grant not handed to the thread yet, a pass
        over every unit pending (a version not scanned: the next ack runs it). Otherwise at rest
        every ack (two peers, every 10 ms: ~200 a second) woke the loop for a pass with nothing
        to do; the grants' re-arms are the thread's own (vipd/peers/grants.py)."""
        return (peer not in self._heard or bool(self._direct) or self._scanned != self._version
                or not self._grouped <= self._handed)

    async def refresh(self) -> None:
        """Re-arm what moved a step forward (or fell) after acks, renames, records: the grants of the
        groups in use (one element per successor), and the tokens of units outside a group whose
        cap follows grants. A pass over every unit only when what `_via`/`_cap` read changed
        (`_version`): an ack then costs O(peers + units in a rename), not O(units)."""
        while True:
            await self._refresh.wait()
            self._refresh = trio.Event()
            async with self._lock:
                version = self._version
                full = self._scanned != version
                units = self._owned if full else {u: self._owned[u] for u in self._direct if u in self._owned}
                memo: dict[tuple[str, Generation | None, bool], float | None] = {}
                due, caps, direct, grouped = [], [], set(), set()
                for u, o in units.items():
                    via = self._via(u)
                    if via is not None:
                        grouped.add(via)
                        cap = o.h_etcd
                    else:
                        cap = self._cap(u, o, memo)
                        if self._depends(u):
                            direct.add(u)
                    if cap < o.armed or cap - o.armed >= self._step or via != self._fence.grant_of(o.vips[0]):
                        due.append((u, o))
                        caps.append(cap)
                if full:
                    self._scanned, self._direct, self._grouped = version, direct, grouped
                grants = self._grants_due()
                if due or grants:
                    try:
                        await self._arm(due, caps, grants)
                    except DataplaneError as e:  # the tokens end at their previous deadlines: loud, never unsafe
                        log.error("token_refresh_failed", units=len(due), error=e)


"""Fast takeover, host-level: the successor of every unit this host owns, the kernel token that
makes a takeover by it safe, and the takeover itself (PacificA-style leases through etcd).

Roles. The owner O of a unit names a successor S in the unit's owner key (`successor=S`, written
by a transaction comparing the key's mod revision: vipd/election/owners.py). O and S exchange
heartbeats every h (vipd/peers: one datagram per host pair, never one per unit). S's acks grant O
a peer lease: O may serve until granted_until(S) = send time of the newest heartbeat S echoed + L.
O's kernel token (the nftables element of each VIP, vipd/dataplane/fence_nft.py) is armed to
    token(unit) = min(H_etcd, granted_until(S))     while the key names S,
    token(unit) = H_etcd                            while it names nobody,
where H_etcd is the controller's fence deadline (the last acknowledged keepalive's send time + TTL
- margin). In the kernel the first case is two elements: the unit's token armed to H_etcd, and the
unit in S's grant group, whose one grant element is armed to granted_until(S) for every unit S
succeeds (vipd/dataplane/fence_build.py; once the group exists, re-armed by the heartbeat thread as
S's echoes arrive: vipd/peers/grants.py); the kernel serves the unit while both live, i.e. until
the same min. A unit whose record is being rewritten (a rename in flight, or of unknown outcome)
leaves the group in the same atomic batch that arms its token to its whole cap (every grant that
bounds it), and rejoins once the record names one successor again: so an ack re-arms one element
per successor, and the token bound below holds for every element. When S hears nothing from O for the grace G after its last ack, S replaces the key by
a transaction comparing the mod revision of the record naming it, then claims the VIP at once.

Why no two hosts serve at once. Every change of a unit's owner or successor is a transaction on
that one key, compared on its mod revision, so they are totally ordered. Take the record naming S
at revision R; S takes over only by a transaction comparing R, sent while suspect(O) holds at the
moment of sending (the transport drains its socket first). vipd/peers/protocol.py proves that every
token O armed from an echo S sent before deciding ends before S's decision: sent_at(k) + L <
acked_at + G <= decision, given G - L > (G + L) * eps + d + tick (clock-rate error, clock read to
kernel arm, nft tick; the defaults leave ~35 ms for d). Echoes S sends after deciding carry a newer
suspicion generation; O counts them only after `validate`, which it calls only when every record of
its own naming S was rewritten by a transaction that O started after seeing that generation (one
per record suffices: each compare is on its own key; so any
takeover transaction of S comparing an older revision fails, and a later one needs a fresh
suspicion, whose echoes again carry a newer generation). While a rename from S1 to S2 is in
flight the token is bounded by both grants (armed so BEFORE the transaction is sent: a commit can
only follow that arm), S2's counting echoes of the generations seen when the rename started, and
only if no record in etcd can name S2 yet (a rewrite of the current
successor to validate its new generation counts nothing new until it commits; after an etcd
error the target counts only the generations seen when that rename started); after it commits,
S1's transactions fail. The takeover
after the lease expires in etcd (no successor, or none alive) keeps the old argument: O's token
and address lifetime end at H_etcd, before etcd can expire the lease.
What it assumes of etcd: linearisable transactions on one key (a leader change loses no
committed write). It does not depend on lease timing. A thawed O re-opens nothing: its token
lapsed in the kernel, and every arm it makes is capped by grants that a new suspicion generation
no longer extends; its next rewrite fails the compare and the controller fences.

Liveness: O renames the successor (to the best other candidate whose acks arrive, or to nobody)
when S has left a heartbeat of O unechoed for L/2, so a dead standby costs O nothing as long as
etcd answers within L/2; not when it is O that is late (it sent nothing since S's newest echo, or
only just now: O's own loop or thread stalled), which would rename every unit S succeeds for
nothing (vipd/succession_plan.py `_late`; a rename away from S is withdrawn if S's echo came
while the pass ran, `_still_late`). A successor must have been heard continuously for HOLD_DOWN
before it is named, one renamed away for being late as long, doubled while it keeps being late
(`_hold_late`: flapping links and loaded peers cause no move storms), and S takes over only
while it can reach etcd (the transaction). A live successor is kept while the placement lists
it, until a better-ranked peer has been nameable for REBALANCE_AFTER = 10 s (successors spread by
placement once hosts settle), and replaced at once when the placement drops it.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import trio

from vipd import log
from vipd.coalesce import Coalescer
from vipd.errors import DataplaneError, EtcdError
from vipd.model import Event, OwnerRecord, PeerRecovered, PeerSuspected, VipSpec
from vipd.peers.protocol import Acked, Challenged, Generation, Recovered, Suspected
from vipd.peers.protocol import Event as PeerEvent
from vipd.succession_plan import HOLD_DOWN, PLAN_EVERY, REBALANCE_AFTER, Planning
from vipd.succession_tokens import Owned, Tokens
from vipd.succession_ports import Counts, Keys, PeersPort, TokenFence

__all__ = ["HOLD_DOWN", "PLAN_EVERY", "REBALANCE_AFTER", "Succession"]

RETRY = 0.1  # seconds before a failed rename is tried again
RENAME_BATCH = 100  # units per rename transaction (under etcd's --max-txn-ops)
RENAME_PARALLEL = 4  # rename transactions of one pass in flight at once


class Succession(Tokens, Planning):
    """Implements vipd.fence.Fence (the token fence, capped by the successor's grants) and the
    controller's TakeoverPort; `run` names successors. All on the trio thread."""

    def __init__(self, node: str, fence: TokenFence, keys: Keys, peers: PeersPort, *,
                 lease: float, interval: float, placement: Callable[[str], Sequence[str]],
                 broadcast: Callable[[Event], None], metrics: Counts | None = None,
                 clock: Callable[[], float] = trio.current_time) -> None:
        self.node = node
        self._fence = fence
        self._keys = keys
        self._peers = peers
        self._lease = lease
        self._step = 2 * interval  # re-arm a token when its grant moved this much (or fell)
        self._placement = placement
        self._broadcast = broadcast
        self._metrics = metrics
        self._clock = clock
        self._owned: dict[str, Owned] = {}
        self._records: dict[str, OwnerRecord] = {}  # latest record of every unit (from OwnerKeys)
        self._naming: dict[str, tuple[str | None, Generation | None]] = {}  # rename in flight: unit -> (target, its gen then)
        self._suspected_at: dict[str, float] = {}  # peer -> last suspicion
        self._late_hold: dict[str, tuple[float, float]] = {}  # (vipd/succession_plan.py `_hold_late`,
        self._late_units: set[str] = set()  # `_still_late`)
        # unit -> (revision, successor's generation seen as the transaction started) of the record our
        # last successful rename wrote; unit -> target of a rename of unknown outcome -> the generation
        # seen as the first such started (vipd/succession_plan.py `_rewritten_since`)
        self._fresh: dict[str, tuple[int, Generation | None]] = {}
        self._uncertain: dict[str, dict[str, Generation | None]] = {}
        self._eligible_since: dict[str, float] = {}  # peer -> since when it could be named (as last planned)
        self._short_kept: set[str] = set()  # (vipd/succession_plan.py, per planner pass)
        self._version = 0  # bumped when what `_depends` reads changes: the peers used are recomputed only then
        self._used: tuple[int, set[str], set[str]] = (-1, set(), set())
        self._heard: set[str] = set()  # peers acked since their last suspicion (the planner woke for them)
        self._lock = trio.Lock()  # token arms and disarms never interleave
        self._arms: Coalescer[str, None] = Coalescer(self._arm_batch)
        self._disarms: Coalescer[tuple[VipSpec, ...], None] = Coalescer(self._disarm_batch)
        self._refresh = trio.Event()
        self._scanned = -1  # the version of the last pass over every owned unit
        self._direct: set[str] = set()  # owned units outside a grant's group whose tokens follow grants (as of it)
        self._grouped: set[str] = set()  # the successors owned units are grouped under (as of it)
        self._granted: dict[str, float] = {}  # successor -> the grant last armed for its group
        self._handed: set[str] = set()  # successors whose grant the heartbeat thread re-arms (vipd/peers/grants.py)
        self._wake = trio.Event()
        self.enabled = True  # off when the token fence or the heartbeats cannot run: lease takeover only
        self._succeeding: set[str] = set()  # units another host owns whose record names us successor
        self._unnamed = trio.Event()  # set while _succeeding is empty (a stop waits for it)
        self._unnamed.set()
        self._replan = False  # the placement changed: the planner passes over the units at once
        self.renames = 0
        self.refreshes = 0

    def disable(self, why: str) -> None:
        """Fast takeover off for this run: no tokens, no successors, no takeovers (the address
        lifetime and the etcd lease keep every unit safe, at lease speed)."""
        if self.enabled:
            self.enabled = False
            log.error("fast_takeover_off", reason=why)

    # ---- what the rest of the daemon tells us --------------------------------------------------

    def observe(self, unit: str, record: OwnerRecord) -> None:
        """Every owner record OwnerKeys learns (watch, campaign, takeover, rename)."""
        old = self._records.get(unit)
        if old is None or record.revision >= old.revision:
            self._records[unit] = record
            self._version += 1
            if record.successor == self.node and record.node not in (None, self.node):
                if not self._succeeding:
                    self._unnamed = trio.Event()
                self._succeeding.add(unit)
            elif unit in self._succeeding:
                self._succeeding.discard(unit)
                if not self._succeeding:
                    self._unnamed.set()
            if unit in self._owned:
                self._wake.set()
                self._refresh.set()

    def placement_changed(self) -> None:
        """The host directory placed the units again (a host joined, left, drained or stopping):
        plan now rather than at the next PLAN_EVERY pass, so a successor the placement dropped is
        replaced while its heartbeats still grant."""
        self._replan = True
        self._wake.set()

    async def unnamed(self) -> None:
        """Return once no owner record names this host successor of a unit another host owns: a
        planned stop keeps heartbeating (granting those owners' tokens) until each has renamed its
        successor, so none of their fences closes when this process exits (PacificA: a secondary
        leaves the configuration before it stops granting)."""
        await self._unnamed.wait()

    def on_peer_event(self, ev: PeerEvent) -> None:
        """From the heartbeat transport (its task; never blocks)."""
        if isinstance(ev, Acked):
            self._refresh.set()
            if ev.peer not in self._heard:  # a peer heard again may be nameable: plan now, once
                self._heard.add(ev.peer)
                self._wake.set()
        elif isinstance(ev, Suspected):
            self._heard.discard(ev.peer)
            link = self._peers.link(ev.peer)
            if link is None or link.last_rx is not None:  # a peer never heard did not flap: no hold-down
                self._suspected_at[ev.peer] = self._clock()
            log.warning("peer_suspected", peer=ev.peer, generation=ev.gen)
            self._broadcast(PeerSuspected(ev.peer))
            self._wake.set()
        elif isinstance(ev, Recovered):
            log.info("peer_recovered", peer=ev.peer)
            self._broadcast(PeerRecovered(ev.peer))
            self._wake.set()
        elif isinstance(ev, Challenged):
            self._wake.set()

    # ---- the Fence port --------------------------------------------------------------------

    def covers(self, vips: Sequence[VipSpec]) -> bool:
        return self._fence.covers(vips)

    async def arm(self, vips: Sequence[VipSpec], until: float) -> None:
        if not self.enabled or not self._fence.covers(vips):
            return  # (not in the token table: see arm_many)
        unit = vips[0].unit
        owned = self._own(unit, vips, until)
        owned.h_etcd = until
        await self._arms.submit(unit)  # one batch for every unit armed at the same moment (a keepalive)
        self._wake.set()

    async def arm_many(self, items: Sequence[tuple[Sequence[VipSpec], float]]) -> None:
        """arm() for many units, in one token batch (vipd/refresh.py coalesces the controllers' arms)."""
        if not self.enabled or not items:
            return
        mine: list[tuple[str, Owned]] = []
        for vips, until in items:
            if not self._fence.covers(vips):
                # a VIP the token table does not hold (its update failed): no token, never owned
                # here, so never given a successor, and the others' batch is not failed by it
                continue
            unit = vips[0].unit
            owned = self._own(unit, vips, until)
            owned.h_etcd = until
            mine.append((unit, owned))
        async with self._lock:
            live = [(u, o) for u, o in mine if self._owned.get(u) is o]
            if live:
                await self._arm(live)
        self._wake.set()

    def _own(self, unit: str, vips: Sequence[VipSpec], until: float) -> Owned:
        """The unit's token record (a new one changes what the tokens depend on). Every arm wakes
        the planner afterwards: a keepalive is also its periodic look at generations to validate
        (a chaos replay, seed 3975951903, left tokens closed for good without it)."""
        owned = self._owned.get(unit)
        if owned is None:
            owned = self._owned[unit] = Owned(vips, until)
            self._version += 1
        return owned

    async def disarm(self, vips: Sequence[VipSpec]) -> None:
        self._owned.pop(vips[0].unit, None)
        self._version += 1
        if not self.enabled:
            return
        await self._disarms.submit(tuple(vips))  # one batch for every unit disarmed at the same moment

    async def disarm_many(self, units: Sequence[Sequence[VipSpec]]) -> None:
        """disarm() for many units, in one token batch (vipd/refresh.py)."""
        for vips in units:
            self._owned.pop(vips[0].unit, None)
        self._version += 1
        if not self.enabled or not units:
            return
        await self._disarm_batch([tuple(vips) for vips in units])

    async def _arm_batch(self, units: list[str]) -> list[None]:
        async with self._lock:  # re-read under the lock: a unit disarmed meanwhile is not re-opened
            live = [(u, self._owned[u]) for u in dict.fromkeys(units) if u in self._owned]
            if live:
                await self._arm(live)
        return [None] * len(units)

    async def _disarm_batch(self, items: list[tuple[VipSpec, ...]]) -> list[None]:
        if not await self._flushed_already(items):  # (else a stop's one flush did it: vipd/succession_tokens.py)
            async with self._lock:
                await self._fence.disarm([v for vips in items for v in vips])
        return [None] * len(items)

    def armed_until(self, vips: Sequence[VipSpec]) -> Optional[float]:
        return self._fence.armed_until(vips)

    def successor(self, unit: str) -> str | None:
        rec = self._records.get(unit)
        return rec.successor if rec is not None and rec.node == self.node else None

    # ---- the successor side: take over ------------------------------------------------------

    async def take_over(self, unit: str, record: OwnerRecord, lease: int) -> tuple[bool, OwnerRecord]:
        """The controller's TakeoverPort: only while the owner is suspect at the moment of sending."""
        if (not self.enabled or record.node is None or self._peers.link(record.node) is None
                or not self._peers.suspect(record.node)):
            return False, record
        owner = record.node
        # batched with the takeovers of every other unit of that owner; suspect() is asked again
        # right before the transaction goes out (the argument above: sent while suspect holds)
        won, now = await self._keys.take_over(unit, record, lease, lambda: self._peers.suspect(owner))
        if won and self._metrics is not None:
            since = self._suspected_at.get(record.node)
            self._metrics.record_takeover(unit, "peer", None if since is None else self._clock() - since)
        return won, now

    # ---- the owner side: name successors (the plan: vipd/succession_plan.py) -----------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.refresh)
            task_status.started()
            planned: tuple[object, ...] = ()
            planned_at = -math.inf
            while True:
                now = self._clock()
                self._validate_unused()
                # a pass over the units when what it reads changed (or every PLAN_EVERY: the placement
                # has no version), not at every wake: the grant checks wake this loop every ~L/2
                inputs = self._plan_inputs(now)
                plan = []
                if self._flush_done is None and (  # (once a stop began no successor is named: no pass)
                        inputs != planned or now - planned_at >= PLAN_EVERY or self._replan):
                    self._replan = False
                    plan, planned, planned_at = self._plan(now), inputs, now
                if plan:
                    await self._rename_all(plan)
                    continue
                self._wake = trio.Event()
                with trio.move_on_after(max(0.0, self._next_check(now) - now)):
                    await self._wake.wait()

    def _peers_used(self) -> tuple[set[str], set[str]]:
        """The peers `_depends` names for the units we own, and for every unit of `_ours()`;
        recomputed only when something it reads changed."""
        if self._used[0] != self._version:
            owned = {p for u in self._owned for p in self._depends(u)}
            ours = owned | {p for u in self._ours() - set(self._owned) for p in self._depends(u)}
            self._used = (self._version, owned, ours)
        return self._used[1], self._used[2]

    def _ours(self) -> set[str]:
        """Units we own, and units whose record as we last saw it names us (we may arm them again:
        a stale view after a partition, "adopted own key"): a peer such a record names may have
        taken it over already."""
        return set(self._owned) | {u for u, r in self._records.items() if r.node == self.node}

    async def _rename_all(self, plan: list[tuple[str, OwnerRecord, str | None]]) -> None:
        """One pass's renames, in transactions of RENAME_BATCH units, RENAME_PARALLEL in flight at
        once (a rewrite validating a peer's new generation keeps its units dark until the last one
        commits; one after the other, 1,410 units took ~15 transactions over 0.9 s at 3,000 VIPs).
        Each is a batch of its own: its tokens armed, then its record written (`_rename`)."""
        limit = trio.Semaphore(RENAME_PARALLEL)

        async def one(batch: list[tuple[str, OwnerRecord, str | None]]) -> None:
            async with limit:
                await self._rename(batch)

        async with trio.open_nursery() as nursery:
            for i in range(0, len(plan), RENAME_BATCH):
                nursery.start_soon(one, plan[i:i + RENAME_BATCH])

    async def _rename(self, plan: list[tuple[str, OwnerRecord, str | None]]) -> None:
        if self._flush_done is not None:
            return  # a stop began: no token is armed (Tokens.begin_stop), so no successor is named
        plan = self._still_late(plan, self._clock())
        if not plan:
            return
        seen: dict[str, Generation | None] = {}
        for peer in {p for u, _, want in plan for p in [want] + self._depends(u) if p}:
            link = self._peers.link(peer)
            seen[peer] = link.peer_gen if link is not None else None
        for unit, _, want in plan:
            self._naming[unit] = (want, seen.get(want) if want else None)
        self._version += 1
        try:
            # the tokens first bounded by the new successor's grant, then the record names it: a
            # takeover by it can only follow a commit, which follows this arm
            async with self._lock:
                armed = [(u, self._owned[u]) for u, _, _ in plan if u in self._owned]
                if armed:
                    await self._arm(armed)
            results = await self._keys.rename(plan)
        except (EtcdError, DataplaneError) as e:
            log.warning("successor_rename_failed", units=len(plan), error=e)
            results = {}
            if isinstance(e, EtcdError):  # sent, perhaps applied: its targets may be named in etcd now
                for unit, _, want in plan:
                    if want:
                        self._uncertain.setdefault(unit, {}).setdefault(want, seen.get(want))
        finally:
            for unit, _, _ in plan:
                self._naming.pop(unit, None)
            self._version += 1
        for unit, rec, want in plan:
            ok, now = results.get(unit, (False, rec))
            if unit in results:  # an answer: the record it returns is the truth, nothing is pending
                self._uncertain.pop(unit, None)
                self._version += 1
            self.observe(unit, now)
            if ok:
                self._fresh[unit] = (now.revision, seen.get(want) if want else None)
                self.renames += 1
                if want != rec.successor:
                    log.info("successor_named", vip=unit, successor=want or "-", previous=rec.successor or "-")
        # a peer's generation is validated once every record of ours naming it was rewritten by a
        # transaction started after we saw that generation (in this batch or an earlier one)
        ours = self._ours()  # (once: per peer it was O(units) each, in every batch of a plan)
        for peer, gen in seen.items():
            valid = self._rewritten_since(peer, ours) if gen is not None else None
            if valid is not None:
                self._peers.validate(peer, valid)
        self._refresh.set()
        if not results:
            await trio.sleep(RETRY)

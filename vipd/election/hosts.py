"""The host directory: every host's presence (`<prefix>hosts/<node>`, on its lease) with its health
and weight, and the placement each host derives from it: for every unit, the healthy candidates
best first, the first being its target. Every host computes the same answer from the same keys."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence

import trio

from vipd import log
from vipd.model import Unit
from vipd.election.follow import FollowClient, follow
from vipd.placement import Item, assign, ranking


@dataclass(frozen=True)
class HostInfo:
    node: str
    healthy: bool = True
    weight: float = 1.0
    down: tuple[str, ...] = ()  # units this host cannot serve (their own checks fail)
    reasons: tuple[str, ...] = ()  # why the host or a unit is unhealthy, for `vipd status`
    bgp_source: str = ""  # the host's fixed BGP source address, if any
    peer: str = ""  # "ip:port" of the host's heartbeat endpoint (vipd/peers), if any
    drained: bool = False  # the operator drained it (`vipd drain`): no placement until `vipd undrain`
    held: tuple[str, ...] = ()  # units in `down` only for their release hold-off (still fine successors)
    since: float = 0.0  # wall-clock time of its first presence, at its lease grant (0: not said, an older vipd)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, node: str, value: str) -> "HostInfo":
        try:
            d = json.loads(value)
            return cls(node, bool(d.get("healthy", True)), float(d.get("weight", 1.0)),
                       tuple(d.get("down", ())), tuple(d.get("reasons", ())), str(d.get("bgp_source", "")),
                       str(d.get("peer", "")), bool(d.get("drained", False)), tuple(d.get("held", ())),
                       float(d.get("since", 0.0)))
        except (ValueError, TypeError, AttributeError):
            return cls(node)  # a value we do not understand: present, defaults


def joined_at(host: HostInfo, unknown_age: float) -> float:
    """When `host` joined (its first presence), on this host's trio clock: its `since` as an age,
    never in the future (a clock ahead only makes it younger, up to now); `unknown_age` when it
    does not say. Ownerless units placed on a host that started less than `[placement]
    join_grace` ago wait for it (vipd/ownership/state.py `joined_ahead`)."""
    age = max(0.0, time.time() - host.since) if host.since else unknown_age
    return trio.current_time() - age


def rankings(units: Sequence[Unit], hosts: Mapping[str, HostInfo], *,
             successors: bool = False) -> dict[str, tuple[str, ...]]:
    """Bounded-load rendezvous placement over the healthy hosts; per unit the hosts that can serve
    it, its assigned target first, then the others in rendezvous order. `successors`: a host in its
    release hold-off for a unit still counts (it does not campaign, but takes over when named)."""
    return placements(units, hosts)[1 if successors else 0]


Placements = tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]


class PlacementMemo:
    """The last `placements` answer and what it was computed from. At 10,000 units an answer costs
    ~100 ms of CPU (bench/placement.py), and most host-key changes (a heartbeat address, a BGP source, a health reason)
    change nothing it depends on: the units, the healthy hosts' weights, and who holds what down.
    (One tuple, replaced whole: the host directory computes in a worker thread.)"""

    def __init__(self) -> None:
        self.entry: tuple[Sequence[Unit], Any, Placements] | None = None


def placements(units: Sequence[Unit], hosts: Mapping[str, HostInfo], memo: PlacementMemo | None = None
               ) -> Placements:
    """(rankings, rankings with successors=True) in one pass: one assignment, and each unit ranked
    once over the healthy hosts (again only for a unit some host is unfit for or holds back).
    `memo`: the previous answer is returned as it is (the same objects) when nothing it depends
    on changed (`units` must then be the same sequence, not modified in place)."""
    healthy = {n: h.weight for n, h in hosts.items() if h.healthy and not h.drained}
    down = {n: (hosts[n].down, hosts[n].held) for n in healthy if hosts[n].down}
    key = (sorted(healthy.items()), sorted(down.items()))
    last = memo.entry if memo is not None else None
    if last is not None and last[0] is units and last[1] == key:
        return last[2]
    ranked = {u.name: ranking(u.name, healthy, u.prefer, u.avoid) for u in units}
    targets = assign([Item(u.name, u.prefer, u.avoid, len(u.vips)) for u in units], healthy, ranked=ranked)
    place: dict[str, tuple[str, ...]] = {}
    succ: dict[str, tuple[str, ...]] = {}
    for u in units:
        name, target = u.name, targets.get(u.name)
        out_place = [n for n, (d, _) in down.items() if name in d]
        out_succ = [n for n, (d, h) in down.items() if name in d and name not in h]
        for out, wanted in ((place, out_place), (succ, out_succ)):
            order = ranked[name] if not wanted else [h for h in ranked[name] if h not in wanted]
            if target is not None and target in order:
                order = [target] + [h for h in order if h != target]
            out[name] = tuple(order)
    answer = (place, succ)
    if memo is not None:
        memo.entry = (units, key, answer)
    return answer


class HostDirectory:
    def __init__(self, client: FollowClient, prefix: str, units: Sequence[Unit],
                 on_placement: Callable[[str, tuple[str, ...]], None],
                 on_hosts: Callable[[dict[str, HostInfo]], None] | None = None) -> None:
        self._client = client
        self.prefix = prefix + "hosts/"
        self._units = list(units)
        self._on_placement = on_placement
        self._on_hosts = on_hosts
        self.hosts: dict[str, HostInfo] = {}
        self.joined: dict[str, float] = {}  # when each present host's vipd started (trio clock: joined_at)
        self.placement: dict[str, tuple[str, ...]] = {}
        self.successors: dict[str, tuple[str, ...]] = {}  # the same, for naming successors (hold-off counts)
        self._changed = trio.Event()  # set (and replaced) at every recompute: see wait()
        self._memo = PlacementMemo()
        self._dirty = trio.Event()  # host keys changed since the last placement (see _recomputer)
        self._placing = True  # False once the daemon stops (stop_placing)
        self.listeners: list[Callable[[], None]] = []  # told after every placement (the successor planner)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        def snapshot(kvs: Sequence[Any], revision: int) -> None:
            self.hosts = {kv.key[len(self.prefix):]: HostInfo.from_json(kv.key[len(self.prefix):], kv.value)
                          for kv in kvs}
            # (a re-listing keeps what it knew of hosts still present; a host already running when
            # we started has run for a while, unless its own start says otherwise)
            self.joined = {n: self.joined.get(n, joined_at(h, math.inf)) for n, h in self.hosts.items()}
            self._recompute()  # (here: placed before the directory is ready)

        def event(ev: Any) -> None:
            node = ev.kv.key[len(self.prefix):]
            if ev.type == "DELETE":
                self.hosts.pop(node, None)
                self.joined.pop(node, None)
            else:
                self.hosts[node] = HostInfo.from_json(node, ev.kv.value)
                if node not in self.joined:
                    self.joined[node] = joined_at(self.hosts[node], 0.0)
            if self._on_hosts is not None:
                self._on_hosts(self.hosts)
            self._dirty.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._recomputer)
            await follow(self._client, self.prefix, snapshot, event, task_status=task_status)

    async def _recomputer(self) -> None:
        """Place again after host-key changes, in a worker thread: at 10,000 units an answer takes
        0.1-1.3 s of CPU on a busy host, and computed on the loop it held every socket and timer
        for as long (the heartbeats were withheld, bench/scale.py --loop-tasks: HostDirectory.run).
        Changes that arrive meanwhile are placed together by the next pass."""
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            if not self._placing:
                return
            units, hosts = self._units, dict(self.hosts)
            answer = await trio.to_thread.run_sync(placements, units, hosts, self._memo)
            if units is self._units:  # (else a reload placed the new units meanwhile, on the loop)
                self._apply(answer)  # (nothing once a stop began meanwhile)

    def stop_placing(self) -> None:
        """The daemon stops: host-key changes are no longer placed, and an answer still being
        computed is not delivered (every unit is stopping: a Placement would only wake it). Its
        own presence turning "stopping" is one such change: a pass over every unit in the worker
        thread held the GIL against the stop's own work (a py-spy profile of a 3,000-VIP stop
        showed it; bench/scale.py `stopping_host_cpu_s`)."""
        self._placing = False
        self._dirty.set()

    def set_units(self, units: Sequence[Unit]) -> None:
        """A config reload changed the units (or their prefer/avoid): place them again now."""
        self._units = list(units)
        self.placement = {n: o for n, o in self.placement.items() if n in {u.name for u in units}}
        self._recompute()

    def _recompute(self) -> None:
        if self._on_hosts is not None:
            self._on_hosts(self.hosts)
        if self._placing:
            self._apply(placements(self._units, self.hosts, self._memo))

    def _apply(self, answer: Placements) -> None:
        if not self._placing:
            return
        new, self.successors = answer
        for name, order in ([] if new is self.placement else new.items()):  # (the same answer: nothing moved)
            if self.placement.get(name) != order:
                log.debug("placement", vip=name, ranking=",".join(order) or "-")
                self._on_placement(name, order)
        self.placement = new
        self._changed.set()
        self._changed = trio.Event()
        for listener in self.listeners:
            listener()

    async def wait(self, predicate: Callable[[], bool]) -> None:
        """Return once predicate() holds, checked now and after every change of hosts or placement."""
        while not predicate():
            await self._changed.wait()

"""The token fence's table (a mixin of vipd.dataplane.fence_nft.NftFence, whose records it reads
and writes): set up to fence exactly the configured VIPs (`_ensure`), checked and rebuilt from
vipd's record when anything of it went missing (`_verify`), deleted (`_remove_all`); and the
owner-thread plumbing every kernel call of the fence goes through (`_run`)."""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Optional, Sequence, TypeVar, Union

import trio
from pyroute2.netlink.exceptions import NetlinkError

from vipd.config import VipSpec
from vipd.dataplane.fence_build import (L2ONLY, MANAGED, TABLE, chain_names, drop_table_ops, encode_setup, grant_name,
                                        setup_ops)
from vipd.dataplane.fence_read import dump_chains, is_whole, read_sets
from vipd.dataplane.fence_send import Key, Sockets, TokenOps, rebuild, send_prebuilt, write
from vipd.dataplane.netlink import Netlink, netlink_error_text
from vipd.errors import FenceError

_ENOENT = 2
T = TypeVar("T")


class FenceTable:
    nl: Netlink
    timeout_update: bool
    _socks: Optional[Sockets]
    _managed: Optional[dict[str, tuple[Key, str]]]
    _l2only: list[Key]
    _until: dict[str, float]
    _group: dict[str, str]
    _grant_until: dict[str, float]
    _gid: dict[str, int]
    grant_source: Callable[[str], Optional[float]]
    _lapse_counted: set[str]
    _repairs: int

    def _id(self, grant: str) -> int:
        gid = self._gid.get(grant)
        if gid is None:
            gid = self._gid[grant] = len(self._gid) + 1
        return gid

    def _grant_deadline(self, grant: str) -> float:
        """The deadline last armed for `grant` (trio clock), by this side or, once it handed the
        grant over, by the heartbeat thread."""
        written = self.grant_source(grant)
        return written if written is not None else self._grant_until.get(grant, -math.inf)

    def _rebuilt(self, groups: dict[str, str], ops: TokenOps) -> Callable[[], TokenOps]:
        """What a rebuilt (empty) table needs with `ops`, built in the owner thread only if needed:
        `ops`' tokens, every group membership of `groups` and every grant we know of (read here, on
        the trio thread: a grant is never re-armed longer than armed)."""
        armed = {g for g, _ in ops.grants}
        known = to_perf([(self._id(g), self._grant_deadline(g)) for g in self._grant_until if self._id(g) not in armed])
        managed, gid = self._managed or {}, self._gid
        return lambda: TokenOps(list(ops.tokens), list(ops.grants) + known,
                                [(managed[n][0], gid[g]) for n, g in groups.items() if n in managed])

    async def _ensure(self, vips: Sequence[VipSpec],
                      pre: Optional[tuple[Sequence[str], Sequence[bytes]]] = None) -> None:
        """Make the table fence exactly the covered VIPs of ``vips`` (routed ones are skipped):
        one atomic batch, idempotent. The first call of a process starts from an empty table (a
        previous run's tokens, groups and grants are gone with it: grant ids are this process's,
        and no VIP is ours yet); later calls (reload) keep tokens, groups and grants, and remove
        the tokens of VIPs no longer configured; a later call that finds the table gone rebuilds
        it with every token, group and grant from our record (as verify())."""
        managed: dict[str, tuple[Key, str]] = {}
        seen: set[object] = set()
        for v in vips:
            if v.on_loopback:
                continue
            if v.ip in seen or v.name in managed:
                raise FenceError(f"fence: VIP {v.name} ({v.ip}) is configured twice")
            seen.add(v.ip)
            managed[v.name] = (v.address, v.interface)
        fresh = self._managed is None
        if fresh:
            self._until, self._group, self._grant_until = {}, {}, {}
            self._lapse_counted.clear()
        old = self._managed or {}
        # no longer configured, or the name now stands for another address: its token goes
        dropped = [name for name in old if name not in managed or managed[name][0] != old[name][0]]
        gone = TokenOps([(old[name][0], 0.0) for name in dropped],
                        leave=[old[name][0] for name in dropped if name in self._group])
        vip_devs = list(managed.values())
        l2only = [v.address for v in vips if not v.on_loopback and v.services]

        def job(s: Sockets) -> None:
            if fresh:
                s.nft.nlm_request_batch(encode_setup(drop_table_ops() + setup_ops(vip_devs, (), l2only)))
                s.created.clear()
                return
            try:
                current = dump_chains(s.nft)
            except NetlinkError as e:
                if e.code != _ENOENT:
                    raise
                current = {}
            present = read_sets(s.raw, s.take_seqs(16), (*MANAGED.values(), *L2ONLY.values()))
            if not present:
                # the table is gone (someone deleted it): rebuilt whole, and the tokens of the VIPs
                # still configured re-armed from our record, as verify() does; a table made anew
                # without them would read whole to verify() and keep their owner dark until the
                # next refresh
                rebuild(s, vip_devs, l2only, whole(), self.timeout_update)
                return
            stale = {c.split("_", 1)[1] for c in current if c.startswith(("in_", "out_"))}
            hooked = {dev for _, dev in vip_devs if all(current.get(c) == dev for c in chain_names(dev))}
            if pre is not None and not set(pre[0]) <= hooked:
                send_prebuilt(s, pre[1])  # the new devices' chain pairs, encoded before the lock
                hooked.update(pre[0])
            s.created.intersection_update(g for g in list(s.created) if grant_name(g) in current)
            s.nft.nlm_request_batch(encode_setup(setup_ops(vip_devs, stale, l2only, hooked, present)))
            if gone:
                self._send_tokens(s, gone, rebuilt)

        kept = {n: g for n, g in self._group.items() if n not in dropped}
        rebuilt = self._rebuilt(kept, gone)
        whole = self._rebuilt(kept, TokenOps(to_perf([(managed[n][0], u) for n, u in self._until.items()
                                                       if n in managed and n not in dropped])))
        devs = ", ".join(sorted({dev for _, dev in vip_devs})) or "no device"
        await self._run(f"build table netdev {TABLE} on {devs}", job)
        self._managed, self._l2only, self._group = managed, l2only, kept
        for name in dropped:
            self._until.pop(name, None)
            self._lapse_counted.discard(name)

    async def _verify(self) -> bool:
        """Check the table is whole (chains, rules, managed sets); rebuild it in one batch if not,
        tokens re-armed from our record. Returns True when it had to repair. Cheap: one dump each of chains, rules, two sets."""
        if self._managed is None:
            return False
        vip_devs = list(self._managed.values())
        managed, until, t_perf = self._managed, dict(self._until), time.perf_counter()
        offset = trio.current_time() - t_perf  # (as to_perf: trio's clock read last)
        rest = self._rebuilt(self._group, TokenOps())

        def every() -> TokenOps:  # (only for a rebuild: the check alone needs none of it)
            ops = rest()
            ops.tokens = [(managed[n][0], u - offset) for n, u in until.items() if n in managed]
            return ops

        members = [self._managed[n][0] for n in self._group if n in self._managed]

        def job(s: Sockets) -> bool:
            grants = sorted(s.created)
            first = s.take_seqs(64 + 4 * len(grants))  # the set dumps (and their retries)
            if is_whole(s.nft, vip_devs, self._l2only, raw=(s.raw, first), grants=grants, members=members):
                return False
            self._rebuild(s, vip_devs, every())
            return True

        repaired: bool = await self._run(f"verify table netdev {TABLE}", job)
        self._repairs += repaired
        return repaired

    async def _remove_all(self) -> None:
        def job(s: Sockets) -> None:
            s.nft.nlm_request_batch(encode_setup(drop_table_ops()))
            s.created.clear()

        await self._run(f"delete table netdev {TABLE}", job)
        self._managed = None
        self._until.clear()
        self._group, self._grant_until = {}, {}
        self._lapse_counted.clear()

    async def _run(self, what: Union[str, Callable[[], str]], fn: Callable[[Sockets], Any]) -> Any:
        """fn(sockets) in the owner thread; pyroute2/OS errors raised as FenceError("WHAT: why")."""
        def job(_ipr: Any) -> Any:
            if self._socks is None:
                self._socks = Sockets(self.nl.netns)
            return fn(self._socks)

        try:
            return await self.nl.call(job)
        except NetlinkError as e:
            why = netlink_error_text(e)
        except FileNotFoundError:
            why = f"network namespace {self.nl.netns!r} does not exist"
        except OSError as e:
            why = str(e)
        raise FenceError(f"{what if isinstance(what, str) else what()}: {why}")

    def _send_tokens(self, s: Sockets, ops: TokenOps, rebuilt: Callable[[], TokenOps]) -> int:
        managed = self._managed  # replaced, never changed in place, by the trio thread
        table = None if managed is None else (list(managed.values()), self._l2only)
        return write(s, ops, rebuilt, table, self.timeout_update)

    def _rebuild(self, s: Sockets, vip_devs: Sequence[tuple[Key, str]], ops: TokenOps) -> None:
        rebuild(s, vip_devs, self._l2only, ops, self.timeout_update)


def to_perf(until: Sequence[tuple[T, float]]) -> list[tuple[T, float]]:
    """Trio-clock deadlines -> time.perf_counter deadlines (the owner thread cannot read trio's
    clock). The offset is read trio-clock-last, so a deadline can only come out earlier."""
    t_perf = time.perf_counter()
    offset = trio.current_time() - t_perf
    return [(ip, u - offset) for ip, u in until]

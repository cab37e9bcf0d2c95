"""The nftables token fence: a VIP is served only while its kernel-held token is alive.

The owner of a VIP arms a token (an element of the ``token4``/``token6`` set of vipd's own table
``netdev vipd_fence``, see :mod:`vipd.dataplane.fence_build`) with a millisecond timeout, and may
put the VIP in a grant's group: then the grant (one timed element for the whole group, refreshed
every 10-20 ms by the fast takeover) must be alive too. Group changes, grants and tokens of one
call go in one atomic batch. Base chains on the ingress AND egress hooks of every device
carrying a fenced VIP drop IPv4, ARP, IPv6 and ND to/from a *managed* VIP (a configured one)
whose token is absent or expired. So a SIGKILLed or SIGSTOPped daemon loses the VIP at its token
deadline with no code running: the kernel stops its ARP/ND replies, its frames sent through
AF_PACKET, and every packet to or from the address. A thawed daemon re-opens nothing: only an
explicit :meth:`NftFence.arm` with a new deadline does, and an arm whose deadline has passed
removes the token.

Deadlines are on trio's clock (``trio.current_time()``). The relative timeout is computed in the
Netlink owner thread immediately before the batch is sent: ``until - now`` rounded down to the
ms (the kernel counts it from its last tick and in whole ticks, both rounded down: bench/fence.py
measured the cut 2-8 ms early, never late); under ``MIN_TOKEN_MS`` the token is removed instead
(a sub-tick timeout would be a permanent element). Each timeout counts from when the kernel is
expected to have inserted the element (the clock read plus a lead learnt from past batches); if
the send took longer (preemption, a stop), the batch is recomputed and sent again at once, so when
``arm`` returns no element outlives its deadline. A batch whose encoding outran its lead is
encoded again from a fresh clock before it is sent (fence_send `send`): sent stale, a thawed
owner's lapsed VIP served again beside its successor for 7 ms (bench/failover.py, SIGSTOP).
One window is left for the core's margins: a stop or preemption landing in the few bytecodes
between that check and the kernel re-opens a lapsed VIP until the resend answers.

DSR VIPs (with services) are gated for ARP/ND only (their IP traffic reaches and leaves every
backend, owner or not): a fenced owner stops claiming the address on the segment at its token
deadline, and stops directing at its BPF deadline (vipd/dsr).

Routed VIPs (on ``lo``) are NOT covered (``covers`` is False): their packets arrive on whichever
uplink the router picks and never cross ``lo``'s hooks, and it is the address disappearing that
makes the BGP speaker withdraw the route. They keep the address lifetime as their fence.
A VIP whose token lapsed stays configured and is dropped on every fenced device (a stricter
reading of "managed on that device": a fenced host answers for it nowhere).

Setup (:meth:`NftFence.ensure`) is one atomic batch, idempotent; :meth:`NftFence.verify` (cheap:
three dumps) rebuilds the table if anything of it is missing, re-arming tokens from vipd's own
record (never longer than armed). Nothing outside ``netdev vipd_fence`` is ever touched. All
kernel work runs in the Netlink owner thread, in its netns.
"""

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
from vipd.dataplane.fence_send import Key, Sockets, TokenOps, rebuild, write
from vipd.dataplane.netlink import Netlink, netlink_error_text
from vipd.dataplane.nft_build import kernel_has_timeout_update
from vipd.errors import DataplaneError, FenceError

__all__ = ["FenceError", "NftFence"]

_ENOENT = 2
T = TypeVar("T")


class NftFence:
    """vipd's token fence in ``nl``'s netns (implements vipd.fence.Fence). Use as
    ``async with NftFence(nl) as fence:`` inside ``async with Netlink(...)``; call
    :meth:`ensure` with the configured VIPs before arming any."""

    def __init__(self, nl: Netlink, *, timeout_update: Optional[bool] = None) -> None:
        self.nl = nl
        self.timeout_update = kernel_has_timeout_update() if timeout_update is None else timeout_update
        self._socks: Optional[Sockets] = None  # touched only in the owner thread
        # Records are keyed by VipSpec.name (unique in a config; str hashes are cached, which keeps
        # a 1,000-unit refresh cheap); ensure() checks that a name keeps its address.
        self._managed: Optional[dict[str, tuple[Key, str]]] = None  # name -> (VIP, device), last ensure
        self._l2only: list[Key] = []  # DSR VIPs: gated for ARP/ND only (vipd/dataplane/fence_build.py)
        self._until: dict[str, float] = {}  # name -> last deadline armed (trio clock)
        self._group: dict[str, str] = {}  # name -> the grant its group depends on, as in the kernel
        self._grant_until: dict[str, float] = {}  # grant -> last deadline armed (trio clock)
        self._gid: dict[str, int] = {}  # grant -> its id in the kernel (1, 2, ... in order of first use)
        self._lapse_counted: set[str] = set()
        self._lock = trio.Lock()
        self._refreshes = 0
        self._lapses = 0
        self._repairs = 0

    async def __aenter__(self) -> "NftFence":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the sockets (the table and its tokens stay: they expire by themselves)."""

        def job(_ipr: Any = None) -> None:
            socks, self._socks = self._socks, None
            if socks is not None:
                socks.close()

        try:
            await self.nl.call(job)
        except DataplaneError:  # the Netlink was closed first
            job()

    # -- the Fence port -----------------------------------------------------------------------

    def covers(self, vips: Sequence[VipSpec]) -> bool:
        """True when every VIP is on a NIC (routed VIPs on ``lo`` are not fenced here) and, once the
        table is set up, in it: a VIP a failed ensure() left out is not fenced by a token, so its
        unit must neither arm one (one such VIP fails a whole coalesced batch: every owner's
        tokens lapse) nor let its owner name a successor (who would take over at a token deadline
        that stops nothing; the address lifetime is then the only fence, and the lease takeover
        is the only safe one)."""
        if any(v.on_loopback for v in vips):
            return False
        managed = self._managed
        return managed is None or all(v.name in managed and managed[v.name][0] == v.address for v in vips)

    async def arm(self, vips: Sequence[VipSpec], until: float) -> None:
        """Serve ``vips`` until ``until`` (trio clock) and not one tick longer."""
        await self.arm_many([(vips, until)])

    async def _arm_many(self, items: Sequence[tuple[Sequence[VipSpec], float]], *,
                       grants: Sequence[tuple[str, float]] = (),
                       groups: Sequence[tuple[Sequence[VipSpec], Optional[str]]] = ()) -> None:
        wanted: dict[str, float] = {}
        pairs: list[tuple[Key, float]] = []
        for vips, until in items:
            for name, addr in self._managed_vips(vips, "arm"):
                u = until
                if name in wanted:  # a VIP in two units: the earlier deadline
                    u = min(u, wanted[name])
                    pairs = [(a, d) for a, d in pairs if a is not addr and a != addr]
                wanted[name] = u
                pairs.append((addr, u))
        old = self._group
        after, leave, join = old, [], []
        for vips, grant in groups:
            for name, addr in self._managed_vips(vips, "group"):
                was = after.get(name)
                if was == grant:
                    continue
                if after is old:
                    after = dict(old)
                if was is not None:
                    leave.append(addr)
                    del after[name]
                if grant is not None:
                    join.append((addr, self._id(grant)))
                    after[name] = grant
        if not wanted and not grants and after is old:
            return
        now = trio.current_time()
        counted = self._lapse_counted
        for name in wanted:
            prev = self._effective(name)
            if prev is not None and prev <= now and name not in counted:
                self._lapses += 1  # it ran out while we held it: counted once, here or in verify()
        counted.difference_update(wanted)
        ops = TokenOps(_to_perf(pairs), _to_perf([(self._id(g), u) for g, u in grants]), join, leave)
        rebuilt = self._rebuilt(after, ops)
        armed = await self._run(lambda: f"arm fence tokens of {_shown(pairs)}",
                                lambda s: self._send_tokens(s, ops, rebuilt))
        self._until.update(wanted)
        self._grant_until.update(grants)
        self._group = after
        self._refreshes += armed

    async def _disarm(self, vips: Sequence[VipSpec]) -> None:
        names = {v.name for v in vips}
        leave = [v.address for v in vips if v.name in self._group]
        after = {n: g for n, g in self._group.items() if n not in names} if leave else self._group
        for v in vips:
            self._until.pop(v.name, None)
            self._lapse_counted.discard(v.name)
        if self._managed is None or not vips:
            self._group = after
            return
        ops = TokenOps([(v.address, 0.0) for v in vips], leave=leave)
        rebuilt = self._rebuilt(after, ops)
        await self._run(lambda: f"disarm fence tokens of {_shown(ops.tokens)}",
                        lambda s: self._send_tokens(s, ops, rebuilt))
        self._group = after  # (only once out of the kernel: a later join must not find it there)

    # -- every change and check of the kernel state holds the lock: the records above are read
    # before a batch and updated after it, so two batches never interleave (a reload's ensure()
    # against the successor planner's arms: a lost group membership)

    async def arm_many(self, items: Sequence[tuple[Sequence[VipSpec], float]], *,
                       grants: Sequence[tuple[str, float]] = (),
                       groups: Sequence[tuple[Sequence[VipSpec], Optional[str]]] = ()) -> None:
        """In ONE netlink batch (atomic): arm every unit's tokens to its own deadline, each grant of
        `grants` to its deadline, and put the VIPs of each (VIPs, grant) of `groups` in that grant's
        group (None: in no group). A VIP in a group is served only while its token AND the grant live."""
        async with self._lock:
            await self._arm_many(items, grants=grants, groups=groups)

    async def disarm(self, vips: Sequence[VipSpec]) -> None:
        """Stop serving ``vips`` now (their tokens are removed; absent ones are fine)."""
        async with self._lock:
            await self._disarm(vips)

    async def ensure(self, vips: Sequence[VipSpec]) -> None:
        """Make the table fence exactly the covered VIPs of ``vips`` (see `_ensure`)."""
        async with self._lock:
            await self._ensure(vips)

    async def verify(self) -> bool:
        """Check the table is whole; rebuild it if not (see `_verify`). True when it repaired."""
        async with self._lock:
            return await self._verify()

    async def remove_all(self) -> None:
        """Delete vipd's fence table (cleanup, clean stop). Absent is fine; nothing else touched."""
        async with self._lock:
            await self._remove_all()

    def armed_until(self, vips: Sequence[VipSpec]) -> Optional[float]:
        """The deadline last armed for ``vips`` (the earliest of them, their grants included; None
        if any is disarmed). It may be in the past: the token then lapsed."""
        found = [self._effective(v.name) for v in vips]
        if not found or any(u is None for u in found):
            return None
        return min(u for u in found if u is not None)

    def grant_of(self, vip: VipSpec) -> Optional[str]:
        """The grant the VIP's group depends on (None: in no group)."""
        return self._group.get(vip.name)

    def _effective(self, name: str) -> Optional[float]:
        until, grant = self._until.get(name), self._group.get(name)
        if until is None or grant is None:
            return until
        return min(until, self._grant_until.get(grant, -math.inf))

    def _id(self, grant: str) -> int:
        gid = self._gid.get(grant)
        if gid is None:
            gid = self._gid[grant] = len(self._gid) + 1
        return gid

    def _rebuilt(self, groups: dict[str, str], ops: TokenOps) -> Callable[[], TokenOps]:
        """What a rebuilt (empty) table needs with `ops`, built in the owner thread only if needed:
        `ops`' tokens, every group membership of `groups` and every grant we know of (read here, on
        the trio thread: a grant is never re-armed longer than armed)."""
        armed = {g for g, _ in ops.grants}
        known = _to_perf([(self._id(g), u) for g, u in self._grant_until.items() if self._id(g) not in armed])
        managed, gid = self._managed or {}, self._gid
        return lambda: TokenOps(list(ops.tokens), list(ops.grants) + known,
                                [(managed[n][0], gid[g]) for n, g in groups.items() if n in managed])

    # -- setup ----------------------------------------------------------------------------------

    async def _ensure(self, vips: Sequence[VipSpec]) -> None:
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
            s.created.intersection_update(g for g in list(s.created) if grant_name(g) in current)
            s.nft.nlm_request_batch(encode_setup(setup_ops(vip_devs, stale, l2only, hooked, present)))
            if gone:
                self._send_tokens(s, gone, rebuilt)

        kept = {n: g for n, g in self._group.items() if n not in dropped}
        rebuilt = self._rebuilt(kept, gone)
        whole = self._rebuilt(kept, TokenOps(_to_perf([(managed[n][0], u) for n, u in self._until.items()
                                                       if n in managed and n not in dropped])))
        devs = ", ".join(sorted({dev for _, dev in vip_devs})) or "no device"
        await self._run(f"build table netdev {TABLE} on {devs}", job)
        self._managed, self._l2only, self._group = managed, l2only, kept
        for name in dropped:
            self._until.pop(name, None)
            self._lapse_counted.discard(name)

    async def _verify(self) -> bool:
        """Check the table is whole (chains, rules, managed sets); rebuild it in one batch if not,
        tokens re-armed from our record. Also counts tokens that lapsed since the last call.
        Returns True when it had to repair. Cheap: one dump each of chains, rules, two sets."""
        now = trio.current_time()
        for name in self._until:
            until = self._effective(name)
            if until is not None and until <= now and name not in self._lapse_counted:
                self._lapse_counted.add(name)
                self._lapses += 1
        if self._managed is None:
            return False
        vip_devs = list(self._managed.values())
        ops = TokenOps(_to_perf([(self._managed[n][0], u) for n, u in self._until.items() if n in self._managed]))
        every = self._rebuilt(self._group, ops)
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

    # -- metrics hooks ----------------------------------------------------------------------------

    def refreshes(self) -> int:
        """Token elements armed so far (each VIP of each arm counts one)."""
        return self._refreshes

    def lapses(self) -> int:
        """Tokens that ran out while we held them (not disarmed, not refreshed in time)."""
        return self._lapses

    def last_batch_seconds(self) -> float:
        """Clock read -> kernel done, of the last token batch (encoding + the kernel's work)."""
        return self._socks.last_batch if self._socks is not None else 0.0

    def repairs(self) -> int:
        """Times verify() had to rebuild the table."""
        return self._repairs

    # -- in the owner thread ----------------------------------------------------------------------

    def _managed_vips(self, vips: Sequence[VipSpec], what: str) -> list[tuple[str, Key]]:
        """(name, address) of each VIP; FenceError unless every one is fenced here."""
        managed = self._managed
        out = []
        for v in vips:
            m = managed.get(v.name) if managed is not None else None
            if m is None or (m[0] is not v.address and m[0] != v.address):
                break
            out.append((v.name, m[0]))
        else:
            return out
        if any(v.on_loopback for v in vips):
            raise FenceError(f"{what}: {_names(vips)}: routed VIPs (on lo) are not fenced by nftables")
        if managed is None:
            raise FenceError(f"{what}: {_names(vips)}: the fence is not set up (ensure() first)")
        missing = ", ".join(f"{v.name} ({v.ip})" for v in vips
                            if v.name not in managed or managed[v.name][0] != v.address)
        raise FenceError(f"{what}: VIP {missing} is not managed by the fence (not in ensure())")

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


def _to_perf(until: Sequence[tuple[T, float]]) -> list[tuple[T, float]]:
    """Trio-clock deadlines -> time.perf_counter deadlines (the owner thread cannot read trio's
    clock). The offset is read trio-clock-last, so a deadline can only come out earlier."""
    t_perf = time.perf_counter()
    offset = trio.current_time() - t_perf
    return [(ip, u - offset) for ip, u in until]


def _shown(pairs: Sequence[tuple[Key, float]]) -> str:
    names = sorted(str(ip.ip) for ip, _ in pairs)
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _names(vips: Sequence[VipSpec]) -> str:
    return ", ".join(f"{v.name} ({v.ip})" for v in vips)

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
from typing import Any, Callable, Optional, Sequence

import trio

from vipd.config import VipSpec
from vipd.dataplane.fence_build import hook_ops, prebuild
from vipd.dataplane.fence_send import Key, Sockets, TokenOps
from vipd.dataplane.fence_table import FenceTable, to_perf
from vipd.dataplane.netlink import Netlink
from vipd.dataplane.nft_build import kernel_has_timeout_update
from vipd.errors import DataplaneError, FenceError

__all__ = ["FenceError", "NftFence"]


class NftFence(FenceTable):
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
        # grant -> the deadline the heartbeat thread last wrote (vipd/peers/grants.py), None until it
        # writes one: from then on the truth for that grant, which this side no longer arms
        self.grant_source: Callable[[str], Optional[float]] = lambda grant: None
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
        ops = TokenOps(to_perf(pairs), to_perf([(self._id(g), u) for g, u in grants]), join, leave)
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
        """Make the table fence exactly the covered VIPs of ``vips`` (see `_ensure`). The chain
        pairs of devices the table does not hook yet are encoded first, in a worker thread and
        before the lock (`fence_build.prebuild`)."""
        managed, pre = self._managed, None
        if managed is not None:
            have = {dev for _, dev in managed.values()}
            new = sorted({v.interface for v in vips if not v.on_loopback} - have)
            if new:
                pre = (new, await trio.to_thread.run_sync(prebuild, hook_ops(new)))
        async with self._lock:
            await self._ensure(vips, pre)

    async def verify(self) -> bool:
        """Check the table is whole; rebuild it if not (see `_verify`). True when it repaired.
        Also counts the tokens that lapsed since the last call."""
        async with self._lock:
            now = trio.current_time()
            for name in self._until:
                until = self._effective(name)
                if until is not None and until <= now and name not in self._lapse_counted:
                    self._lapse_counted.add(name)
                    self._lapses += 1
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

    def grant_id(self, grant: str) -> Optional[int]:
        """The id of `grant`'s set and chain once a batch armed it (they exist), else None."""
        return self._gid.get(grant) if grant in self._grant_until else None

    def grant_of(self, vip: VipSpec) -> Optional[str]:
        """The grant the VIP's group depends on (None: in no group)."""
        return self._group.get(vip.name)

    def _effective(self, name: str) -> Optional[float]:
        until, grant = self._until.get(name), self._group.get(name)
        if until is None or grant is None:
            return until
        return min(until, self._grant_deadline(grant))

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

def _shown(pairs: Sequence[tuple[Key, float]]) -> str:
    names = sorted(str(ip.ip) for ip, _ in pairs)
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _names(vips: Sequence[VipSpec]) -> str:
    return ", ".join(f"{v.name} ({v.ip})" for v in vips)

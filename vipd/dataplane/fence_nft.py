"""The nftables token fence: a VIP is served only while its kernel-held token is alive.

The owner of a VIP arms a token (an element of the ``token4``/``token6`` set of vipd's own table
``netdev vipd_fence``, see :mod:`vipd.dataplane.fence_build`) with a millisecond timeout; the
daemon refreshes it every 10-20 ms. Base chains on the ingress AND egress hooks of every device
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
``arm`` returns no element outlives its deadline. One window is left for the core's margins: a
stop landing in the microseconds between the clock read and the send makes the thawed thread send
a stale timeout, which re-opens a lapsed VIP for one round trip (< ~2 ms) until the resend.

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

import ipaddress
import socket
import time
from typing import Any, Callable, Optional, Sequence, Union

import trio
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink import nftsocket as nfts
from pyroute2.nftables.main import NFTables

from vipd.config import VipSpec
from vipd.dataplane.fence_build import (NFPROTO_NETDEV, TABLE, Op,
                                        drop_table_ops, encode_setup, kernel_has_timeout_update, parse_acks,
                                        setup_ops, token_batch, token_ms)
from vipd.dataplane.fence_read import dump_chains, is_whole
from vipd.dataplane.netlink import Netlink, enter_netns, netlink_error_text
from vipd.errors import DataplaneError, FenceError

__all__ = ["FenceError", "NftFence"]

Key = Union[ipaddress.IPv4Interface, ipaddress.IPv6Interface]  # a VIP, as VipSpec.address

_ENOENT = 2
_NETLINK_NETFILTER = 12
_SOL_NETLINK, _NETLINK_CAP_ACK = 270, 10
_SO_SNDBUFFORCE = 32  # socket.SO_SNDBUFFORCE is not exported by every Python
_ACK_WAIT = 5.0  # seconds; the kernel answers a batch in well under a millisecond
_MAX_PASSES = 3  # sends of one token batch when the thread is held up (see the module docstring)
_LEAD_BASE = 0.0003  # seconds: clock read -> kernel insert for a small batch, with room to spare


class _Sockets:
    """The owner thread's sockets: pyroute2 for setup and dumps, a raw one for token batches."""

    def __init__(self, netns: Optional[str]) -> None:
        with enter_netns(netns):
            self.nft = NFTables(nfgen_family=NFPROTO_NETDEV)
            self.raw = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
        self.raw.setsockopt(_SOL_NETLINK, _NETLINK_CAP_ACK, 1)
        self.raw.bind((0, 0))
        self.raw.settimeout(_ACK_WAIT)
        self.seq = 1
        self._sndbuf = self.raw.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)

    def fit(self, size: int) -> None:
        """Let one send of `size` bytes through (a token batch of thousands of VIPs is larger than
        the default socket buffer: EMSGSIZE). SO_SNDBUFFORCE needs CAP_NET_ADMIN, which vipd has."""
        if size + 4096 <= self._sndbuf // 2:  # (the kernel doubles what is set, and reports that)
            return
        want = 2 * (size + 4096)
        for opt in (_SO_SNDBUFFORCE, socket.SO_SNDBUF):
            try:
                self.raw.setsockopt(socket.SOL_SOCKET, opt, want)
                break
            except OSError:
                continue
        self._sndbuf = self.raw.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)

    def close(self) -> None:
        self.raw.close()
        self.nft.close()


class NftFence:
    """vipd's token fence in ``nl``'s netns (implements vipd.fence.Fence). Use as
    ``async with NftFence(nl) as fence:`` inside ``async with Netlink(...)``; call
    :meth:`ensure` with the configured VIPs before arming any."""

    def __init__(self, nl: Netlink, *, timeout_update: Optional[bool] = None) -> None:
        self.nl = nl
        self.timeout_update = kernel_has_timeout_update() if timeout_update is None else timeout_update
        self._socks: Optional[_Sockets] = None  # touched only in the owner thread
        # Records are keyed by VipSpec.name (unique in a config; str hashes are cached, which keeps
        # a 1,000-unit refresh cheap); ensure() checks that a name keeps its address.
        self._managed: Optional[dict[str, tuple[Key, str]]] = None  # name -> (VIP, device), last ensure
        self._l2only: list[Key] = []  # DSR VIPs: gated for ARP/ND only (vipd/dataplane/fence_build.py)
        self._until: dict[str, float] = {}  # name -> last deadline armed (trio clock)
        self._lapse_counted: set[str] = set()
        self._refreshes = 0
        self._lapses = 0
        self._repairs = 0
        self._per_elem = 2e-6  # seconds per element from clock read to kernel insert (running mean)
        self._last_batch = 0.0

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
        """True when every VIP is on a NIC (routed VIPs on ``lo`` are not fenced here)."""
        return all(not v.on_loopback for v in vips)

    async def arm(self, vips: Sequence[VipSpec], until: float) -> None:
        """Serve ``vips`` until ``until`` (trio clock) and not one tick longer."""
        await self.arm_many([(vips, until)])

    async def arm_many(self, items: Sequence[tuple[Sequence[VipSpec], float]]) -> None:
        """Arm every unit to its own deadline in ONE netlink batch."""
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
        if not wanted:
            return
        now = trio.current_time()
        until_was, counted = self._until, self._lapse_counted
        for name in wanted:
            prev = until_was.get(name)
            if prev is not None and prev <= now and name not in counted:
                self._lapses += 1  # it ran out while we held it: counted once, here or in verify()
        counted.difference_update(wanted)
        deadlines = _to_perf(pairs)
        armed = await self._run(lambda: f"arm fence tokens of {_shown(pairs)}",
                               lambda s: self._send_tokens(s, deadlines))
        self._until.update(wanted)
        self._refreshes += armed

    async def disarm(self, vips: Sequence[VipSpec]) -> None:
        """Stop serving ``vips`` now (their tokens are removed; absent ones are fine)."""
        for v in vips:
            self._until.pop(v.name, None)
            self._lapse_counted.discard(v.name)
        if self._managed is None or not vips:
            return
        gone = [(v.address, 0.0) for v in vips]
        await self._run(lambda: f"disarm fence tokens of {_shown(gone)}", lambda s: self._send_tokens(s, gone))

    def armed_until(self, vips: Sequence[VipSpec]) -> Optional[float]:
        """The deadline last armed for ``vips`` (the earliest of them; None if any is disarmed).
        It may be in the past: the token then lapsed."""
        found = [self._until.get(v.name) for v in vips]
        if not found or any(u is None for u in found):
            return None
        return min(u for u in found if u is not None)

    # -- setup ----------------------------------------------------------------------------------

    async def ensure(self, vips: Sequence[VipSpec]) -> None:
        """Make the table fence exactly the covered VIPs of ``vips`` (routed ones are skipped):
        one atomic batch, idempotent. Tokens already armed stay armed; tokens of VIPs no longer
        configured are removed."""
        managed: dict[str, tuple[Key, str]] = {}
        seen: set[object] = set()
        for v in vips:
            if v.on_loopback:
                continue
            if v.ip in seen or v.name in managed:
                raise FenceError(f"fence: VIP {v.name} ({v.ip}) is configured twice")
            seen.add(v.ip)
            managed[v.name] = (v.address, v.interface)
        old = self._managed or {}
        # no longer configured, or the name now stands for another address: its token goes
        dropped = [name for name in old if name not in managed or managed[name][0] != old[name][0]]
        gone = [(old[name][0], 0.0) for name in dropped]
        vip_devs = list(managed.values())
        l2only = [v.address for v in vips if not v.on_loopback and v.services]

        def job(s: _Sockets) -> None:
            try:
                current = dump_chains(s.nft)
            except NetlinkError as e:
                if e.code != _ENOENT:
                    raise
                current = {}
            stale = {c.split("_", 1)[1] for c in current}
            s.nft.nlm_request_batch(encode_setup(setup_ops(vip_devs, stale, l2only)))
            if gone:
                self._send_tokens(s, gone)

        devs = ", ".join(sorted({dev for _, dev in vip_devs})) or "no device"
        await self._run(f"build table netdev {TABLE} on {devs}", job)
        self._managed, self._l2only = managed, l2only
        for name in dropped:
            self._until.pop(name, None)
            self._lapse_counted.discard(name)

    async def verify(self) -> bool:
        """Check the table is whole (chains, rules, managed sets); rebuild it in one batch if not,
        tokens re-armed from our record. Also counts tokens that lapsed since the last call.
        Returns True when it had to repair. Cheap: one dump each of chains, rules, two sets."""
        now = trio.current_time()
        for name, until in self._until.items():
            if until <= now and name not in self._lapse_counted:
                self._lapse_counted.add(name)
                self._lapses += 1
        if self._managed is None:
            return False
        vip_devs = list(self._managed.values())
        deadlines = _to_perf([(self._managed[n][0], u) for n, u in self._until.items() if n in self._managed])

        def job(s: _Sockets) -> bool:
            first = s.seq
            s.seq = (s.seq + 64) & 0x7FFFFFFF or 1  # the element counts' four dumps (and their retries)
            if is_whole(s.nft, vip_devs, self._l2only, raw=(s.raw, first)):
                return False
            self._rebuild(s, vip_devs, deadlines)
            return True

        repaired: bool = await self._run(f"verify table netdev {TABLE}", job)
        self._repairs += repaired
        return repaired

    async def remove_all(self) -> None:
        """Delete vipd's fence table (cleanup, clean stop). Absent is fine; nothing else touched."""

        def job(s: _Sockets) -> None:
            s.nft.nlm_request_batch(encode_setup(drop_table_ops()))

        await self._run(f"delete table netdev {TABLE}", job)
        self._managed = None
        self._until.clear()
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
        return self._last_batch

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
        if not self.covers(vips):
            raise FenceError(f"{what}: {_names(vips)}: routed VIPs (on lo) are not fenced by nftables")
        if managed is None:
            raise FenceError(f"{what}: {_names(vips)}: the fence is not set up (ensure() first)")
        missing = ", ".join(f"{v.name} ({v.ip})" for v in vips
                            if v.name not in managed or managed[v.name][0] != v.address)
        raise FenceError(f"{what}: VIP {missing} is not managed by the fence (not in ensure())")

    async def _run(self, what: Union[str, Callable[[], str]], fn: Callable[[_Sockets], Any]) -> Any:
        """fn(sockets) in the owner thread; pyroute2/OS errors raised as FenceError("WHAT: why")."""
        def job(_ipr: Any) -> Any:
            if self._socks is None:
                self._socks = _Sockets(self.nl.netns)
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

    def _send_tokens(self, s: _Sockets, deadlines: Sequence[tuple[Key, float]]) -> int:
        """Arm each VIP to its deadline (time.perf_counter clock; <= now: remove), in one batch.
        Each timeout is counted from the moment the kernel is expected to have inserted the last
        element (``_lead``); if the send took longer, the batch is recomputed and sent again at
        once. A missing table or set: rebuilt from the last ensure(). Returns elements armed."""
        arm: list[tuple[Key, int]] = []
        for _ in range(_MAX_PASSES):
            t0 = time.perf_counter()
            lead = _LEAD_BASE + 2.0 * self._per_elem * len(deadlines)
            arm, remove = [], []
            for ip, d in deadlines:
                ms = token_ms(d, t0 + lead)
                if ms:
                    arm.append((ip, ms))
                else:
                    remove.append(ip)
            err, sent = self._batch(s, arm, remove)
            managed = self._managed  # replaced, never changed in place, by the trio thread
            if err == _ENOENT and managed is not None:
                self._rebuild(s, list(managed.values()), deadlines)
                return len(arm)
            if err:
                raise NetlinkError(err)
            took = sent - t0  # the kernel inserted every element before send() returned
            self._last_batch = took
            self._per_elem += 0.2 * (took / max(1, len(deadlines)) - self._per_elem)
            if took <= lead:  # so each expires by t0 + took + ms <= its deadline
                return len(arm)
        return len(arm)  # each pass shortened: the last one was sent with the freshest clock

    def _batch(self, s: _Sockets, arm: list[tuple[Key, int]], remove: list[Key]) -> tuple[int, float]:
        """Send one token batch: (0 or the errno of the first failing message, the perf_counter
        time right after the kernel processed it)."""
        data, last = token_batch(arm, remove, s.seq, self.timeout_update)
        first = s.seq
        s.seq = (s.seq + len(arm) + len(remove) + 16) & 0x7FFFFFFF or 1
        if last < 0:
            return 0, time.perf_counter()
        s.fit(len(data))
        s.raw.send(data)  # nfnetlink processes the whole batch inside this call
        sent = time.perf_counter()
        err = 0
        while True:
            try:
                reply = s.raw.recv(1 << 16)
            except socket.timeout:
                raise FenceError(f"no answer from nf_tables within {_ACK_WAIT:g} s") from None
            for seq, code in parse_acks(reply):
                if first <= seq <= last:
                    err = err or code
                    if seq == last:
                        return err, sent

    def _rebuild(self, s: _Sockets, vip_devs: Sequence[tuple[Key, str]], deadlines: Sequence[tuple[Key, float]]) -> None:
        """Delete and rebuild the whole table in one batch, then re-arm the tokens (deadlines on
        the perf_counter clock) in the next one: until then every managed VIP is dropped."""
        s.nft.nlm_request_batch(encode_setup(drop_table_ops() + setup_ops(vip_devs, (), self._l2only)))
        if deadlines:
            t0 = time.perf_counter()
            arm = [(ip, ms) for ip, d in deadlines if (ms := token_ms(d, t0 + _LEAD_BASE))]
            err, _ = self._batch(s, arm, [])
            if err:
                raise NetlinkError(err)


def _to_perf(until: Sequence[tuple[Key, float]]) -> list[tuple[Key, float]]:
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

"""The conflict probe of a daemon's start: every NIC VIP probed once, all at once, before any claim.

Every unit probes its NIC addresses before its first claim (vipd.ownership.moves.acquire: an
RFC 5227 ARP probe, IPv6 DAD; 2 x 0.1 s, vipd.app). At a start every unit wins its key within
about a second, in waves (etcd transactions of up to 100 campaigns), and each wave used to wait
for a probe round of its own after winning. Here the daemon probes every NIC VIP once as it starts,
in parallel with its lease grant and the L2 check (vipd/wiring_l2.py, which holds every claim back
for ~0.3 s anyway), and a unit's probe takes that answer instead of probing again when:

- the answer was "nobody answers": a conflict is never reused (the machine that answered may be
  another vipd host that has since released cleanly: the unit probes afresh, and only a fresh
  answer is a conflict);
- it is at most `FRESH` (2 s) old, counted from the moment the start probe began: RFC 5227 lets
  a host begin using an address up to ANNOUNCE_WAIT (2 s) after its last probe;
- it is used once: any later claim of the unit probes afresh, as before.

Otherwise (the probe of that interface failed, the answer is too old, or a reload added the VIP)
the unit probes as before. A unit whose probe comes while the start probe runs waits for it, at
most until the answer could no longer be used (`FRESH` after it began).

Safety: the probe guards against machines outside vipd; ownership among vipd hosts never depends
on it (etcd does). A foreign machine that begins answering for the address between a probe and
the add is missed by a fresh probe as much as by this one; while owning, the interface's
DuplicateResponderWatch reports it either way (vipd/dataplane/duplicates.py).
"""

from __future__ import annotations

from typing import Awaitable, Callable, Sequence

import trio

from vipd import log
from vipd.dataplane.addrdump import IPAddress
from vipd.errors import DataplaneError
from vipd.model import VipSpec

ProbeMany = Callable[[str, list[IPAddress]], Awaitable[dict[IPAddress, str]]]  # (ifname, ips) -> answered: mac
ProbeOne = Callable[[VipSpec], Awaitable[None]]  # raises AddressConflict (vipd.dataplane.conflict.check_free)

FRESH = 2.0  # seconds: RFC 5227 ANNOUNCE_WAIT, the longest a host may use an address after its last probe


class StartProbe:
    """`run(vips)` once at start; `check_free(vip)` is the units' probe (Conflicts port)."""

    def __init__(self, probe_many: ProbeMany, probe_one: ProbeOne, *, fresh: float = FRESH) -> None:
        self._probe_many = probe_many
        self._probe_one = probe_one
        self._fresh = fresh
        self._free: dict[tuple[str, IPAddress], float] = {}  # (interface, ip) -> when its probe began
        self._began: float | None = None  # when run began (None: not begun)
        self._done = trio.Event()
        self._answered = 0  # addresses someone answered for (for the log line)
        self._failed: list[str] = []  # interfaces whose probe failed

    @property
    def pending(self) -> int:
        """Answers not used yet (fresh or not)."""
        return len(self._free)

    async def run(self, vips: Sequence[VipSpec]) -> None:
        """Probe every VIP in `vips` not on lo, one probe round per interface, all interfaces at
        once; never raises for a failed probe (that interface's units probe as before). Gives up
        after `fresh` seconds: an answer older than that is never used."""
        by_if: dict[str, list[IPAddress]] = {}
        for v in vips:
            if not v.on_loopback:
                by_if.setdefault(v.interface, []).append(v.ip)
        if not by_if:
            return
        self._began = trio.current_time()
        try:
            with trio.move_on_after(self._fresh):
                async with trio.open_nursery() as nursery:
                    for ifname, ips in by_if.items():
                        nursery.start_soon(self._one, ifname, ips, self._began)
        finally:
            self._done.set()
        log.info("start_probe", interfaces=len(by_if), free=len(self._free), answered=self._answered,
                 failed=",".join(self._failed) or None, took=round(trio.current_time() - self._began, 3))

    async def _one(self, ifname: str, ips: list[IPAddress], began: float) -> None:
        try:
            answered = await self._probe_many(ifname, ips)
        except (DataplaneError, OSError) as e:
            log.info("start_probe_failed", interface=ifname, error=e, effect="each VIP is probed at its claim")
            self._failed.append(ifname)
            return
        self._answered += sum(1 for ip in ips if ip in answered)
        for ip in ips:
            if ip not in answered:
                self._free[(ifname, ip)] = began

    async def check_free(self, vip: VipSpec) -> None:
        """The start probe's answer for `vip` when it is "free" and fresh (used once), else a probe now."""
        if vip.on_loopback:
            return await self._probe_one(vip)
        if self._began is not None:
            with trio.move_on_at(self._began + self._fresh):  # (run gives up then too)
                await self._done.wait()
        began = self._free.pop((vip.interface, vip.ip), None)
        if began is not None and trio.current_time() - began <= self._fresh:
            return None
        return await self._probe_one(vip)

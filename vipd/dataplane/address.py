"""VIP addresses with kernel lifetimes, tagged as ours with IFA_PROTO.

``claim`` adds or replaces (RTM_NEWADDR + NLM_F_REPLACE) the address with
valid_lft = preferred_lft = lifetime; calling it again is the refresh that restarts the kernel's
countdown. If vipd stops refreshing (crash, hang, lost lease) the kernel removes the address by
itself when the lifetime runs out: that is the fence. ``lifetime=None`` makes a permanent
(valid_lft forever) address: only for the host's own fixed BGP source address, which is not
lease-bound but is still tagged, so vipd's ownership rules below apply to it too.

Ownership: every address vipd adds carries IFA_PROTO = VIPD_PROTO (kernel >= 6.3 stores it).
vipd never replaces, refreshes or deletes an address without that tag. The kernel's replace
would silently re-tag an untagged address, so each claim reads the interface's addresses first
and refuses; the read and the replace run as one job in the netlink owner thread, so no other
vipd call slips between them (an administrator's ``ip addr`` still could, in that sub-millisecond
window).

Batching: claims and releases that many controllers make in the same moment are coalesced
(vipd.coalesce) into one netlink job per batch, which reads the addresses once (one dump) for the
foreign-copy check of every claim in it: the cost per VIP no longer grows with the number of
addresses on the host.
"""

from __future__ import annotations

import ipaddress
import math
import os
import time
from typing import Any, Iterable, NamedTuple, Optional, Sequence, Union

import trio

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from vipd.coalesce import Coalescer, Outcome
from vipd.fence import HELD_UP
from vipd.model import VipSpec
from vipd.dataplane import addrdump
from vipd.dataplane.addrdump import IPAddress
from vipd.dataplane.netlink import Netlink
from vipd.errors import AddressError, DataplaneError

IPInterface = Union[ipaddress.IPv4Interface, ipaddress.IPv6Interface]

VIPD_PROTO = 0x56  # 'V'; shown as "proto 0x56" by iproute2 >= 6.3 (Debian 12's ip does not print it)
_FOREVER = 0xFFFFFFFF  # INFINITY_LIFE_TIME
_ENODEV = 19
BATCH = 500  # addresses per netlink job: bounds how long one job holds the owner thread (~0.15 s)


class TaggedAddress(NamedTuple):
    """An address carrying VIPD_PROTO, as found in the kernel (a tuple: the reconcile tick builds
    thousands a second). `tagged_address` fills in `ip` from `address`."""

    interface: str
    address: IPInterface
    valid_lft: Optional[int]  # seconds left; None = forever (only a claim with lifetime=None)
    ip: IPAddress  # address.ip (ipaddress builds a new object on every .ip)


def tagged_address(interface: str, address: IPInterface, valid_lft: Optional[int] = None) -> TaggedAddress:
    return TaggedAddress(interface, address, valid_lft, address.ip)


_Entry = addrdump.RawAddress  # one kernel address, as dumped (its ip decoded once)


def _entries(nl: Netlink, index: Optional[int] = None) -> list[_Entry]:
    """Inside a job: the addresses in the netns (of interface ``index`` if given), from one raw dump
    (vipd.dataplane.addrdump: pyroute2's decoding costs ~75 us per address)."""
    sock, seq = nl.route_socket()
    entries = addrdump.dump(sock, seq)
    return entries if index is None else [a for a in entries if a.index == index]


def _index(nl: Netlink, ifname: str) -> Optional[int]:
    """The interface's index, or None when there is no such interface (struct-built request on
    the job's raw route socket: pyroute2's link("get") cost milliseconds per refresh round)."""
    sock, seq = nl.route_socket()
    try:
        return addrdump.link_index(sock, seq, ifname)
    except OSError as e:
        raise NetlinkError(e.errno or 0, f"link {ifname}: {e.strerror}") from None


def _same_ip(entries: Iterable[_Entry], address: IPInterface) -> list[_Entry]:
    ip = address.ip
    return [e for e in entries if e.ip == ip]


def _delete_many(nl: Netlink, entries: list[_Entry]) -> list[int]:
    """Inside a job: delete addresses exactly as dumped, many per send (pyroute2's addr("del")
    costs ~1 ms of CPU each, and a planned stop removes thousands): each one's errno, 0 for
    deleted or already gone."""
    if not entries:
        return []
    sock, seq = nl.route_socket()
    nl.reserve_seq(len(entries))
    return addrdump.delete_many(sock, seq, entries)


def _errno_text(code: int) -> str:
    return f"{os.strerror(code)} (errno {code})"


class AddressManager:
    """Claims, refreshes and releases tagged VIP addresses through one Netlink owner thread."""

    def __init__(self, nl: Netlink) -> None:
        self.nl = nl
        self._claims: Coalescer[tuple[VipSpec, int, float], None] = Coalescer(self._claim_batch, max_batch=BATCH)
        self._releases: Coalescer[VipSpec, None] = Coalescer(self._release_batch, max_batch=BATCH)
        # claims and releases started and not yet done: tagged() waits for them (see there)
        self._inflight: set[trio.Event] = set()

    async def _tracked(self, op: Any, item: Any) -> None:
        done = trio.Event()
        self._inflight.add(done)
        try:
            await op.submit(item)
        finally:
            self._inflight.discard(done)
            done.set()

    async def claim(self, vip: VipSpec, lifetime: Optional[int]) -> None:
        """Add, or replace and so refresh, ``vip.address`` with a ``lifetime`` s countdown;
        ``lifetime=None`` (explicitly: there is no default) adds it with no lifetime at all, for
        the fixed BGP source address. Either way the address carries vipd's tag. Concurrent
        claims share one netlink job (see the module docstring).

        Raises AddressError when the interface is missing, when the same IP is on that
        interface without our tag, or when the kernel refuses.
        """
        if lifetime is None:
            lifetime = _FOREVER
        elif isinstance(lifetime, bool) or not isinstance(lifetime, int) or not 1 <= lifetime < _FOREVER:
            raise AddressError(f"{vip.name}: lifetime must be whole seconds >= 1 or None, got {lifetime!r}")
        await self._tracked(self._claims, (vip, lifetime, time.perf_counter()))

    async def claim_many(self, items: Sequence[tuple[VipSpec, int]],
                         at: Optional[float] = None) -> list[Optional[AddressError]]:
        """claim() for many addresses in one netlink job (lifetime: seconds, or _FOREVER): one
        address dump for every foreign-copy check. Returns the failure of each item, in order.
        `at`: when the lifetimes were computed (perf_counter; default now), see `_aged`."""
        failures: list[Optional[AddressError]] = [None] * len(items)
        at = time.perf_counter() if at is None else at

        def job(ipr: IPRoute) -> None:
            indexes: dict[str, Optional[int]] = {}
            todo: list[tuple[int, int, int]] = []  # (item, interface index, lifetime)
            present: dict[tuple[int, Any], list[_Entry]] = {}
            for e in _entries(self.nl):
                present.setdefault((e.index, e.ip), []).append(e)
            for n, (vip, lifetime) in enumerate(items):
                address, ifname = vip.address, vip.interface
                what = f"claim {address} on {ifname}"
                if ifname not in indexes:
                    indexes[ifname] = _index(self.nl, ifname)
                index = indexes[ifname]
                if index is None:
                    failures[n] = AddressError(f"{what}: no interface {ifname!r}")
                    continue
                same = present.get((index, address.ip), [])
                foreign = [e for e in same if e.proto != VIPD_PROTO]
                if foreign:
                    failures[n] = AddressError(
                        f"{what}: {foreign[0].address} is already on {ifname} without vipd's tag "
                        f"(proto {foreign[0].proto}); refusing to take it over")
                    continue
                stale = [e for e in same if e.address != address]  # ours, an old prefix length: replace would keep it
                code = next((c for c in _delete_many(self.nl, stale) if c), 0)
                if code:
                    failures[n] = AddressError(f"{what}: {_errno_text(code)}")
                    continue
                life = _aged(lifetime, at)
                if life < 1:
                    failures[n] = AddressError(f"{what}: {_LATE}")
                    continue
                todo.append((n, index, life))
            # struct-built RTM_NEWADDR (create or replace; IPv6 without DAD), many per send:
            # pyroute2's addr("replace") costs ~1-2 ms of CPU per address, under the GIL
            sock, seq = self.nl.route_socket()
            self.nl.reserve_seq(len(todo))
            codes = addrdump.replace_many(sock, seq, [(index, items[n][0].address, lifetime, VIPD_PROTO)
                                                      for n, index, lifetime in todo])
            for (n, _, _), code in zip(todo, codes):
                if code:
                    vip = items[n][0]
                    failures[n] = AddressError(f"claim {vip.address} on {vip.interface}: {_errno_text(code)}")

        await self.nl.call_checked(f"claim {len(items)} addresses", job, AddressError)
        return failures

    async def refresh_many(self, items: Sequence[tuple[VipSpec, int]],
                           at: Optional[float] = None) -> dict[str, AddressError]:
        """Restart the countdown of addresses we hold, all in one netlink job and without listing
        the interface (claim() checked for a foreign copy when it first added them; the reconcile
        tick lists tagged addresses). Returns the failures by VIP name. `at`: when the lifetimes
        were computed (perf_counter; default now), see `_aged`."""
        failures: dict[str, AddressError] = {}
        at = time.perf_counter() if at is None else at

        def job(ipr: IPRoute) -> None:
            indexes: dict[str, Optional[int]] = {}
            todo: list[tuple[VipSpec, int, int]] = []
            for vip, lifetime in items:
                if vip.interface not in indexes:
                    indexes[vip.interface] = _index(self.nl, vip.interface)
                index = indexes[vip.interface]
                life = _aged(lifetime, at)
                if index is None:
                    failures[vip.name] = AddressError(f"refresh {vip.address}: no interface {vip.interface!r}")
                elif life < 1:
                    failures[vip.name] = AddressError(f"refresh {vip.address} on {vip.interface}: {_LATE}")
                else:
                    todo.append((vip, index, life))
            # struct-built messages, many per send (pyroute2 costs ~1 ms per address here): what
            # addr("replace", ..., proto=VIPD_PROTO, valid_lft=lifetime, preferred_lft=lifetime) does
            sock, seq = self.nl.route_socket()
            self.nl.reserve_seq(len(todo))
            codes = addrdump.replace_many(sock, seq, [(index, vip.address, lifetime, VIPD_PROTO)
                                                      for vip, index, lifetime in todo])
            for (vip, _, _), code in zip(todo, codes):
                if code:
                    failures[vip.name] = AddressError(f"refresh {vip.address} on {vip.interface}: {_errno_text(code)}")

        await self.nl.call_checked(f"refresh {len(items)} addresses", job, AddressError)
        return failures

    async def release(self, vip: VipSpec) -> None:
        """Delete our tagged address for ``vip`` if present. Absent or untagged: nothing to do.
        Concurrent releases share one netlink job."""
        await self._tracked(self._releases, vip)

    async def release_many(self, vips: Sequence[VipSpec]) -> list[Optional[AddressError]]:
        """release() for many VIPs in one netlink job with one address dump; failures in order."""
        failures: list[Optional[AddressError]] = [None] * len(vips)

        def job(ipr: IPRoute) -> None:
            indexes: dict[str, Optional[int]] = {}
            ours: dict[tuple[int, Any], list[_Entry]] = {}
            for e in _entries(self.nl):
                if e.proto == VIPD_PROTO:
                    ours.setdefault((e.index, e.ip), []).append(e)
            doomed: list[tuple[int, _Entry]] = []
            for n, vip in enumerate(vips):
                if vip.interface not in indexes:
                    indexes[vip.interface] = _index(self.nl, vip.interface)
                index = indexes[vip.interface]
                if index is not None:  # (no interface, no address)
                    doomed += [(n, e) for e in ours.get((index, vip.ip), [])]
            for (n, _), code in zip(doomed, _delete_many(self.nl, [e for _, e in doomed])):
                if code and failures[n] is None:
                    vip = vips[n]
                    failures[n] = AddressError(f"release {vip.address} on {vip.interface}: {_errno_text(code)}")

        await self.nl.call_checked(f"release {len(vips)} addresses", job, AddressError)
        return failures

    async def _claim_batch(self, items: list[tuple[VipSpec, int, float]]) -> list[Outcome[None]]:
        at = min(t for _, _, t in items)  # (the oldest: every lifetime is shortened at least enough)
        return [e if e is not None else None for e in await self.claim_many([(v, life) for v, life, _ in items], at)]

    async def _release_batch(self, vips: list[VipSpec]) -> list[Outcome[None]]:
        return [e if e is not None else None for e in await self.release_many(vips)]

    async def tagged(self) -> list[TaggedAddress]:
        """Every address in this netns carrying VIPD_PROTO. The listing reflects every claim and
        release started before this call (it waits for them): a batched claim may wait a moment
        for its netlink job, and a reconcile must not take its listing for "the address is gone"."""
        for done in list(self._inflight):
            await done.wait()

        def job(ipr: IPRoute) -> list[TaggedAddress]:
            ours = [e for e in _entries(self.nl) if e.proto == VIPD_PROTO]
            if not ours:
                return []
            names = addrdump.link_names(*self.nl.route_socket())
            return [TaggedAddress(names.get(e.index) or f"if{e.index}", e.address, e.valid_lft, e.ip) for e in ours]

        return await self.nl.call_checked("list tagged addresses", job, AddressError)

    async def remove(self, t: TaggedAddress) -> None:
        """Delete one tagged address (stale cleanup). Gone already, or no longer tagged: nothing."""
        await self.remove_many([t])

    async def remove_many(self, items: Sequence[TaggedAddress]) -> None:
        """remove() for many addresses in one netlink job with one address dump (start-up's stale
        cleanup, `vipd cleanup`): not one interface listing per address."""
        if not items:
            return

        def job(ipr: IPRoute) -> None:
            indexes: dict[str, Optional[int]] = {}
            ours = {(e.index, e.address): e for e in _entries(self.nl) if e.proto == VIPD_PROTO}
            doomed: list[_Entry] = []
            for t in items:
                if t.interface not in indexes:
                    indexes[t.interface] = _index(self.nl, t.interface)
                index = indexes[t.interface]
                e = ours.get((index, t.address)) if index is not None else None
                if e is not None:
                    doomed.append(e)
            failed = [(e, code) for e, code in zip(doomed, _delete_many(self.nl, doomed)) if code]
            if failed:
                e, code = failed[0]
                raise NetlinkError(code, f"remove {e.address}: {_errno_text(code)}")

        what = f"remove {items[0].address} from {items[0].interface}" if len(items) == 1 else \
            f"remove {len(items)} addresses"
        await self.nl.call_checked(what, job, AddressError)

    async def _find(self, vip: VipSpec) -> Optional[_Entry]:
        address, ifname = vip.address, vip.interface

        def job(ipr: IPRoute) -> Optional[_Entry]:
            index = _index(self.nl, ifname)
            if index is None:
                return None
            for e in _entries(self.nl, index):
                if e.address == address and e.proto == VIPD_PROTO:
                    return e
            return None

        return await self.nl.call_checked(f"look up {address} on {ifname}", job, AddressError)

    async def holds(self, vip: VipSpec) -> bool:
        """Our tagged ``vip.address`` (same prefix length) is on ``vip.interface``."""
        return await self._find(vip) is not None

    async def lifetime_left(self, vip: VipSpec) -> Optional[int]:
        """Seconds the kernel will keep our address (rounded down), or None when we do not hold
        it or its lifetime is infinite (a claim with lifetime=None; ``holds`` tells which)."""
        e = await self._find(vip)
        return None if e is None else e.valid_lft


_LATE = "its deadline passed before the kernel could be told (the process was held up)"




def _aged(lifetime: int, at: float) -> int:
    """A lifetime computed at `at` (perf_counter) as it must be sent now, in the owner thread just
    before the kernel is told. A process stopped (SIGSTOP) or starved between the two would start
    the countdown late, and the address, the only fence of a routed VIP, would outlive its
    deadline by as long: past the fence margin (>= MIN_FENCE_MARGIN, 1.25 s), the etcd lease may
    have expired and another host claimed the VIP. Past HELD_UP (0.5 s, well inside that margin;
    an ordinary queue wait is far shorter, and shortening for it would end addresses before the
    lazy refresh expects, vipd/refresh.py) it is shortened by the whole time since, rounded up
    (below 1: not sent, the running countdown ends first). _FOREVER stays."""
    if lifetime >= _FOREVER:
        return lifetime
    age = time.perf_counter() - at
    return lifetime if age <= HELD_UP else lifetime - math.ceil(age)


class RefreshBatcher:
    """Coalesces the lifetime refreshes that many controllers make after the same keepalive into
    one netlink job: the first caller of a scheduler pass leads, the others wait for its result."""

    def __init__(self, addresses: AddressManager) -> None:
        self._addresses = addresses
        self._pending: list[_Refresh] = []
        self._leading = False

    async def refresh(self, vip: VipSpec, lifetime: int) -> None:
        item = _Refresh(vip, lifetime, time.perf_counter())
        self._pending.append(item)
        if self._leading:
            await item.done.wait()
        else:
            self._leading = True
            try:
                await trio.sleep(0)  # every controller woken by the same deadline enqueues first
            finally:  # even when cancelled: the others wait on this job, so always run it
                batch, self._pending, self._leading = self._pending, [], False
                with trio.CancelScope(shield=True):
                    failures: dict[str, AddressError] = {}
                    try:
                        failures = await self._addresses.refresh_many([(r.vip, r.lifetime) for r in batch],
                                                                      min(r.at for r in batch))
                    except DataplaneError as e:
                        failures = {r.vip.name: AddressError(str(e)) for r in batch}
                    except BaseException as e:  # never leave a follower waiting, whatever happened
                        failures = {r.vip.name: AddressError(f"refresh failed: {e!r}") for r in batch}
                        raise
                    finally:
                        for r in batch:
                            r.error = failures.get(r.vip.name)
                            r.done.set()
        if item.error is not None:
            raise item.error


class _Refresh:
    def __init__(self, vip: VipSpec, lifetime: int, at: float) -> None:
        self.vip, self.lifetime, self.at = vip, lifetime, at
        self.done = trio.Event()
        self.error: Optional[AddressError] = None

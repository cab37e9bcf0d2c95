"""The director on one host: loads bpf/dsr.c's object, attaches it to tc ingress of each director
interface (pyroute2, through the Netlink thread: the program fd is created in this process, which
sends the attach in its own netns), programs services and tables, and holds the lease-bound fence.

Tagging: vipd's filter is the direct-action bpf filter at priority TC_PRIO on a clsact ingress
named `vipd_dsr`; vipd removes only filters matching all of that. A program left attached by a
SIGKILLed vipd stops directing when its deadlines pass (it passes every frame up the stack), and the
next start replaces it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import ipaddress
import trio
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from vipd import log
from vipd.config import VipSpec
from vipd.dataplane.netlink import Netlink, netlink_error_text
from vipd.dsr.bpf import BpfError, BpfObject, find_object
from vipd.dsr.maps import BackendSlot, DirectorMaps

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

PROG = "vipd_dsr"
TC_PRIO = 0x5644  # "VD": vipd's filter priority
TC_HANDLE = 1
INGRESS = "ffff:fff2"  # clsact ingress


def kernel_ns(trio_deadline: float) -> int:
    """A trio-clock instant as CLOCK_MONOTONIC nanoseconds (what bpf_ktime_get_ns reads)."""
    offset = time.monotonic() - trio.current_time()
    return int((trio_deadline + offset) * 1e9)


def _ours(msg: Any) -> bool:
    return (msg.get_attr("TCA_KIND") == "bpf" and (msg["info"] >> 16) == TC_PRIO
            and msg.get_nested("TCA_OPTIONS", "TCA_BPF_NAME") == PROG)


def _attach(ipr: IPRoute, ifname: str, fd: int) -> int:
    idx = ipr.link_lookup(ifname=ifname)
    if not idx:
        raise BpfError(f"no interface {ifname!r} to attach the DSR director to")
    index = idx[0]
    try:
        ipr.tc("add", "clsact", index=index)
    except NetlinkError as e:
        if e.code != 17:  # EEXIST: the clsact qdisc is shared with others; never removed by vipd
            raise
    _detach_index(ipr, index)
    ipr.tc("add-filter", "bpf", index=index, handle=TC_HANDLE, fd=fd, name=PROG, parent=INGRESS,
           classid=1, direct_action=True, prio=TC_PRIO)
    return index


def _detach_index(ipr: IPRoute, index: int) -> bool:
    try:
        filters = ipr.get_filters(index=index, parent=INGRESS)
    except NetlinkError:
        return False  # no clsact qdisc: nothing of ours
    found = False
    for m in filters:
        if _ours(m) and m.get_nested("TCA_OPTIONS", "TCA_BPF_NAME"):
            ipr.tc("del-filter", "bpf", index=index, handle=TC_HANDLE, parent=INGRESS, prio=TC_PRIO)
            found = True
            break
    return found


def _attached(ipr: IPRoute, index: int) -> bool:
    try:
        return any(_ours(m) for m in ipr.get_filters(index=index, parent=INGRESS))
    except NetlinkError:
        return False


@dataclass
class Director:
    """One loaded program attached to `interfaces` in this process's netns."""

    nl: Netlink
    interfaces: Sequence[str]
    obj: BpfObject | None = None
    maps: DirectorMaps | None = None
    indexes: dict[str, int] = field(default_factory=dict)
    macs: dict[str, str] = field(default_factory=dict)

    async def start(self) -> None:
        """Load and attach. BpfError / DataplaneError with the reason when DSR cannot run here."""
        self.obj = BpfObject(find_object())
        self.maps = DirectorMaps(self.obj)
        fd = self.obj.program_fd(PROG)
        for ifname in self.interfaces:
            link = await self.nl.link(ifname)
            if link.mac is None:
                raise BpfError(f"{ifname} has no MAC address: the DSR director needs an Ethernet interface")
            self.maps.set_iface(link.index, link.mac)
            self.macs[ifname] = link.mac
            try:
                self.indexes[ifname] = await self.nl.call(lambda ipr: _attach(ipr, ifname, fd))
            except NetlinkError as e:
                raise BpfError(f"cannot attach the DSR director to {ifname}: {netlink_error_text(e)}") from None
            log.info("dsr_attached", interface=ifname)

    async def reattach(self, ifname: str) -> None:
        assert self.obj is not None
        fd = self.obj.program_fd(PROG)
        self.indexes[ifname] = await self.nl.call(lambda ipr: _attach(ipr, ifname, fd))

    async def attached(self) -> dict[str, bool]:
        out = {}
        for name, index in self.indexes.items():
            out[name] = await self.nl.call(lambda ipr: _attached(ipr, index))
        return out

    async def stop(self) -> None:
        """Detach (only vipd's filter) and close the object: nothing of DSR stays in the kernel."""
        for name, index in list(self.indexes.items()):
            try:
                await self.nl.call(lambda ipr: _detach_index(ipr, index))
            except NetlinkError as e:
                log.warning("dsr_detach_failed", interface=name, error=netlink_error_text(e))
            self.indexes.pop(name, None)
        if self.obj is not None:
            self.obj.close()
        self.obj = self.maps = None

    def set_service(self, vip: IPAddress, proto: str, port: int, backends: Sequence[BackendSlot],
                    self_backend: bool) -> bool:
        assert self.maps is not None
        return self.maps.set_service(vip, proto, port, backends, self_backend)


async def cleanup(nl: Netlink, interfaces: Sequence[str]) -> list[str]:
    """Remove vipd's DSR filter from these interfaces (what a previous run left); returns where."""
    def job(ipr: IPRoute) -> list[str]:
        done = []
        for name in interfaces:
            idx = ipr.link_lookup(ifname=name)
            if idx and _detach_index(ipr, idx[0]):
                done.append(name)
        return done
    return await nl.call(job)


class DsrFence:
    """The project's Fence port for DSR: each VIP directs only until a deadline vipd moves forward
    with every lease proof. The program compares it with bpf_ktime_get_ns(): when vipd stops
    proving ownership (hung, SIGKILLed, partitioned) the director stops directing by itself."""

    def __init__(self, director: Director) -> None:
        self._director = director
        self._until: dict[IPAddress, float] = {}  # trio clock

    async def arm(self, vips: Sequence[VipSpec], until: float) -> None:
        maps = self._director.maps
        if maps is None:
            return
        ns = kernel_ns(until)
        for v in vips:
            maps.set_deadline(v.ip, ns)
            self._until[v.ip] = until

    async def disarm(self, vips: Sequence[VipSpec]) -> None:
        maps = self._director.maps
        for v in vips:
            self._until.pop(v.ip, None)
            if maps is not None:
                maps.clear_deadline(v.ip)

    def covers(self, vips: Sequence[VipSpec]) -> bool:
        """True while every VIP is armed and its deadline has not passed."""
        now = trio.current_time()
        return all(self._until.get(v.ip, -1.0) > now for v in vips)

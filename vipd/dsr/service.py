"""DsrService: what the daemon runs for DSR on one host. The API the daemon calls:

    svc = DsrService(cfg.node, cfg.vips, nl)
    await nursery.start(svc.run)      # loads + attaches the director, starts the backend role;
                                      # never fails for want of BPF: svc.unavailable says why
    svc.update_hosts(directory.hosts) # on every host-directory change (etcd presence and health)
    await svc.fence.arm(vips, until)  # with each lease proof (trio clock), like the address lifetime
    await svc.fence.disarm(vips)      # on release / fence
    svc.status()                      # per service: backends and their state (for `vipd state`)

Every director programs the same table from the same backend names: node backends present and
healthy in etcd, static backends whose check passes, each only once its MAC is resolved.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

import trio
from pyroute2 import IPRoute

from vipd import log
from vipd.config import VipSpec
from vipd.config_dsr import BackendSpec, ServiceSpec
from vipd.dataplane.netlink import Netlink
from vipd.dsr.backend import BackendRole
from vipd.dsr.director import Director, DsrFence, cleanup
from vipd.dsr.maps import BackendSlot
from vipd.errors import DataplaneError
from vipd.election.hosts import HostInfo

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
_USABLE_NUD = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80  # REACHABLE STALE DELAY PROBE NOARP PERMANENT


@dataclass
class BackendState:
    spec: BackendSpec
    state: str = "unknown"  # active | absent | unhealthy | check failing (active: in the table)
    mac: str | None = None
    local: bool = False


def interface_of(vip: VipSpec, s: ServiceSpec) -> str:
    return s.interface or vip.interface


def _neigh_mac(ipr: IPRoute, ip: IPAddress, ifname: str) -> str | None:
    idx = ipr.link_lookup(ifname=ifname)
    if not idx:
        return None
    fam = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    for m in ipr.get_neighbours(family=fam, ifindex=idx[0]):
        dst = m.get_attr("NDA_DST")
        mac = m.get_attr("NDA_LLADDR")
        if dst and mac and ipaddress.ip_address(dst) == ip and m["state"] & _USABLE_NUD:
            return str(mac)
    return None


class DsrService:
    def __init__(self, node: str, vips: Sequence[VipSpec], nl: Netlink, *, resolve_interval: float = 1.0) -> None:
        self.node = node
        self.vips = [v for v in vips if v.services]
        self.nl = nl
        self.interfaces = sorted({interface_of(v, s) for v in self.vips for s in v.services})
        self.director = Director(nl, self.interfaces)
        self.fence = DsrFence(self.director)
        self.backend_role = BackendRole(nl, [v for v in self.vips
                                             if any(b.node == node for s in v.services for b in s.backends)])
        self.unavailable: str | None = None  # why DSR directing is off on this host
        self.attached: dict[str, bool] = {}  # interface -> vipd's filter is there (checked at each reconcile)
        self.backend_refused: str | None = None
        self.hosts: dict[str, HostInfo] = {}
        self.states: dict[tuple[str, str], list[BackendState]] = {
            (v.name, s.label): [BackendState(b) for b in s.backends] for v in self.vips for s in v.services}
        self._changed = trio.Event()
        self._retry_soon = False
        self._interval = min([resolve_interval] + [s.check_interval for v in self.vips for s in v.services])

    @property
    def directing(self) -> bool:
        return self.director.maps is not None

    def update_hosts(self, hosts: Mapping[str, HostInfo]) -> None:
        """The host directory changed (etcd presence/health): recompute the tables at once."""
        self.hosts = dict(hosts)
        self._changed.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if not self.vips:
            task_status.started()
            return
        try:
            await cleanup(self.nl, self.interfaces)
            await self.director.start()
        except (DataplaneError, OSError) as e:
            self.unavailable = str(e)
            await self.director.stop()
            log.warning("dsr_unavailable", reason=self.unavailable,
                        effect="this host does not direct DSR traffic; every other feature runs")
        try:
            try:
                await self.backend_role.start()
            except DataplaneError as e:
                self.backend_refused = str(e)
                log.error("dsr_backend_refused", reason=str(e))
            await self.reconcile()
            task_status.started()
            while True:
                with trio.move_on_after(0.1 if self._retry_soon else self._interval):
                    await self._changed.wait()
                self._changed = trio.Event()
                await self.reconcile()
        finally:
            with trio.CancelScope(shield=True):
                await self.director.stop()
                await self.backend_role.stop()

    async def reconcile(self) -> None:
        """Health, MACs, then every service's table (a no-op when its backend set is unchanged)."""
        self._retry_soon = False
        if self.directing:
            self.attached = await self.director.attached()
            for name, ok in self.attached.items():
                if not ok:  # someone removed it (tc filter del, qdisc del): put it back
                    log.warning("dsr_reattach", interface=name)
                    await self.director.reattach(name)
        for v in self.vips:
            for s in v.services:
                states = self.states[(v.name, s.label)]
                for st in states:
                    await self._refresh(v, s, st)
                if self.directing:
                    # membership decides the table (the same on every director); an unresolved MAC
                    # only makes this director drop that backend's flows until it resolves
                    slots = [BackendSlot(st.spec.name, st.mac, st.local) for st in states if st.state == "active"]
                    me = any(b.node == self.node for b in s.backends)
                    if self.director.set_service(v.ip, s.protocol, s.port, slots, me):
                        log.info("dsr_table", vip=v.name, service=s.label,
                                 backends=",".join(sorted(b.name for b in slots)) or "-")

    async def _refresh(self, vip: VipSpec, s: ServiceSpec, st: BackendState) -> None:
        b = st.spec
        ifname = interface_of(vip, s)
        if b.node is not None:
            info = self.hosts.get(b.node)
            if info is None:
                st.state = "absent"
                return
            if not info.healthy:
                st.state = "unhealthy"
                return
        if b.node is None and s.protocol == "tcp" and not await _tcp_check(b.address, s.port, s.check_timeout):
            st.state = "check failing"
            return
        st.state = "active"
        if b.node == self.node:
            st.mac, st.local = self.director.macs.get(ifname), True
        elif self.directing:
            st.mac = await self._resolve(b.address, ifname, s.check_timeout)

    async def _resolve(self, ip: IPAddress, ifname: str, timeout: float) -> str | None:
        """The neighbour's MAC from the kernel's table; when it has none, one datagram makes the kernel
        resolve it, and the next reconcile (in 0.1 s) reads it."""
        mac = await self.nl.call(lambda ipr: _neigh_mac(ipr, ip, ifname))
        if mac is None:
            await _poke(ip)
            self._retry_soon = True
        return mac

    def status(self) -> list[dict[str, Any]]:
        traffic = self.director.maps.backend_traffic() if self.director.maps else {}
        gens = self.director.maps.generation if self.director.maps else {}
        from vipd.dsr.maps import svc_key
        out = []
        for v in self.vips:
            for s in v.services:
                out.append({
                    "vip": v.name, "service": s.label, "address": str(v.ip),
                    "directing": self.directing and self.fence.covers([v]),
                    "generation": gens.get(svc_key(v.ip, s.protocol, s.port), 0),
                    "backends": [{"backend": st.spec.name, "address": str(st.spec.address), "state": st.state,
                                  "mac": st.mac, "local": st.local,
                                  "packets": traffic[st.spec.name].packets if st.spec.name in traffic else 0,
                                  "bytes": traffic[st.spec.name].bytes if st.spec.name in traffic else 0}
                                 for st in self.states[(v.name, s.label)]],
                })
        return out


async def _poke(ip: IPAddress) -> None:
    fam = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    with trio.socket.socket(fam, socket.SOCK_DGRAM) as sock:
        try:
            await sock.sendto(b"", (str(ip), 9))
        except OSError as e:
            if e.errno not in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ECONNREFUSED):
                raise


async def _tcp_check(ip: IPAddress, port: int, timeout: float) -> bool:
    with trio.move_on_after(timeout):
        try:
            stream = await trio.open_tcp_stream(str(ip), port)
        except OSError:
            return False
        await stream.aclose()
        return True
    return False


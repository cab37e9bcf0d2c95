"""The daemon's heartbeat service: resolves its address and key, runs the transport, follows the
host directory, and answers the successor logic's questions (vipd/succession.py) before and after
it runs (before: no links, nobody suspect, nothing granted).

The address is `[peers] address`, else this host's first IPv4 address on the interface of the first
NIC VIP (peers heartbeat over the VIPs' own segment); it is published in the host's presence
(`peer`: "ip:port") so that every host finds every other. The key is `[peers] key`/`key_file`,
else the cluster key bootstrapped once through etcd (vipd/peers/keyring.py).
"""

from __future__ import annotations

import ipaddress
import socket
import time
from typing import Callable, Mapping

import trio

from vipd import log
from vipd.config import Config
from vipd.dataplane.netlink import Netlink
from vipd.errors import DataplaneError, EtcdError
from vipd.peers.keyring import KeyClient, cluster_key
from vipd.peers.protocol import Event, Generation, Params, PeerLink, Peers
from vipd.peers.transport import PeerTransport, load_incarnation, loop_clock

RETRY = 1.0  # seconds between attempts to read the cluster key while etcd does not answer


class PeerService:
    def __init__(self, cfg: Config, client: KeyClient, nl: Netlink, on_event: Callable[[Event], None]) -> None:
        self._cfg = cfg
        self._client = client
        self._nl = nl
        self._on_event = on_event
        self.params = Params(cfg.peers.interval, cfg.peers.lease, cfg.peers.grace)
        self.transport: PeerTransport | None = None
        self.address = ""  # "ip:port" once bound (published with the presence)
        self._hosts: dict[str, tuple[str, int]] = {}
        # when the trio loop's running batch began, on time.perf_counter (None: it waits for I/O):
        # the daemon's loop instrument (vipd/loopwatch.py); None: the transport checks in instead
        self.loop_busy_since: Callable[[], float | None] | None = None
        self.wants_ack: Callable[[str], bool] | None = None  # (PeerTransport.wants_ack)

    def _busy_since(self, clock: Callable[[], float]) -> Callable[[], float | None] | None:
        """`loop_busy_since` on the transport's clock (trio's: perf_counter plus an offset)."""
        busy = self.loop_busy_since
        if busy is None:
            return None
        offset = clock() - time.perf_counter()

        def since() -> float | None:
            began = busy()
            return None if began is None else began + offset
        return since

    async def resolve(self) -> str | None:
        """This host's heartbeat IP, or None (then fast takeover is off, with a log line)."""
        if self._cfg.peers.address:
            return self._cfg.peers.address
        nics = [v for v in self._cfg.vips if not v.on_loopback]
        if not nics:
            return None
        ifname = nics[0].interface

        def job(ipr) -> list[str]:  # type: ignore[no-untyped-def]
            idx = ipr.link_lookup(ifname=ifname)
            if not idx:
                return []
            return [m.get_attr("IFA_ADDRESS") for m in ipr.get_addr(family=socket.AF_INET, index=idx[0])
                    if m.get_attr("IFA_ADDRESS") and not _is_vip(self._cfg, m.get_attr("IFA_ADDRESS"))]

        try:
            found = await self._nl.call_checked(f"interface {ifname!r}", job, DataplaneError)
        except DataplaneError as e:
            log.warning("peers_address_unknown", interface=ifname, error=e)
            return None
        return found[0] if found else None

    async def run(self, ip: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, then heartbeat forever; readiness once bound (the key is read first, retrying)."""
        while True:
            try:
                key = await cluster_key(self._client, self._cfg.etcd.prefix, self._cfg.peers.key)
                break
            except EtcdError as e:
                log.warning("peers_key_unavailable", error=e, retry=RETRY)
                await trio.sleep(RETRY)
        peers = Peers(self._cfg.node, load_incarnation(self._cfg.state_dir), key, self.params)
        clock = loop_clock()
        transport = PeerTransport(peers, (ip, self._cfg.peers.port), on_event=self._on_event, clock=clock,
                                  stall=self._cfg.peers.stall, loop_busy_since=self._busy_since(clock),
                                  wants_ack=self.wants_ack)
        async with trio.open_nursery() as nursery:
            await nursery.start(transport.run)
            self.transport = transport
            host = transport.bound[0]
            self.address = f"[{host}]:{transport.bound[1]}" if ":" in host else f"{host}:{transport.bound[1]}"
            transport.set_peers(self._hosts)
            log.info("peers_ready", address=self.address, interval=self.params.interval, lease=self.params.lease,
                     grace=self.params.grace)
            task_status.started()

    def set_hosts(self, published: Mapping[str, str]) -> None:
        """Follow the directory: node -> "ip:port" its presence publishes ("" for none)."""
        hosts = {}
        for node, text in published.items():
            addr = _parse(text)
            if addr is not None and node != self._cfg.node:
                hosts[node] = addr
        if hosts != self._hosts:
            self._hosts = hosts
            if self.transport is not None:
                self.transport.set_peers(hosts)

    # ---- the PeersPort (vipd/succession.py) ----------------------------------------------------

    def suspect(self, peer: str) -> bool:
        return self.transport is not None and peer in self.transport.peers.links and self.transport.suspect(peer)

    def validate(self, peer: str, gen: Generation) -> None:
        if self.transport is not None and peer in self.transport.peers.links:
            self.transport.validate(peer, gen)

    def link(self, peer: str) -> PeerLink | None:
        return self.transport.link(peer) if self.transport is not None else None

    def peer_names(self) -> list[str]:
        return self.transport.peer_names() if self.transport is not None else []

    def hand_grants(self, grants: dict[str, int]) -> bool:
        return self.transport is not None and self.transport.hand_grants(grants)


def _parse(text: str) -> tuple[str, int] | None:
    host, _, port = text.rpartition(":")
    try:
        return str(ipaddress.ip_address(host.strip("[]"))), int(port)
    except ValueError:
        return None


def _is_vip(cfg: Config, ip: str) -> bool:
    return any(str(v.ip) == ip for v in cfg.vips)

"""Routed setups: the host's fixed BGP source address (kept on `lo`, prefsrc routes to the peers,
optional tcp/179 SNAT) and egress SNAT rules that follow VIP ownership (vipd's nftables table,
armed with the lease deadline so they stop applying by themselves)."""

from __future__ import annotations

import ipaddress
from typing import Any, Sequence

import trio

from vipd import log
from vipd.config import Config
from vipd.model import VipSpec
from vipd.dataplane.address import AddressManager, TaggedAddress
from vipd.dataplane.nft import BgpSnat, EgressRule, NftManager
from vipd.dataplane.routes import SourceRoutes
from vipd.errors import ConfigError, DataplaneError, EtcdError


class Routing:
    def __init__(self, cfg: Config, nl: Any, addresses: AddressManager, client: Any) -> None:
        self._cfg = cfg
        self._nl = nl
        self._addresses = addresses
        self._client = client
        ips = {v.name: v.ip for v in cfg.vips}
        self._rules = [EgressRule(e.name, ips[e.vip], e.destinations, e.protocol, e.ports, e.sources,
                                  e.out_interface) for e in cfg.egress]
        self._egress_ips = {r.vip for r in self._rules}
        self._armed: dict[Any, float] = {}  # egress VIP -> deadline its set elements carry
        self.nft: NftManager | None = None
        if self._rules or (cfg.bgp.enabled and cfg.bgp.snat):
            self.nft = NftManager(nl)
        self.routes = SourceRoutes(nl) if cfg.bgp.enabled else None
        self.source: ipaddress.IPv4Address | None = None

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Resolve and hold the BGP source address, install routes and vipd's nftables table."""
        if self._cfg.bgp.enabled:
            self.source = self._cfg.bgp.source or await self._allocate()
            await self._hold_source()
            log.info("bgp_source", address=self.source, peers=",".join(map(str, self._cfg.bgp.peers)))
        if self.nft is not None:
            snat = BgpSnat(self.source, self._cfg.bgp.peers) if self.source and self._cfg.bgp.snat else None
            await self.nft.ensure_base(self._rules, snat)
            log.info("nft_table_ready", egress_rules=len(self._rules), bgp_snat=snat is not None)
        else:  # the config no longer needs it: drop a table an earlier run left (only ever vipd's own)
            async with NftManager(self._nl) as nft:
                await nft.remove_all()

    async def aclose(self) -> None:
        if self.nft is not None:
            await self.nft.aclose()

    def is_source(self, t: TaggedAddress) -> bool:
        return self.source is not None and t.interface == "lo" and t.address.ip == self.source

    async def _hold_source(self) -> None:
        assert self.source is not None and self.routes is not None
        spec = VipSpec("bgp-source", ipaddress.ip_interface(f"{self.source}/32"), "lo", announce_count=0)
        await self._addresses.claim(spec, None)  # permanent, tagged: the host's own, not lease-bound
        await self.routes.ensure(self._cfg.bgp.peers, self.source)

    async def _allocate(self) -> ipaddress.IPv4Address:
        """One address from the pool per node name, recorded in etcd (no lease: it stays the node's)."""
        pool = self._cfg.bgp.source_pool
        assert pool is not None
        prefix = f"{self._cfg.etcd.prefix}bgp-source/"
        while True:
            try:
                kvs, _ = await self._client.get_prefix(prefix)
                taken = {kv.key[len(prefix):]: kv.value for kv in kvs}
                for addr, node in taken.items():
                    if node == self._cfg.node:
                        return ipaddress.IPv4Address(addr)
                for addr in pool.hosts() if pool.num_addresses > 2 else pool:
                    if str(addr) in taken:
                        continue
                    won, kv = await self._client.create(prefix + str(addr), self._cfg.node, 0)
                    if won:
                        log.info("bgp_source_allocated", address=addr, pool=pool)
                        return addr
                raise ConfigError("bgp.source_pool", f"{pool} has no free address left")
            except EtcdError as e:
                log.warning("bgp_source_allocation_failed", error=e)
                await trio.sleep(1.0)

    async def reconcile(self) -> None:
        """Level-triggered: the source address and the routes the kernel drops with it come back."""
        if self.source is None or self.routes is None:
            return
        try:
            missing = await self.routes.missing(self._cfg.bgp.peers, self.source)
            if missing or not any(self.is_source(t) for t in await self._addresses.tagged()):
                log.warning("bgp_source_repair", missing_routes=len(missing))
                await self._hold_source()
        except DataplaneError as e:
            log.error("bgp_source_repair_failed", error=e)

    # ---- the controllers' egress port ----------------------------------------------------------
    def covers(self, vips: Sequence[VipSpec]) -> bool:
        return any(v.ip in self._egress_ips for v in vips)

    async def arm(self, vips: Sequence[VipSpec], until: float) -> None:
        ips = [v.ip for v in vips if v.ip in self._egress_ips]
        if ips and self.nft is not None:
            ms = int((until - trio.current_time()) * 1000)
            if ms > 0:
                await self.nft.arm(ips, ms)
                for ip in ips:
                    self._armed[ip] = until

    async def disarm(self, vips: Sequence[VipSpec]) -> None:
        ips = [v.ip for v in vips if v.ip in self._egress_ips]
        for ip in ips:
            self._armed.pop(ip, None)
        if ips and self.nft is not None:
            await self.nft.disarm(ips)

    def armed_until(self, vips: Sequence[VipSpec]) -> float | None:
        times = [self._armed.get(v.ip) for v in vips if v.ip in self._egress_ips]
        return None if not times or any(t is None for t in times) else min(t for t in times if t is not None)

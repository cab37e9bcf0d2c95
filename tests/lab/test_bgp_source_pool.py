"""BGP source addresses allocated from a pool through etcd: the same node always gets the same
address, no two nodes share one, and an exhausted pool is a clear error."""

from __future__ import annotations

import ipaddress

import pytest
import trio

from vipd import config
from vipd.election.etcd import EtcdClient
from vipd.errors import ConfigError
from vipd.routing import Routing


def _cfg(node: str, endpoint: str, pool: str) -> config.Config:
    return config.parse({"node": node, "etcd": {"endpoints": [endpoint], "prefix": "/vt/pool/"},
                         "bgp": {"source_pool": pool, "peers": ["10.213.0.1"]}, "vip": []})


async def _allocate(node: str, endpoint: str, pool: str) -> ipaddress.IPv4Address:
    cfg = _cfg(node, endpoint, pool)
    async with EtcdClient.from_config(cfg.etcd) as client:
        return await Routing(cfg, None, None, client)._allocate()  # type: ignore[arg-type]


async def test_pool_allocation_is_stable_and_exclusive(etcd_server):
    ep = etcd_server.endpoint
    pool = "198.18.255.0/29"  # six usable addresses
    got = {}
    async with trio.open_nursery() as n:  # concurrent first allocations must not collide
        for node in ("h1", "h2", "h3", "h4"):
            async def one(node=node):
                got[node] = await _allocate(node, ep, pool)
            n.start_soon(one)
    assert len(set(got.values())) == 4
    assert all(a in ipaddress.ip_network(pool).hosts() for a in got.values())
    for node, addr in got.items():  # a restart (or another process) of the same node gets the same one
        assert await _allocate(node, ep, pool) == addr


async def test_exhausted_pool_is_a_config_error(etcd_server):
    ep = etcd_server.endpoint
    pool = "198.18.254.0/30"  # two usable addresses
    await _allocate("a", ep, pool)
    await _allocate("b", ep, pool)
    with pytest.raises(ConfigError, match="bgp.source_pool: 198.18.254.0/30 has no free address left"):
        await _allocate("c", ep, pool)

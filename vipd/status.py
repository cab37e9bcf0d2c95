"""`vipd status`: every VIP's owner, ownership epoch and lease time left, as etcd sees them."""

from __future__ import annotations

from typing import Any

from vipd.config import Config
from vipd.election.etcd import EtcdClient
from vipd.election.owners import OwnerKeys


async def collect(cfg: Config) -> dict[str, Any]:
    async with EtcdClient.from_config(cfg.etcd) as client:
        keys = OwnerKeys(client, cfg.etcd.prefix, cfg.node)
        owners, revision = await keys.list()
        hosts_kvs, _ = await client.get_prefix(cfg.etcd.prefix + "hosts/")
        ttl: dict[int, int] = {}
        for rec in owners.values():
            if rec.lease and rec.lease not in ttl:
                ttl[rec.lease] = await client.time_to_live(rec.lease)
        addresses = {u.name: ",".join(str(v.address) for v in u.vips) for u in cfg.units}
        vips = []
        for name in sorted(set(owners) | set(addresses)):
            rec = owners.get(name)
            vips.append({
                "vip": name,
                "address": addresses.get(name, "?"),
                "owner": rec.node if rec else None,
                "epoch": rec.epoch if rec else None,
                "lease": f"{rec.lease:x}" if rec and rec.lease else None,
                "lease_ttl_left": ttl.get(rec.lease) if rec else None,
            })
        hosts = sorted(kv.key[len(cfg.etcd.prefix + "hosts/"):] for kv in hosts_kvs)
        return {"endpoint": client.endpoint, "revision": revision, "hosts": hosts, "vips": vips}


def render(status: dict[str, Any]) -> str:
    lines = [f"etcd {status['endpoint']} revision {status['revision']}; hosts up: "
             f"{', '.join(status['hosts']) or 'none'}",
             f"{'VIP':<16} {'ADDRESS':<28} {'OWNER':<16} {'EPOCH':>8} {'LEASE':>18} {'TTL LEFT':>8}"]
    for v in status["vips"]:
        lines.append(f"{v['vip']:<16} {v['address']:<28} {v['owner'] or '-':<16} {v['epoch'] or '-':>8} "
                     f"{v['lease'] or '-':>18} {'-' if v['lease_ttl_left'] is None else str(v['lease_ttl_left']) + 's':>8}")
    return "\n".join(lines)

"""`vipd status`: every VIP's owner, ownership epoch and lease time left, and every host's health,
as etcd sees them."""

from __future__ import annotations

from typing import Any

from vipd.config import Config
from vipd.dsr import status as dsr_status
from vipd.election.etcd import EtcdClient
from vipd.election.hosts import HostInfo, rankings
from vipd.election.owners import OwnerKeys
from vipd.model import OwnerRecord


async def collect(cfg: Config) -> dict[str, Any]:
    async with EtcdClient.from_config(cfg.etcd) as client:
        keys = OwnerKeys(client, cfg.etcd.prefix, cfg.node)
        owners, revision = await keys.list()
        hosts_prefix = cfg.etcd.prefix + "hosts/"
        hosts_kvs, _ = await client.get_prefix(hosts_prefix)
        hosts = {kv.key[len(hosts_prefix):]: HostInfo.from_json(kv.key[len(hosts_prefix):], kv.value)
                 for kv in hosts_kvs}
        ttl: dict[int, int] = {}
        for held in owners.values():
            if held.lease and held.lease not in ttl:
                ttl[held.lease] = await client.time_to_live(held.lease)
        addresses = {u.name: ",".join(str(v.address) for v in u.vips) for u in cfg.units}
        ranked = rankings(cfg.units, hosts)
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
                "successor": rec.successor if rec and rec.node else None,  # fast takeover (vipd/succession.py)
                "preferred": (ranked.get(name) or [None])[0],
                "candidates": list(ranked.get(name, ())),
            })
        host_rows = [{"node": h.node, "healthy": h.healthy, "drained": h.drained, "weight": h.weight,
                      "down": list(h.down), "reasons": list(h.reasons), "bgp_source": h.bgp_source or None,
                      "peer": h.peer or None}
                     for h in sorted(hosts.values(), key=lambda h: h.node)]
        unit_of = {v.name: v.unit for v in cfg.vips}
        egress = [{"rule": e.name, "vip": e.vip, "active_on": (owners.get(unit_of[e.vip]) or OwnerRecord(None)).node}
                  for e in cfg.egress]
        return {"endpoint": client.endpoint, "revision": revision, "hosts": host_rows, "vips": vips,
                "egress": egress, "dsr": dsr_status.rows(cfg.vips, hosts)}


def render(status: dict[str, Any]) -> str:
    lines = [f"etcd {status['endpoint']} revision {status['revision']}",
             f"{'HOST':<16} {'HEALTH':<10} {'WEIGHT':>6} {'BGP SOURCE':<15}  NOT A CANDIDATE FOR / WHY"]
    for h in status["hosts"]:
        why = "; ".join(h["reasons"])
        if h.get("drained"):
            why = f"all VIPs: drained (`vipd undrain` on it ends this); {why}"
        elif not h["healthy"]:
            why = f"all VIPs: {why or 'host checks failing'}"
        elif h["down"]:
            why = f"{', '.join(h['down'])}: {why}"
        lines.append(f"{h['node']:<16} {'drained' if h.get('drained') else 'healthy' if h['healthy'] else 'unhealthy':<10} {h['weight']:>6g} "
                     f"{h['bgp_source'] or '-':<15}  {why or '-'}")
    if not status["hosts"]:
        lines.append("(no host holds a lease)")
    lines += ["", f"{'VIP':<16} {'ADDRESS':<28} {'OWNER':<16} {'SUCCESSOR':<16} {'EPOCH':>8} {'LEASE':>18} "
                  f"{'TTL LEFT':>8}  PREFERRED"]
    for v in status["vips"]:
        ttl = "-" if v["lease_ttl_left"] is None else f"{v['lease_ttl_left']}s"
        lines.append(f"{v['vip']:<16} {v['address']:<28} {v['owner'] or '-':<16} {v.get('successor') or '-':<16} "
                     f"{v['epoch'] or '-':>8} {v['lease'] or '-':>18} {ttl:>8}  {v['preferred'] or '-'}")
    if status.get("egress"):
        lines += ["", f"{'EGRESS RULE':<16} {'VIP':<16} ACTIVE ON"]
        lines += [f"{e['rule']:<16} {e['vip']:<16} {e['active_on'] or '- (nobody owns the VIP)'}"
                  for e in status["egress"]]
    lines += dsr_status.render(status.get("dsr", []))
    return "\n".join(lines)

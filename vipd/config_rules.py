"""Cross-key rules of a parsed config: what no single key can check by itself. Host-independent
(see vipd.config_host for the rules that read this host). Each raises ConfigError(key, reason)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vipd.configlib import check_unicast
from vipd.errors import ConfigError

if TYPE_CHECKING:
    from vipd.config import Config, EtcdConfig, TimingConfig


def check_rules(cfg: "Config") -> None:
    check_etcd_tls(cfg.etcd)
    check_request_timeout(cfg.etcd, cfg.timing)
    check_bgp_addresses(cfg)
    check_egress_prefixes(cfg)


def check_etcd_tls(etcd: "EtcdConfig") -> None:
    """One scheme for all endpoints; TLS files only with https (they would be silently ignored)."""
    schemes = {ep.split(":", 1)[0] for ep in etcd.endpoints}
    if len(schemes) > 1:
        raise ConfigError("etcd.endpoints", "mixes http:// and https:// endpoints: use one scheme for all members")
    if schemes == {"http"}:
        for k in ("ca_file", "cert_file", "key_file"):
            if getattr(etcd, k) is not None:
                raise ConfigError(f"etcd.{k}", "applies to https:// endpoints only, and every endpoint is http://")


def request_budget(etcd: "EtcdConfig", timing: "TimingConfig") -> float:
    """Seconds one etcd call may take and still leave the lease provable: a keepalive sent one
    interval after the last acknowledged one must be answered before the fence deadline
    (lease_ttl - fence_margin after the last acknowledged keepalive was sent)."""
    return etcd.lease_ttl - timing.fence_margin - etcd.lease_ttl / timing.keepalives_per_ttl


def check_request_timeout(etcd: "EtcdConfig", timing: "TimingConfig") -> None:
    """A call tries every endpoint in turn, each for up to request_timeout: all of them must fit in
    request_budget, or a dead first member makes the owner fence itself although another answers."""
    worst = etcd.request_timeout * len(etcd.endpoints)
    budget = request_budget(etcd, timing)
    if worst > budget:
        raise ConfigError("etcd.request_timeout",
                          f"{etcd.request_timeout:g} s x {len(etcd.endpoints)} endpoint(s) = {worst:g} s does not fit "
                          f"in lease_ttl - timing.fence_margin - keepalive interval = {etcd.lease_ttl:g} - "
                          f"{timing.fence_margin:g} - {etcd.lease_ttl / timing.keepalives_per_ttl:g} = "
                          f"{budget:g} s: lower it or raise etcd.lease_ttl")


def check_bgp_addresses(cfg: "Config") -> None:
    """The BGP source is the host's own address: never a VIP, never inside a routed VIP prefix; a
    source pool overlaps no VIP subnet; a peer is none of these."""
    bgp = cfg.bgp
    if bgp.source is not None:
        check_unicast("bgp.source", bgp.source, "a BGP source address")
    if bgp.source_pool is not None:
        pool = bgp.source_pool
        if pool.prefixlen == 0:
            raise ConfigError("bgp.source_pool", f"{pool}: a /0 pool would hand out every address")
        check_unicast("bgp.source_pool", pool.network_address if pool.prefixlen == 32 else pool[1],
                      "a BGP source pool")
    for i, v in enumerate(cfg.vips):
        if v.version != 4:
            continue
        if bgp.source is not None and (bgp.source == v.ip or (v.on_loopback and bgp.source in v.address.network)):
            raise ConfigError("bgp.source", f"{bgp.source} is also vip[{i}] ({v.address}): the source address must "
                                            "stay on this host whatever the VIP does")
        if bgp.source_pool is not None and bgp.source_pool.overlaps(v.address.network):
            raise ConfigError("bgp.source_pool", f"{bgp.source_pool} overlaps vip[{i}]'s subnet {v.address.network}")
    seen: set[object] = set()
    for j, peer in enumerate(bgp.peers):
        key = f"bgp.peers[{j}]"
        check_unicast(key, peer, "a BGP peer")
        if peer in seen:
            raise ConfigError(key, f"{peer} is listed twice")
        seen.add(peer)
        if peer == bgp.source or (bgp.source_pool is not None and peer in bgp.source_pool):
            raise ConfigError(key, f"{peer} is this host's own BGP source address (or in its pool)")
        for i, v in enumerate(cfg.vips):
            if v.ip == peer:
                raise ConfigError(key, f"{peer} is vip[{i}]'s address")


def check_egress_prefixes(cfg: "Config") -> None:
    """A /0 in an egress match is 'any': say so with an empty list (explicit, and one rule fewer)."""
    for i, r in enumerate(cfg.egress):
        for key, nets in (("destinations", r.destinations), ("sources", r.sources)):
            for j, n in enumerate(nets):
                if n.prefixlen == 0:
                    raise ConfigError(f"egress[{i}].{key}[{j}]", f"{n} matches everything: leave {key} empty "
                                                                 "for any address")

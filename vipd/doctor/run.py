"""`vipd doctor`: run every check against this host and the config; findings in a stable order.

Nothing on the host changes: the probes are ARP requests / neighbour solicitations, and the two etcd
test leases are revoked at once (they carry no key).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import trio

from vipd.config import Config
from vipd.dataplane.netlink import Netlink
from vipd.doctor import checks_bgp, checks_host, checks_l2, checks_sysctl
from vipd.doctor.checks_etcd import EtcdFacts, etcd_findings
from vipd.doctor.findings import Finding
from vipd.errors import DataplaneError


async def host_networks(nl: Netlink, cfg: Config) -> dict[str, list[ipaddress.IPv4Network]]:
    """Interface -> subnets of the host's own IPv4 addresses (VIPs excluded), every interface but lo."""
    vips = {v.ip for v in cfg.vips}

    def dump(ipr: Any) -> list[tuple[str, str, int]]:
        names = {m["index"]: m.get("IFLA_IFNAME") for m in ipr.link("dump")}
        return [(names.get(m["index"], "?"), m.get("IFA_ADDRESS"), m["prefixlen"])
                for m in ipr.addr("dump", family=socket.AF_INET)]

    out: dict[str, list[ipaddress.IPv4Network]] = {}
    for ifname, addr, plen in await nl.call_checked("list addresses", dump, DataplaneError):
        if ifname != "lo" and ipaddress.IPv4Address(addr) not in vips:
            out.setdefault(ifname, []).append(ipaddress.IPv4Network(f"{addr}/{plen}", strict=False))
    return out


async def diagnose(cfg: Config, nl: Netlink, *, probe_wait: float = 0.3) -> list[Finding]:
    """Every finding for ``cfg`` on the host behind ``nl``."""
    etcd: list[Finding] = []
    facts = EtcdFacts()
    proxy: dict[str, Finding] = {}
    clocks: list[Finding] = []

    async def run_etcd() -> None:
        nonlocal facts
        found, facts = await etcd_findings(cfg)
        etcd.extend(found)

    async def run_proxy() -> None:
        proxy.update(await checks_l2.proxy_arp_findings(nl, cfg, wait=probe_wait))

    async def run_clocks() -> None:
        clocks.extend(await checks_host.clocks())

    async with trio.open_nursery() as nursery:  # the slow ones (probes, etcd, timers) at once
        nursery.start_soon(run_etcd)
        nursery.start_soon(run_proxy)
        nursery.start_soon(run_clocks)
    answered = await checks_l2.vip_answered_findings(nl, cfg, proxy, facts.owners)
    nets = await host_networks(nl, cfg)
    findings: list[Finding] = []
    findings += checks_host.capabilities()
    findings += list(proxy.values()) + answered
    findings += checks_sysctl.promote_secondaries(cfg, nets)
    findings += checks_sysctl.rp_filter(cfg, sorted(nets))
    findings += checks_sysctl.multipath_hash(cfg)
    findings += etcd
    findings += clocks
    findings += checks_bgp.bgp_findings(cfg)
    findings += await checks_host.nftables(nl, cfg)
    return findings


async def doctor(cfg: Config, netns: str | None = None) -> list[Finding]:
    async with Netlink(netns) as nl:
        return await diagnose(cfg, nl)

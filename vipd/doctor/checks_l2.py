"""L2 checks: is the segment a proxy-ARP (cloud) segment, and does another machine answer for a VIP?

:func:`l2_blockers` is what the daemon calls before its first claim on each interface: it returns the
interfaces where L2 mode cannot work, with the finding to log, count and show in `vipd status`.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, Optional, Protocol

import trio

from vipd import log
from vipd.config import Config, VipSpec
from vipd.dataplane.conflict import arp_who_has, ipv6_dad
from vipd.dataplane.netlink import Netlink
from vipd.dataplane.proxyarp import (PROXY_ARP_EXPLANATION, PROXY_ARP_FIX, ProxyArpVerdict, detect_proxy_arp,
                                     segment_facts)
from vipd.doctor.findings import Finding, Severity, info, ok
from vipd.errors import DataplaneError

PROXY_CHECK = "l2.proxy_arp"
VIP_CHECK = "l2.vip_answered"


def l2_vips(cfg: Config) -> dict[str, list[VipSpec]]:
    """NIC VIPs (announced with GARP/NA) by interface, in config order."""
    out: dict[str, list[VipSpec]] = {}
    for v in cfg.vips:
        if not v.on_loopback:
            out.setdefault(v.interface, []).append(v)
    return out


async def _subnet_for(nl: Netlink, ifname: str, vips: list[VipSpec]) -> Optional[ipaddress.IPv4Network]:
    """The subnet to test: the widest IPv4 VIP subnet on the interface, else the host's own subnet
    there (a /32 VIP on a NIC lives in the host's subnet)."""
    nets = sorted({v.address.network for v in vips if v.version == 4}, key=lambda n: n.prefixlen)
    if nets and nets[0].prefixlen < 31:
        return nets[0]  # type: ignore[return-value]
    facts = await segment_facts(nl, ifname)
    own = sorted((a.network for a in facts.addresses if a.network.prefixlen < 31), key=lambda n: n.prefixlen)
    return own[0] if own else None


def proxy_finding(ifname: str, verdict: Optional[ProxyArpVerdict], error: Optional[str] = None) -> Finding:
    """The finding for one interface's proxy-ARP test (shared by doctor and the daemon)."""
    if error is not None:
        return Finding(PROXY_CHECK, Severity.WARNING, ifname, f"could not test for proxy ARP: {error}",
                       "vipd run needs CAP_NET_RAW and the interface up to probe; it will test again "
                       "before its first claim", "run vipd doctor as root (or with CAP_NET_RAW) with the link up")
    assert verdict is not None
    data = verdict.as_dict()
    if not verdict.testable:
        return info(PROXY_CHECK, ifname, f"proxy ARP not tested: {verdict.reason}",
                    "with no free address in the subnet there is nothing to ask for", **data)
    if verdict.proxy_arp:
        return Finding(PROXY_CHECK, Severity.ERROR, ifname,
                       f"every ARP request is answered by {verdict.mac}: L2 VIPs cannot work here",
                       f"{PROXY_ARP_EXPLANATION} ({verdict.reason})", PROXY_ARP_FIX, data)
    return ok(PROXY_CHECK, ifname, f"no proxy ARP on {verdict.subnet} ({verdict.reason})", **data)


async def proxy_arp_findings(nl: Netlink, cfg: Config, *, wait: float = 0.3) -> dict[str, Finding]:
    """One proxy-ARP finding per interface carrying IPv4 NIC VIPs, all interfaces probed at once."""
    by_if = {ifname: vips for ifname, vips in l2_vips(cfg).items() if any(v.version == 4 for v in vips)}
    avoid = [v.ip for v in cfg.vips if v.version == 4]
    found: dict[str, Finding] = {}

    async def one(ifname: str, vips: list[VipSpec]) -> None:
        try:
            subnet = await _subnet_for(nl, ifname, vips)
            if subnet is None:
                found[ifname] = info(PROXY_CHECK, ifname, "proxy ARP not tested: no IPv4 subnet wider than /31 here",
                                     "a /32 host address and /32 VIPs leave nothing to ask for")
                return
            verdict = await detect_proxy_arp(nl, ifname, subnet, avoid=avoid,  # type: ignore[arg-type]
                                             wait=wait)
        except DataplaneError as e:
            found[ifname] = proxy_finding(ifname, None, str(e))
            return
        found[ifname] = proxy_finding(ifname, verdict)

    async with trio.open_nursery() as nursery:
        for ifname, vips in by_if.items():
            nursery.start_soon(one, ifname, vips)
    return {k: found[k] for k in by_if}


async def l2_blockers(nl: Netlink, cfg: Config, *, wait: float = 0.3) -> dict[str, Finding]:
    """Interfaces on which vipd must not claim L2 VIPs, with the reason (a blocking Finding).

    For the daemon: call once before the first claim on each interface (it takes about
    3 x ``wait`` s when nobody proxies, less when someone does); claim nothing on an interface in the
    result, log the finding's summary, detail and fix, and set the metric
    (``Metrics.set_l2_blocked``). Interfaces that could not be tested are not blockers."""
    findings = await proxy_arp_findings(nl, cfg, wait=wait)
    return {ifname: f for ifname, f in findings.items() if f.blocks}


class L2Metrics(Protocol):
    def set_l2_blocked(self, interface: str, blocked: bool) -> None: ...


def report_l2_blockers(cfg: Config, blocked: dict[str, Finding], metrics: L2Metrics) -> None:
    """What the daemon does with :func:`l2_blockers`' answer: one error line per refused interface
    (``event=l2_blocked interface= mac= reason= fix=``) and the metric for every L2 interface."""
    for ifname in l2_vips(cfg):
        f = blocked.get(ifname)
        metrics.set_l2_blocked(ifname, f is not None)
        if f is not None:
            log.error("l2_blocked", interface=ifname, mac=f.data.get("mac"), vips=",".join(
                v.name for v in l2_vips(cfg)[ifname]), reason=f.detail, fix=f.fix)


async def vip_answered_findings(nl: Netlink, cfg: Config, proxy: dict[str, Finding],
                                owners: Optional[dict[str, str]] = None, *, wait: float = 0.2) -> list[Finding]:
    """For each NIC VIP: does another machine answer for it now? (On a proxy-ARP segment the proxy
    answers for everything: that is folded into the proxy finding, not reported twice.) ``owners``:
    unit -> owning node per etcd; a VIP another vipd owns right now is expected to answer."""
    known: dict[str, str] = owners or {}
    out: list[Finding] = []

    async def one(v: VipSpec) -> None:
        try:
            if isinstance(v.address, ipaddress.IPv4Interface):
                facts = await segment_facts(nl, v.interface)
                mine = [x.address.ip for x in cfg.vips if isinstance(x.address, ipaddress.IPv4Interface)]
                sender = facts.sender_for(v.address.network, mine)
                mac = await arp_who_has(nl, v.interface, facts.mac, v.address.ip, sender or "0.0.0.0", probes=2,
                                        wait=wait)
            else:
                mac = await ipv6_dad(nl, v.interface, None, v.address.ip, probes=1, wait=2 * wait)
        except DataplaneError as e:
            out.append(Finding(VIP_CHECK, Severity.WARNING, v.name, f"could not probe {v.ip}: {e}"))
            return
        proxy_mac = proxy.get(v.interface, Finding("", Severity.OK, "", "")).data.get("mac")
        if mac is None:
            out.append(ok(VIP_CHECK, v.name, f"nobody else answers for {v.ip} on {v.interface}"))
        elif known.get(v.unit) not in (None, cfg.node):
            out.append(info(VIP_CHECK, v.name, f"{v.ip} is answered by {mac}: {known[v.unit]} owns it (etcd)",
                            mac=mac, owner=known[v.unit]))
        elif mac == proxy_mac:
            out.append(info(VIP_CHECK, v.name, f"{v.ip} is answered by the proxy {mac}",
                            "see l2.proxy_arp: the network answers for every address", mac=mac))
        else:
            out.append(Finding(VIP_CHECK, Severity.ERROR, v.name, f"{v.ip} is already answered by {mac}",
                               "another machine holds this address (or a vipd on another host owns it now: "
                               "then this is expected; check `vipd status`)",
                               "free the address on that machine, or give the VIP an unused address", {"mac": mac}))

    async with trio.open_nursery() as nursery:
        for v in cfg.vips:
            if not v.on_loopback:
                nursery.start_soon(one, v)
    order = {v.name: i for i, v in enumerate(cfg.vips)}
    return sorted(out, key=lambda f: order.get(f.subject, 0))


def blocked_interfaces(findings: Iterable[Finding]) -> set[str]:
    return {f.subject for f in findings if f.check == PROXY_CHECK and f.blocks}

"""Kernel settings the configured modes depend on, read from /proc/sys (this process's netns).

* promote_secondaries, for IPv4 NIC VIPs that would be the primary address of their subnet (the
  host has no address of its own there): without it, removing that VIP deletes every other address
  of the subnet with it, other VIPs included.
* rp_filter, for routed VIPs: strict reverse-path filtering (1) drops traffic that arrives on a NIC
  other than the one the reply would leave by, which ECMP and anycast make normal; use loose (2).
* fib_multipath_hash_policy, for anycast VIPs (ECMP): 0 hashes on addresses only, so all flows from
  one client take one path; 1 adds ports (per-flow). It matters on whatever routes with ECMP: the
  router (see conf/router-bird2.conf), and this host when it routes.
* arp_ignore / arp_announce for DSR backends: not yet (DSR has not landed).

The effective value of a per-interface IPv4 setting is the kernel's: promote_secondaries and
rp_filter use max(all, interface) (rp_filter) and all OR interface (promote_secondaries).
"""

from __future__ import annotations

import ipaddress
import os
from typing import Callable, Optional

from vipd.config import Config
from vipd.doctor.findings import Finding, Severity, ok

PROC_SYS = "/proc/sys"
Reader = Callable[[str], Optional[int]]


def read_sysctl(name: str, root: str = PROC_SYS) -> Optional[int]:
    """net.ipv4.conf.eth0.rp_filter -> its integer value, None when absent or unreadable."""
    try:
        with open(os.path.join(root, *name.split("."))) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _conf(read: Reader, ifname: str, key: str) -> tuple[Optional[int], Optional[int]]:
    return read(f"net.ipv4.conf.all.{key}"), read(f"net.ipv4.conf.{ifname}.{key}")


def promote_secondaries(cfg: Config, host_nets: dict[str, list[ipaddress.IPv4Network]],
                        read: Reader = read_sysctl) -> list[Finding]:
    """``host_nets``: interface -> IPv4 subnets of the host's own (non-VIP) addresses on it."""
    out: list[Finding] = []
    seen: set[tuple[str, ipaddress.IPv4Network]] = set()
    for v in cfg.vips:
        if v.on_loopback or not isinstance(v.address, ipaddress.IPv4Interface):
            continue
        net = v.address.network
        key = (v.interface, net)
        if key in seen:
            continue
        seen.add(key)
        if net in host_nets.get(v.interface, []):
            continue  # the host's own address is the primary: VIPs are secondaries
        all_, dev = _conf(read, v.interface, "promote_secondaries")
        name = f"net.ipv4.conf.{v.interface}.promote_secondaries"
        sharing = [x.name for x in cfg.vips if x.interface == v.interface and x.version == 4
                   and x.address.network == net]
        if (all_ or 0) or (dev or 0):
            out.append(ok("sysctl.promote_secondaries", v.interface,
                          f"{name} on: VIPs in {net} ({', '.join(sharing)}) are promoted, not deleted"))
            continue
        out.append(Finding(
            "sysctl.promote_secondaries", Severity.WARNING, v.interface,
            f"{net} has no address of this host on {v.interface} and promote_secondaries is off",
            f"the first VIP of {net} added ({', '.join(sharing)}) becomes the subnet's primary address; "
            f"removing it (release, fence) makes the kernel delete every other address of {net} on "
            f"{v.interface} with it",
            f"sysctl -w {name}=1 (and net.ipv4.conf.all.promote_secondaries=1) in /etc/sysctl.d/, "
            f"or give the host an address of its own in {net}",
            {"sysctl": name, "value": dev, "all": all_, "subnet": str(net)}))
    return out


def rp_filter(cfg: Config, interfaces: list[str], read: Reader = read_sysctl) -> list[Finding]:
    """Routed VIPs only: strict rp_filter on the host's NICs."""
    if not any(v.on_loopback for v in cfg.vips):
        return []
    out: list[Finding] = []
    for ifname in interfaces:
        all_, dev = _conf(read, ifname, "rp_filter")
        eff = max(all_ or 0, dev or 0)
        name = f"net.ipv4.conf.{ifname}.rp_filter"
        if eff == 1:
            which = "net.ipv4.conf.all.rp_filter" if (all_ or 0) == 1 else name
            out.append(Finding(
                "sysctl.rp_filter", Severity.WARNING, ifname, f"strict reverse-path filtering ({which}=1)",
                "routed VIPs are reached over whichever path the routers pick (ECMP, anycast, a second "
                "uplink); strict rp_filter drops packets that arrive on another NIC than the reply would use",
                f"sysctl -w {name}=2 and net.ipv4.conf.all.rp_filter=2 (loose) in /etc/sysctl.d/",
                {"sysctl": name, "value": dev, "all": all_, "effective": eff}))
        else:
            out.append(ok("sysctl.rp_filter", ifname, f"rp_filter {eff} (not strict)", effective=eff))
    return out


def multipath_hash(cfg: Config, read: Reader = read_sysctl) -> list[Finding]:
    """Anycast VIPs only (ECMP at the router): per-flow hashing."""
    if not any(v.mode == "anycast" for v in cfg.vips):
        return []
    value = read("net.ipv4.fib_multipath_hash_policy")
    if value in (1, 3):
        return [ok("sysctl.multipath_hash", "host", f"fib_multipath_hash_policy {value} (L4, per flow)")]
    return [Finding(
        "sysctl.multipath_hash", Severity.WARNING, "host",
        f"net.ipv4.fib_multipath_hash_policy = {value} (addresses only)",
        "anycast VIPs are spread by ECMP; policy 0 hashes on source and destination address only, so every "
        "flow from one client lands on one host. It must be 1 on the router that holds the multipath "
        "route (and here, if this host routes to the anycast VIPs itself)",
        "sysctl -w net.ipv4.fib_multipath_hash_policy=1 on the routers (see conf/router-bird2.conf) and here",
        {"sysctl": "net.ipv4.fib_multipath_hash_policy", "value": value})]

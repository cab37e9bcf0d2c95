"""A gateway on the lab segment, optionally answering every ARP request itself like a cloud VPC.

    {prefix}g   the gateway (key "g")   .1   MAC 02:76:74:00:00:9e   default route of every host

With ``proxy_arp=True`` the gateway's kernel answers, with its own MAC, any ARP request for an
address of the subnet that is not its own (``proxy_arp`` + ``proxy_arp_pvlan``: answer for addresses
reached through the very interface the request came in on; ``ip_forward`` so that such routes
resolve; ``proxy_delay 0``: at once, as a cloud's virtual switch does instead of Linux's random delay
of up to 0.8 s). The hosts still answer for their own addresses, so each address is answered twice,
once by its holder and once by the gateway, and addresses that nobody holds once, by the gateway:
the pattern of an AWS VPC (ee:ff:ff:ff:ff:ff), where gratuitous ARP changes nothing.
"""

from __future__ import annotations

from vipd.lab import netns
from vipd.lab.topology import Host, Lab

GATEWAY_MAC_LOW = 0x9E


def add_gateway(lab: Lab, *, proxy_arp: bool, offset: int = 1) -> Host:
    """Attach the gateway and make it every host's default route (and the client's)."""
    gw = lab.add_node("gateway", "g", offset, GATEWAY_MAC_LOW)
    settings = {"net.ipv4.ip_forward": 1}
    if proxy_arp:
        settings.update({f"net.ipv4.conf.{gw.ifname}.proxy_arp": 1, f"net.ipv4.conf.{gw.ifname}.proxy_arp_pvlan": 1,
                         f"net.ipv4.neigh.{gw.ifname}.proxy_delay": 0})
    netns.sysctl(gw.ns, settings)
    for h in [*lab.hosts, lab.client]:
        lab.ip(h, "route", "replace", "default", "via", str(gw.ip.ip), "dev", h.ifname)
    return gw


def set_proxy_arp(lab: Lab, gw: Host, on: bool) -> None:
    """Turn the gateway's answering of every ARP request on or off."""
    netns.sysctl(gw.ns, {f"net.ipv4.conf.{gw.ifname}.proxy_arp": int(on),
                         f"net.ipv4.conf.{gw.ifname}.proxy_arp_pvlan": int(on),
                         f"net.ipv4.neigh.{gw.ifname}.proxy_delay": 0})

"""The few fixed Ethernet frames vipd sends, built with struct (no scapy in the daemon: its import
alone costs ~22 MiB RSS and ~0.2 s; the tests decode these frames with scapy, independently).

* gratuitous ARP request and reply (RFC 826 / 5227 announcement), ARP probe (RFC 5227);
* unsolicited neighbour advertisement and DAD neighbour solicitation (RFC 4861 / 4862), with the
  ICMPv6 checksum over the IPv6 pseudo-header computed here.

Every function takes the sender MAC as "aa:bb:cc:dd:ee:ff" and an ipaddress object.
"""

from __future__ import annotations

import ipaddress
import struct

BROADCAST = "ff:ff:ff:ff:ff:ff"
ZERO_MAC = "00:00:00:00:00:00"
ALL_NODES = "ff02::1"
ALL_NODES_MAC = "33:33:00:00:00:01"
MIN_FRAME = 60  # Ethernet minimum without FCS; padded here so no driver has to
ARP_REQUEST = 1
ARP_REPLY = 2
ETH_P_ARP = 0x0806
ETH_P_IPV4 = 0x0800
ETH_P_IPV6 = 0x86DD
ICMPV6 = 58
ND_NS, ND_NA = 135, 136
_NA_OVERRIDE = 0x20000000  # R=0 S=0 O=1
_OPT_TARGET_LLADDR = 2
_ALL_NODES = ipaddress.IPv6Address(ALL_NODES).packed
_ANY6 = bytes(16)


def mac_bytes(mac: str) -> bytes:
    raw = bytes.fromhex(mac.replace(":", "").replace("-", ""))
    if len(raw) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return raw


def _ether(dst: bytes, src: bytes, ethertype: int) -> bytes:
    return dst + src + struct.pack("!H", ethertype)


def _pad(frame: bytes) -> bytes:
    return frame.ljust(MIN_FRAME, b"\x00")


def _v4(ip: object) -> ipaddress.IPv4Address:
    if not isinstance(ip, ipaddress.IPv4Address):
        raise TypeError(f"ARP needs an IPv4Address, got {ip!r}")
    return ip


def _v6(ip: object) -> ipaddress.IPv6Address:
    if not isinstance(ip, ipaddress.IPv6Address):
        raise TypeError(f"NA/NS needs an IPv6Address, got {ip!r}")
    return ip


def _arp(src_mac: bytes, op: int, spa: bytes, tha: bytes, tpa: bytes) -> bytes:
    body = struct.pack("!HHBBH", 1, ETH_P_IPV4, 6, 4, op) + src_mac + spa + tha + tpa
    return _pad(_ether(b"\xff" * 6, src_mac, ETH_P_ARP) + body)


def garp_request(mac: str, ip: ipaddress.IPv4Address) -> bytes:
    """Broadcast ARP request asking for ``ip`` from ``ip`` (sender = target), target MAC zero."""
    src, addr = mac_bytes(mac), _v4(ip).packed
    return _arp(src, ARP_REQUEST, addr, bytes(6), addr)


def garp_reply(mac: str, ip: ipaddress.IPv4Address) -> bytes:
    """Broadcast ARP reply for ``ip``; target MAC = sender MAC, the only form Linux accepts."""
    src, addr = mac_bytes(mac), _v4(ip).packed
    return _arp(src, ARP_REPLY, addr, src, addr)


def arp_probe(mac: str, ip: ipaddress.IPv4Address) -> bytes:
    """RFC 5227 probe: broadcast ARP request, sender IP 0.0.0.0, target MAC zero, target IP = ip."""
    return _arp(mac_bytes(mac), ARP_REQUEST, bytes(4), bytes(6), _v4(ip).packed)


def arp_request(mac: str, sender: ipaddress.IPv4Address, target: ipaddress.IPv4Address) -> bytes:
    """An ordinary broadcast ARP request "who has ``target``, tell ``sender``" (what arping sends)."""
    return _arp(mac_bytes(mac), ARP_REQUEST, _v4(sender).packed, bytes(6), _v4(target).packed)


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _icmpv6(src: bytes, dst: bytes, icmp_type: int, rest: bytes) -> bytes:
    """IPv6 header (hop limit 255) + ICMPv6 message (code 0) with its checksum."""
    length = 4 + len(rest)
    pseudo = src + dst + struct.pack("!I3xB", length, ICMPV6)
    csum = checksum(pseudo + struct.pack("!BBH", icmp_type, 0, 0) + rest)
    ip6 = struct.pack("!IHBB", 6 << 28, length, ICMPV6, 255) + src + dst
    return ip6 + struct.pack("!BBH", icmp_type, 0, csum) + rest


def multicast_mac(group: ipaddress.IPv6Address) -> bytes:
    return b"\x33\x33" + group.packed[-4:]


def unsolicited_na(mac: str, ip: ipaddress.IPv6Address) -> bytes:
    """NA from ``ip`` to all nodes: hop limit 255, R=0 S=0 O=1, target link-layer address option."""
    src, addr = mac_bytes(mac), _v6(ip).packed
    rest = struct.pack("!I", _NA_OVERRIDE) + addr + struct.pack("!BB", _OPT_TARGET_LLADDR, 1) + src
    return _ether(mac_bytes(ALL_NODES_MAC), src, ETH_P_IPV6) + _icmpv6(addr, _ALL_NODES, ND_NA, rest)


def solicited_node(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv6Address, str]:
    """The solicited-node multicast group of ``ip`` and its Ethernet address."""
    group = ipaddress.IPv6Address(b"\xff\x02" + b"\x00" * 9 + b"\x01\xff" + ip.packed[-3:])
    return group, ":".join(f"{b:02x}" for b in multicast_mac(group))


def dad_ns(mac: str, ip: ipaddress.IPv6Address) -> bytes:
    """RFC 4862 DAD: NS for ``ip`` from :: to its solicited-node group, hop limit 255, no source
    link-layer option (forbidden with an unspecified source)."""
    group, _ = solicited_node(_v6(ip))
    rest = bytes(4) + ip.packed
    return _ether(multicast_mac(group), mac_bytes(mac), ETH_P_IPV6) + _icmpv6(_ANY6, group.packed, ND_NS, rest)

"""The announcement frames, byte for byte (no root, no network)."""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

import pytest
from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6NDOptDstLLAddr, IPv6
from scapy.layers.l2 import ARP, Ether

from vipd.config import VipSpec
from vipd.dataplane.announce import Announcer, frames_for, garp_reply, garp_request, unsolicited_na

MAC = "02:56:00:0a:0b:0c"
MAC_BYTES = bytes.fromhex("0256000a0b0c")
V4 = ipaddress.IPv4Address("192.0.2.10")
V6 = ipaddress.IPv6Address("2001:db8::10")


def arp_bytes(op: int, target_mac: bytes) -> bytes:
    """The expected frame, assembled by hand: Ethernet + ARP (RFC 826) + zero padding to 60."""
    ether = b"\xff" * 6 + MAC_BYTES + b"\x08\x06"
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + MAC_BYTES + V4.packed + target_mac + V4.packed
    return (ether + arp).ljust(60, b"\x00")


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def test_garp_request_bytes() -> None:
    frame = garp_request(MAC, V4)
    assert frame == arp_bytes(1, b"\x00" * 6)
    p = Ether(frame)
    assert (p.dst, p.src, p.type) == ("ff:ff:ff:ff:ff:ff", MAC, 0x0806)
    a = p[ARP]
    assert (a.op, a.hwsrc, a.hwdst, a.psrc, a.pdst) == (1, MAC, "00:00:00:00:00:00", str(V4), str(V4))


def test_garp_reply_targets_its_own_mac() -> None:
    frame = garp_reply(MAC, V4)
    assert frame == arp_bytes(2, MAC_BYTES)
    p = Ether(frame)
    assert p.dst == "ff:ff:ff:ff:ff:ff" and p.src == MAC
    a = p[ARP]
    assert (a.op, a.hwsrc, a.hwdst, a.psrc, a.pdst) == (2, MAC, MAC, str(V4), str(V4))


def test_unsolicited_na_fields() -> None:
    frame = unsolicited_na(MAC, V6)
    assert len(frame) == 14 + 40 + 24 + 8
    assert frame[:14] == bytes.fromhex("333300000001") + MAC_BYTES + b"\x86\xdd"
    p = Ether(frame)
    ip6 = p[IPv6]
    assert (ip6.src, ip6.dst, ip6.hlim, ip6.nh, ip6.plen) == (str(V6), "ff02::1", 255, 58, 32)
    na = p[ICMPv6ND_NA]
    assert (na.type, na.code, na.R, na.S, na.O, na.tgt) == (136, 0, 0, 0, 1, str(V6))
    opt = p[ICMPv6NDOptDstLLAddr]
    assert (opt.type, opt.len, opt.lladdr) == (2, 1, MAC)  # target link-layer address, 8 bytes


def test_unsolicited_na_raw_icmpv6() -> None:
    frame = unsolicited_na(MAC, V6)
    icmp = frame[54:]
    assert icmp[0:2] == b"\x88\x00"  # type 136, code 0
    assert icmp[4:8] == b"\x20\x00\x00\x00"  # R=0 S=0 O=1, reserved
    assert icmp[8:24] == V6.packed
    assert icmp[24:32] == b"\x02\x01" + MAC_BYTES
    pseudo = V6.packed + ipaddress.IPv6Address("ff02::1").packed + struct.pack("!I3xB", len(icmp), 58)
    assert checksum(pseudo + icmp) == 0  # the checksum scapy filled in is right


def vip(address: str, interface: str = "eth0", **kw: Any) -> VipSpec:
    return VipSpec(name="v", address=ipaddress.ip_interface(address), interface=interface, **kw)


def test_frames_for() -> None:
    assert frames_for(vip("192.0.2.10/24"), MAC) == [garp_request(MAC, V4)]
    assert frames_for(vip("192.0.2.10/24", announce_reply=True), MAC) == [garp_request(MAC, V4),
                                                                         garp_reply(MAC, V4)]
    assert frames_for(vip("2001:db8::10/64", announce_reply=True), MAC) == [unsolicited_na(MAC, V6)]


def test_wrong_address_family_is_rejected() -> None:
    with pytest.raises(TypeError):
        garp_request(MAC, V6)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        unsolicited_na(MAC, V4)  # type: ignore[arg-type]


async def test_nothing_is_sent_for_loopback_or_zero_count() -> None:
    # neither case may touch the kernel: no Netlink is needed
    ann = Announcer(nl=None)  # type: ignore[arg-type]
    assert await ann.announce(vip("192.0.2.10/32", interface="lo")) == 0
    assert await ann.announce(vip("192.0.2.10/24", announce_count=0)) == 0

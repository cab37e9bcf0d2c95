"""The frames vipd sends (vipd.dataplane.frames: struct, no scapy), byte for byte and decoded
field by field by scapy, the independent decoder (no root, no network)."""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

import pytest
from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6NDOptDstLLAddr, IPv6
from scapy.layers.l2 import ARP, Ether

from vipd.config import VipSpec
from vipd.dataplane.announce import Announcer, frames_for
from vipd.dataplane.frames import arp_probe, dad_ns, garp_reply, garp_request, solicited_node, unsolicited_na

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


# --- the same frames built by scapy, and scapy's own checksums ------------------------------------

V4S = [ipaddress.IPv4Address(a) for a in ("192.0.2.10", "10.0.0.1", "255.255.255.254", "0.0.0.1")]
V6S = [ipaddress.IPv6Address(a) for a in ("2001:db8::10", "fd00:214::3e7", "fe80::1", "::1",
                                         "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe")]
MACS = [MAC, "ff:ff:ff:ff:ff:fe", "00:00:00:00:00:01"]


def scapy_arp(mac: str, op: int, psrc: str, hwdst: str, pdst: str) -> bytes:
    return bytes(Ether(src=mac, dst="ff:ff:ff:ff:ff:ff")
                 / ARP(op=op, hwsrc=mac, psrc=psrc, hwdst=hwdst, pdst=pdst)).ljust(60, b"\x00")


@pytest.mark.parametrize("mac", MACS)
@pytest.mark.parametrize("ip", V4S)
def test_arp_frames_equal_scapys(mac: str, ip: ipaddress.IPv4Address) -> None:
    assert garp_request(mac, ip) == scapy_arp(mac, 1, str(ip), "00:00:00:00:00:00", str(ip))
    assert garp_reply(mac, ip) == scapy_arp(mac, 2, str(ip), mac, str(ip))
    assert arp_probe(mac, ip) == scapy_arp(mac, 1, "0.0.0.0", "00:00:00:00:00:00", str(ip))
    a = Ether(arp_probe(mac, ip))[ARP]
    assert (a.op, a.hwsrc, a.psrc, a.hwdst, a.pdst) == (1, mac, "0.0.0.0", "00:00:00:00:00:00", str(ip))


@pytest.mark.parametrize("mac", MACS)
@pytest.mark.parametrize("ip", V6S)
def test_na_equals_scapys(mac: str, ip: ipaddress.IPv6Address) -> None:
    frame = unsolicited_na(mac, ip)
    built = bytes(Ether(src=mac, dst="33:33:00:00:00:01") / IPv6(src=str(ip), dst="ff02::1", hlim=255)
                  / ICMPv6ND_NA(R=0, S=0, O=1, tgt=str(ip)) / ICMPv6NDOptDstLLAddr(lladdr=mac))
    assert frame == built  # scapy computes the checksum itself: equal bytes = equal checksum
    p = Ether(frame)
    assert (p[IPv6].src, p[IPv6].dst, p[IPv6].hlim, p[IPv6].plen) == (str(ip), "ff02::1", 255, 32)
    assert (p[ICMPv6ND_NA].O, p[ICMPv6ND_NA].tgt, p[ICMPv6NDOptDstLLAddr].lladdr) == (1, str(ip), mac)


@pytest.mark.parametrize("mac", MACS)
@pytest.mark.parametrize("ip", V6S)
def test_dad_ns_equals_scapys(mac: str, ip: ipaddress.IPv6Address) -> None:
    group, group_mac = solicited_node(ip)
    assert group == ipaddress.IPv6Address("ff02::1:ff00:0") + (int(ip) & 0xFFFFFF)  # RFC 4291 2.7.1
    frame = dad_ns(mac, ip)
    built = bytes(Ether(src=mac, dst=group_mac) / IPv6(src="::", dst=str(group), hlim=255) / ICMPv6ND_NS(tgt=str(ip)))
    assert frame == built
    p = Ether(frame)
    assert p.dst == group_mac == "33:33:" + ":".join(f"{b:02x}" for b in group.packed[-4:])
    assert (p[IPv6].src, p[IPv6].dst, p[ICMPv6ND_NS].tgt, p[ICMPv6ND_NS].type) == ("::", str(group), str(ip), 135)
    pseudo = bytes(16) + group.packed + struct.pack("!I3xB", len(frame) - 54, 58)
    assert checksum(pseudo + frame[54:]) == 0


def test_daemon_modules_do_not_import_scapy() -> None:
    import subprocess
    import sys

    code = ("import sys, vipd.app, vipd.cleanup, vipd.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('scapy', 'vipd.lab')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

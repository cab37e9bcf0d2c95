"""Conflict detection against a real kernel: two namespaces, vth<tag>a (vipd's side) and
vth<tag>b (a foreign machine), joined by a veth pair. The foreign machine's own kernel answers ARP
probes and DAD for addresses it holds; it also sends gratuitous ARP / unsolicited NA as crafted
frames. Namespaces are deleted in the fixture's finalizer; traffic stays on the veth pair.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
import subprocess
from dataclasses import dataclass
from typing import Iterator

import pytest
import trio

from vipd.config import VipSpec
from vipd.dataplane.announce import Announcer, garp_request, unsolicited_na
from vipd.dataplane.conflict import (AddressConflict, Claim, ConflictProbeError,
                                     arp_probe, arp_probe_frame, check_free, dad_ns_frame, ipv6_dad, parse_arp,
                                     parse_nd, probe_vip, solicited_node)
from vipd.dataplane.duplicates import DuplicateResponderWatch
from vipd.dataplane.netlink import Netlink

VIP4 = ipaddress.IPv4Address("192.0.2.10")
VIP6 = ipaddress.IPv6Address("2001:db8::10")
FREE4 = ipaddress.IPv4Address("192.0.2.20")
FREE6 = ipaddress.IPv6Address("2001:db8::20")


def ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def mac_of(ns: str, ifname: str) -> str:
    out = subprocess.run(["ip", "-n", ns, "-br", "link", "show", ifname], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[2].lower()


@dataclass
class Pair:
    ours: str  # namespace where vipd probes
    foreign: str
    our_if: str
    foreign_if: str
    our_mac: str
    foreign_mac: str

    def foreign_holds(self, *addrs: str) -> None:
        for a in addrs:
            ip("-n", self.foreign, "addr", "add", a, "dev", self.foreign_if, *(["nodad"] if ":" in a else []))


@pytest.fixture
def pair() -> Iterator[Pair]:
    tag = "vth" + secrets.token_hex(2)
    ours, foreign = f"{tag}a", f"{tag}b"
    made: list[str] = []
    try:
        for ns in (ours, foreign):
            ip("netns", "add", ns)
            made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("link", "add", f"{tag}a0", "netns", ours, "type", "veth", "peer", "name", f"{tag}b0", "netns", foreign)
        ip("-n", ours, "addr", "add", "192.0.2.1/24", "dev", f"{tag}a0")
        ip("-n", ours, "addr", "add", "2001:db8::1/64", "dev", f"{tag}a0", "nodad")
        for ns, ifname in ((ours, f"{tag}a0"), (foreign, f"{tag}b0")):
            ip("-n", ns, "link", "set", ifname, "up")
        yield Pair(ours, foreign, f"{tag}a0", f"{tag}b0", mac_of(ours, f"{tag}a0"), mac_of(foreign, f"{tag}b0"))
    finally:
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


async def send_from(nl: Netlink, ifname: str, *frames: bytes) -> None:
    sock = await nl.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    with sock:
        await sock.bind((ifname, 0))
        for f in frames:
            await sock.send(f)


# ------------------------------------------------------------------------------- pure frames


def test_frames_parse_back() -> None:
    mac = "02:56:00:00:00:01"
    assert parse_arp(arp_probe_frame(mac, VIP4)) == Claim("probe", VIP4, mac)
    assert parse_arp(garp_request(mac, VIP4)) == Claim("arp", VIP4, mac)
    assert parse_nd(dad_ns_frame(mac, VIP6)) == Claim("dad", VIP6, mac)
    assert parse_nd(unsolicited_na(mac, VIP6)) == Claim("na", VIP6, mac)
    assert parse_arp(unsolicited_na(mac, VIP6)) is None and parse_nd(garp_request(mac, VIP4)) is None
    assert solicited_node(ipaddress.IPv6Address("2001:db8::1:2:3")) == (
        ipaddress.IPv6Address("ff02::1:ff02:3"), "33:33:ff:02:00:03")


# ------------------------------------------------------------------------------- probes


async def test_arp_probe_foreign_holder_and_nobody(pair: Pair) -> None:
    pair.foreign_holds(f"{VIP4}/24")
    async with Netlink(pair.ours) as nl:
        t0 = trio.current_time()
        assert await arp_probe(nl, pair.our_if, None, VIP4) == pair.foreign_mac
        assert trio.current_time() - t0 < 0.2  # the first probe's answer ends it
        t0 = trio.current_time()
        assert await arp_probe(nl, pair.our_if, pair.our_mac, FREE4, probes=2, wait=0.15) is None
        assert 0.3 <= trio.current_time() - t0 < 0.5
        # our own address is not a conflict (our kernel never sees our probe)
        assert await arp_probe(nl, pair.our_if, None, "192.0.2.1", probes=1, wait=0.1) is None


async def test_ipv6_dad_foreign_holder_and_nobody(pair: Pair) -> None:
    pair.foreign_holds(f"{VIP6}/64")
    async with Netlink(pair.ours) as nl:
        t0 = trio.current_time()
        assert await ipv6_dad(nl, pair.our_if, None, VIP6) == pair.foreign_mac
        assert trio.current_time() - t0 < 0.3
        t0 = trio.current_time()
        assert await ipv6_dad(nl, pair.our_if, None, FREE6, wait=0.3) is None
        assert 0.3 <= trio.current_time() - t0 < 0.5


async def test_check_free_raises_address_conflict(pair: Pair) -> None:
    pair.foreign_holds(f"{VIP4}/24", f"{VIP6}/64")
    v4 = VipSpec("api", ipaddress.ip_interface(f"{VIP4}/24"), pair.our_if)
    v6 = VipSpec("api6", ipaddress.ip_interface(f"{VIP6}/64"), pair.our_if)
    async with Netlink(pair.ours) as nl:
        for vip in (v4, v6):
            with pytest.raises(AddressConflict) as e:
                await check_free(nl, vip)
            assert (e.value.ip, e.value.mac) == (vip.ip, pair.foreign_mac)
            assert pair.foreign_mac in str(e.value)
        await check_free(nl, VipSpec("free", ipaddress.ip_interface(f"{FREE4}/24"), pair.our_if), wait=0.1)
        assert await probe_vip(nl, VipSpec("lo", ipaddress.ip_interface(f"{VIP4}/32"), "lo")) is None
        with pytest.raises(ConflictProbeError):
            await arp_probe(nl, "vthnosuch0", None, VIP4)


async def test_simultaneous_probe_is_a_conflict(pair: Pair) -> None:
    """Another machine probing for the same address at the same time (RFC 5227 2.1.1)."""
    async with Netlink(pair.ours) as ours, Netlink(pair.foreign) as foreign:
        async with trio.open_nursery() as nursery:
            result: list[str | None] = []

            async def probe() -> None:
                result.append(await arp_probe(ours, pair.our_if, None, FREE4, probes=1, wait=0.3))

            nursery.start_soon(probe)
            await trio.sleep(0.05)
            await send_from(foreign, pair.foreign_if, arp_probe_frame(pair.foreign_mac, FREE4))
        assert result == [pair.foreign_mac]


# ------------------------------------------------------------------------------- while owning


async def test_duplicate_responder_gratuitous_arp_and_na(pair: Pair) -> None:
    seen: list[tuple[ipaddress._BaseAddress, str]] = []
    got = trio.Event()

    def on_duplicate(addr, mac):  # type: ignore[no-untyped-def]
        seen.append((addr, mac))
        got.set()

    async with Netlink(pair.ours) as ours, Netlink(pair.foreign) as foreign:
        watch = DuplicateResponderWatch(ours, pair.our_if, on_duplicate, repeat_after=10)
        async with trio.open_nursery() as nursery:
            await nursery.start(watch.run)
            watch.watch(VIP4)
            watch.watch(VIP6)
            # our own announcements and a foreign claim of an address we do not own: silence
            vip4 = VipSpec("api", ipaddress.ip_interface(f"{VIP4}/24"), pair.our_if, announce_count=1,
                           announce_reply=True)
            await Announcer(ours).announce(vip4)
            await Announcer(ours).announce(VipSpec("api6", ipaddress.ip_interface(f"{VIP6}/64"), pair.our_if,
                                                   announce_count=1))
            await send_from(foreign, pair.foreign_if, garp_request(pair.foreign_mac, FREE4))
            await trio.sleep(0.1)
            assert seen == []
            # a foreign gratuitous ARP for an owned VIP: reported, and only once per repeat_after
            await send_from(foreign, pair.foreign_if, garp_request(pair.foreign_mac, VIP4),
                            garp_request(pair.foreign_mac, VIP4))
            with trio.fail_after(1):
                await got.wait()
            got = trio.Event()
            await send_from(foreign, pair.foreign_if, unsolicited_na(pair.foreign_mac, VIP6))
            with trio.fail_after(1):
                await got.wait()
            await trio.sleep(0.05)
            assert seen == [(VIP4, pair.foreign_mac), (VIP6, pair.foreign_mac)]
            # no longer owned: no longer reported
            watch.unwatch(VIP4)
            await send_from(foreign, pair.foreign_if, garp_request(pair.foreign_mac, VIP4))
            await trio.sleep(0.1)
            assert len(seen) == 2
            nursery.cancel_scope.cancel()


async def test_duplicate_responder_active_probe_finds_silent_holder(pair: Pair) -> None:
    pair.foreign_holds(f"{VIP4}/24", f"{VIP6}/64")  # it never announces; it only answers
    seen: list[tuple[object, str]] = []
    both = trio.Event()

    def on_duplicate(addr, mac):  # type: ignore[no-untyped-def]
        seen.append((addr, mac))
        if len({a for a, _ in seen}) == 2:
            both.set()

    async with Netlink(pair.ours) as ours:
        watch = DuplicateResponderWatch(ours, pair.our_if, on_duplicate, probe_interval=0.1)
        async with trio.open_nursery() as nursery:
            await nursery.start(watch.run)
            await trio.sleep(0.15)
            assert seen == []  # nothing owned, nothing probed
            watch.watch(VIP4)
            watch.watch(str(VIP6))
            with trio.fail_after(1):
                await both.wait()
            nursery.cancel_scope.cancel()
    assert set(seen) == {(VIP4, pair.foreign_mac), (VIP6, pair.foreign_mac)}

"""The DSR director program (bpf/dsr.c) on crafted frames through BPF_PROG_TEST_RUN: what it
directs and how it rewrites, every kind of pass-through, the fence, and byte-for-byte agreement of
its flow hash with the Python reference (vipd/dsr/maglev.py). No traffic, no namespace: the kernel
runs the program on the frame and hands back the verdict and the bytes."""

from __future__ import annotations

import ipaddress
import random
import struct
import time
from typing import Iterator

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_Router_Alert
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP, Dot1Q, Ether

from vipd.dsr import maglev
from vipd.dsr.bpf import BpfObject, find_object
from vipd.dsr.maps import BackendSlot, DirectorMaps, svc_key

pytestmark = pytest.mark.needs_tools("clang")

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
VIP = ipaddress.ip_address("10.213.0.100")
VIP6 = ipaddress.ip_address("fd00:213::100")
CLIENT_MAC, DIRECTOR_MAC = "02:76:74:00:00:c0", "02:76:74:00:00:01"
BACKENDS = [BackendSlot(f"h{i}", f"02:76:74:00:00:{i:02x}", False) for i in (3, 4, 5)]
NAMES = [b.name for b in BACKENDS]
LO = 1  # BPF_PROG_TEST_RUN runs a tc program as if it came in on the loopback device


@pytest.fixture
def director() -> Iterator[tuple[BpfObject, DirectorMaps]]:
    obj = BpfObject(find_object())
    maps = DirectorMaps(obj)
    maps.set_iface(LO, DIRECTOR_MAC)
    for vip in (VIP, VIP6):
        maps.set_service(vip, "tcp", 80, BACKENDS)
        maps.set_service(vip, "udp", 53, BACKENDS)
        arm(maps, vip, 60)
    try:
        yield obj, maps
    finally:
        obj.close()


def arm(maps: DirectorMaps, vip: ipaddress.IPv4Address | ipaddress.IPv6Address, seconds: float) -> None:
    maps.set_deadline(vip, time.clock_gettime_ns(time.CLOCK_MONOTONIC) + int(seconds * 1e9))


def tcp(src: str = "10.213.0.3", dst: str = str(VIP), sport: int = 40000, dport: int = 80, **ip: object) -> bytes:
    return bytes(Ether(src=CLIENT_MAC, dst=DIRECTOR_MAC) / IP(src=src, dst=dst, **ip) / TCP(sport=sport, dport=dport))


def run(obj: BpfObject, frame: bytes) -> tuple[int, bytes]:
    r = obj.test_run("vipd_dsr", frame)
    return r.verdict, r.data


def expected_backend(src: str, dst: str, sport: int, dport: int, proto: int) -> BackendSlot:
    h = maglev.flow_hash(ipaddress.ip_address(src), ipaddress.ip_address(dst), sport, dport, proto)
    name = maglev.lookup(maglev.build(NAMES), NAMES, h)
    return next(b for b in BACKENDS if b.name == name)


def test_match_rewrites_only_the_macs_and_redirects(director: tuple[BpfObject, DirectorMaps]) -> None:
    obj, maps = director
    frame = tcp()
    verdict, out = run(obj, frame)
    assert verdict == TC_ACT_REDIRECT
    want = expected_backend("10.213.0.3", str(VIP), 40000, 80, 6)
    assert Ether(out).dst == want.mac and Ether(out).src == DIRECTOR_MAC
    assert out[12:] == frame[12:]  # IP header and payload untouched: the client's address is preserved
    assert maps.reason_counts()["directed"] == 1
    assert maps.backend_traffic()[want.name].packets == 1
    assert maps.backend_traffic()[want.name].bytes == len(frame)


def test_ipv6_and_udp_match(director: tuple[BpfObject, DirectorMaps]) -> None:
    obj, _ = director
    f6 = bytes(Ether(src=CLIENT_MAC, dst=DIRECTOR_MAC) / IPv6(src="fd00:213::3", dst=str(VIP6)) / TCP(sport=5555, dport=80))
    verdict, out = run(obj, f6)
    assert verdict == TC_ACT_REDIRECT
    assert Ether(out).dst == expected_backend("fd00:213::3", str(VIP6), 5555, 80, 6).mac
    fu = bytes(Ether(src=CLIENT_MAC, dst=DIRECTOR_MAC) / IP(src="10.213.0.3", dst=str(VIP)) / UDP(sport=999, dport=53))
    verdict, out = run(obj, fu)
    assert verdict == TC_ACT_REDIRECT
    assert Ether(out).dst == expected_backend("10.213.0.3", str(VIP), 999, 53, 17).mac


def test_ip_options_are_skipped_to_find_the_ports(director: tuple[BpfObject, DirectorMaps]) -> None:
    obj, _ = director
    frame = tcp(sport=41234, options=[IPOption_Router_Alert()])
    assert IP(frame[14:]).ihl == 6
    verdict, out = run(obj, frame)
    assert verdict == TC_ACT_REDIRECT
    assert Ether(out).dst == expected_backend("10.213.0.3", str(VIP), 41234, 80, 6).mac


@pytest.mark.parametrize("kind, frame, reason", [
    ("arp", bytes(Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="10.213.0.3", pdst=str(VIP))), "pass_not_ip"),
    ("icmp", bytes(Ether(src=CLIENT_MAC, dst=DIRECTOR_MAC) / IP(src="10.213.0.3", dst=str(VIP)) / ICMP()), "pass_proto"),
    ("other port", tcp(dport=81), "pass_no_service"),
    ("other protocol on the port", bytes(Ether(src=CLIENT_MAC, dst=DIRECTOR_MAC) / IP(src="10.213.0.3", dst=str(VIP)) / UDP(dport=80)), "pass_no_service"),
    ("other address", tcp(dst="10.213.0.99"), "pass_no_service"),
    ("first fragment", tcp(flags="MF"), "pass_fragment"),
    ("non-first fragment", bytes(Ether(src=CLIENT_MAC, dst=DIRECTOR_MAC) / IP(src="10.213.0.3", dst=str(VIP), proto=6, frag=185) / (b"x" * 24)), "pass_fragment"),
    # (a frame shorter than an IP header never reaches the program: the test harness refuses it, EINVAL)
    ("truncated ports", tcp()[:14 + 20 + 2], "pass_truncated"),
    ("options beyond the frame", bytes(Ether(src=CLIENT_MAC, dst=DIRECTOR_MAC, type=0x0800)) + bytes(IP(src="10.213.0.3", dst=str(VIP), ihl=15, proto=6))[:20] + b"\0" * 8, "pass_truncated"),
    ("bad ihl", bytes(Ether(src=CLIENT_MAC, dst=DIRECTOR_MAC) / IP(src="10.213.0.3", dst=str(VIP), ihl=4) / TCP(dport=80)), "pass_truncated"),
    ("vlan", bytes(Ether(src=CLIENT_MAC, dst=DIRECTOR_MAC) / Dot1Q(vlan=7) / IP(src="10.213.0.3", dst=str(VIP)) / TCP(dport=80)), "pass_vlan"),
    ("ipv6 fragment", bytes(Ether(src=CLIENT_MAC, dst=DIRECTOR_MAC) / IPv6(src="fd00:213::3", dst=str(VIP6)) / IPv6ExtHdrFragment(m=1) / TCP(dport=80)), "pass_fragment"),
    ("ipv6 extension header", bytes(Ether(src=CLIENT_MAC, dst=DIRECTOR_MAC) / IPv6(src="fd00:213::3", dst=str(VIP6)) / IPv6ExtHdrHopByHop() / TCP(dport=80)), "pass_proto"),
    ("from a backend (already directed)", bytes(Ether(src=BACKENDS[0].mac, dst=DIRECTOR_MAC) / IP(src="10.213.0.3", dst=str(VIP)) / TCP(dport=80)), "pass_peer"),
])
def test_pass_through_untouched(director: tuple[BpfObject, DirectorMaps], kind: str, frame: bytes, reason: str) -> None:
    obj, maps = director
    verdict, out = run(obj, frame)
    assert verdict == TC_ACT_OK, kind
    assert out == frame, kind
    counts = maps.reason_counts()
    assert counts[reason] == 1, (kind, counts)
    assert counts["directed"] == 0


def test_fence_unarmed_or_expired_drops_on_a_director_that_is_no_backend(director: tuple[BpfObject, DirectorMaps]) -> None:
    obj, maps = director
    maps.clear_deadline(VIP)
    assert run(obj, tcp())[0] == TC_ACT_SHOT
    arm(maps, VIP, -0.001)
    assert run(obj, tcp())[0] == TC_ACT_SHOT
    arm(maps, VIP, 60)
    assert run(obj, tcp())[0] == TC_ACT_REDIRECT
    counts = maps.reason_counts()
    assert (counts["drop_fenced"], counts["directed"]) == (2, 1)


def test_fence_unarmed_or_expired_passes_on_a_backend_host(director: tuple[BpfObject, DirectorMaps]) -> None:
    obj, maps = director
    maps.set_service(VIP, "tcp", 80, BACKENDS, self_backend=True)
    maps.clear_deadline(VIP)
    assert run(obj, tcp()) == (TC_ACT_OK, tcp())
    arm(maps, VIP, -0.001)  # a deadline just passed
    assert run(obj, tcp()) == (TC_ACT_OK, tcp())
    arm(maps, VIP, 0.2)
    assert run(obj, tcp())[0] == TC_ACT_REDIRECT
    time.sleep(0.25)  # not a timing assertion: the kernel's clock is past the deadline afterwards
    assert run(obj, tcp()) == (TC_ACT_OK, tcp())
    counts = maps.reason_counts()
    assert (counts["pass_not_armed"], counts["pass_expired"], counts["directed"]) == (1, 2, 1)


def test_local_backend_goes_up_the_stack_unchanged(director: tuple[BpfObject, DirectorMaps]) -> None:
    obj, maps = director
    local = [BackendSlot(b.name, b.mac, True) for b in BACKENDS]
    maps.set_service(VIP, "tcp", 80, local)
    assert run(obj, tcp()) == (TC_ACT_OK, tcp())
    assert maps.reason_counts()["local"] == 1


def test_no_backend_drops_and_counts(director: tuple[BpfObject, DirectorMaps]) -> None:
    obj, maps = director
    maps.set_service(VIP, "tcp", 80, [])
    assert run(obj, tcp())[0] == TC_ACT_SHOT
    assert maps.reason_counts()["drop_no_backend"] == 1


def _slots_seen(obj: BpfObject, maps: DirectorMaps, frames: list[bytes], vip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[int]:
    """The table slot (= hash % TABLE_SIZE) the program picked for each frame: three passes over
    tables whose slot s names backend (s >> 8k) & 0xff, read back from the output MAC."""
    sid = maps._svc_ids[svc_key(vip, "tcp", 80)]
    slots = [0] * len(frames)
    for shift in (0, 8, 16):
        fake = [BackendSlot(f"b{i}", f"02:00:00:00:00:{i:02x}", False) for i in range(256)]
        for i, b in enumerate(fake):
            maps.backends.update(struct.pack("=I", i), bytes.fromhex(b.mac.replace(":", "")) + b"\0\1")
        base = (sid * 2) * maglev.TABLE_SIZE
        n = maglev.TABLE_SIZE
        maps.tables.update_batch(struct.pack(f"={n}I", *range(base, base + n)),
                                 struct.pack(f"={n}I", *(((s >> shift) & 0xFF) for s in range(n))), n)
        maps.services.update(svc_key(vip, "tcp", 80), struct.pack("=III", sid, 0, 0))
        for j, f in enumerate(frames):
            verdict, out = run(obj, f)
            assert verdict == TC_ACT_REDIRECT
            slots[j] |= out[5] << shift
    return slots


def test_hash_agrees_byte_for_byte_with_the_python_reference(director: tuple[BpfObject, DirectorMaps]) -> None:
    obj, maps = director
    rng = random.Random(7)
    v4 = [(f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}", rng.randrange(1, 65536)) for _ in range(150)]
    frames = [tcp(src=s, sport=p) for s, p in v4]
    want = [maglev.flow_hash(ipaddress.ip_address(s), VIP, p, 80, 6) % maglev.TABLE_SIZE for s, p in v4]
    assert _slots_seen(obj, maps, frames, VIP) == want
    v6 = [(str(ipaddress.IPv6Address(rng.getrandbits(128))), rng.randrange(1, 65536)) for _ in range(100)]
    frames6 = [bytes(Ether(src=CLIENT_MAC, dst=DIRECTOR_MAC) / IPv6(src=s, dst=str(VIP6)) / TCP(sport=p, dport=80)) for s, p in v6]
    want6 = [maglev.flow_hash(ipaddress.ip_address(s), VIP6, p, 80, 6) % maglev.TABLE_SIZE for s, p in v6]
    assert _slots_seen(obj, maps, frames6, VIP6) == want6
    assert len(set(want + want6)) > 240  # the tuples really differ: the check is not vacuous


def test_removing_a_backend_moves_only_its_flows(director: tuple[BpfObject, DirectorMaps]) -> None:
    """10,000 synthetic tuples through the program, before and after one of four backends leaves."""
    obj, maps = director
    four = BACKENDS + [BackendSlot("h6", "02:76:74:00:00:06", False)]
    maps.set_service(VIP, "tcp", 80, four)
    rng = random.Random(11)
    frames = [tcp(src=f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
                  sport=rng.randrange(1024, 65536)) for _ in range(10_000)]
    before = [run(obj, f)[1][:6] for f in frames]
    gen = maps.generation[svc_key(VIP, "tcp", 80)]
    maps.set_service(VIP, "tcp", 80, [b for b in four if b.name != "h5"])
    assert maps.generation[svc_key(VIP, "tcp", 80)] == gen + 1
    after = [run(obj, f)[1][:6] for f in frames]
    gone = bytes.fromhex("027674000005")
    assert gone not in after
    share = sum(b == gone for b in before)
    assert 2000 < share < 3000  # about a quarter
    others_moved = sum(1 for b, a in zip(before, after) if b != gone and b != a)
    assert others_moved <= 0.01 * (len(frames) - share)

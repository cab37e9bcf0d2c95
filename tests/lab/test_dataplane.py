"""The dataplane against a real kernel, in network namespaces named vtb-<tag>-<role>.

Every namespace is created by the ``nslab`` fixture (named apart from tests/lab/conftest.py's
``lab``, which builds whole clusters) and deleted in its finalizer, also when the test fails;
links live inside the namespaces and die with them. Traffic stays between these namespaces.
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import json
import secrets
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Iterator

import pytest
import trio
import trio.testing

from vipd.config import VipSpec
from vipd.dataplane.address import VIPD_PROTO, AddressManager, tagged_address
from vipd.dataplane.announce import Announcer
from vipd.dataplane.kernel_events import AddressAdded, AddressRemoved, LinkChanged, Overflowed, kernel_events
from vipd.dataplane.netlink import Netlink
from vipd.errors import AddressError, AnnounceError, DataplaneError

V4 = ipaddress.IPv4Interface
V6 = ipaddress.IPv6Interface


# -- lab plumbing ---------------------------------------------------------------------------


def ip(*args: str, check: bool = True) -> str:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if check and r.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout


def ip_json(*args: str) -> Any:
    return json.loads(ip("-j", *args) or "[]")


class NsLab:
    """Namespaces and links for one test, all named vtb-<tag>-... / vtb<tag>..."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(2)
        self.namespaces: list[str] = []

    def ns(self, role: str) -> str:
        name = f"vtb-{self.tag}-{role}"
        ip("netns", "add", name)
        self.namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")
        return name

    def link(self, role: str) -> str:
        name = f"vtb{self.tag}{role}"
        assert len(name) <= 15
        return name

    def veth(self, ns1: str, role1: str, ns2: str, role2: str) -> tuple[str, str]:
        a, b = self.link(role1), self.link(role2)
        ip("link", "add", a, "netns", ns1, "type", "veth", "peer", "name", b, "netns", ns2)
        ip("-n", ns1, "link", "set", a, "up")
        ip("-n", ns2, "link", "set", b, "up")
        return a, b

    def cleanup(self) -> None:
        for name in reversed(self.namespaces):
            ip("netns", "del", name, check=False)
        self.namespaces.clear()


@pytest.fixture
def nslab() -> Iterator[NsLab]:
    nslab = NsLab()
    try:
        yield nslab
    finally:
        nslab.cleanup()


@pytest.fixture
def host(nslab: NsLab) -> tuple[str, str]:
    """One namespace with a veth whose peer (in a second namespace) is up: (netns, ifname)."""
    ns, peer = nslab.ns("h"), nslab.ns("p")
    ifname, _ = nslab.veth(ns, "h", peer, "p")
    return ns, ifname


@pytest.fixture
async def nl(host: tuple[str, str]) -> Any:
    async with Netlink(host[0]) as nl:
        yield nl


def vip(address: str, interface: str, **kw: Any) -> VipSpec:
    return VipSpec(name=f"vip-{address.split('/')[0]}", address=ipaddress.ip_interface(address),
                   interface=interface, **kw)


def addr_info(ns: str, ifname: str, address: str) -> dict[str, Any] | None:
    """`ip -d addr` as JSON for one address (ip of ``address``), or None."""
    want = ipaddress.ip_interface(address).ip
    for link in ip_json("-n", ns, "-d", "addr", "show", "dev", ifname):
        for a in link.get("addr_info", []):
            if ipaddress.ip_address(a["local"]) == want:
                return a
    return None


# -- addresses --------------------------------------------------------------------------------


async def test_claim_adds_tagged_address_with_lifetime(host: tuple[str, str], nl: Netlink) -> None:
    ns, ifname = host
    am = AddressManager(nl)
    v = vip("10.20.0.10/24", ifname)
    await am.claim(v, 30)
    info = addr_info(ns, ifname, "10.20.0.10")
    assert info is not None and info["prefixlen"] == 24
    assert info.get("dynamic") is True
    assert 28 <= info["valid_life_time"] <= 30 and 28 <= info["preferred_life_time"] <= 30
    assert await am.holds(v)
    left = await am.lifetime_left(v)
    assert left is not None and 28 <= left <= 30
    [t] = await am.tagged()
    assert (t.interface, t.address) == (ifname, V4("10.20.0.10/24")) and 28 <= (t.valid_lft or 0) <= 30

    # claiming with another prefix length replaces our old entry, it does not add a second one
    v25 = vip("10.20.0.10/25", ifname)
    await am.claim(v25, 30)
    assert [t.address for t in await am.tagged()] == [V4("10.20.0.10/25")]
    assert await am.holds(v25) and not await am.holds(v)


async def test_claim_on_loopback_keeps_configured_prefix(host: tuple[str, str], nl: Netlink) -> None:
    am = AddressManager(nl)
    await am.claim(vip("10.30.0.1/32", "lo"), 10)
    await am.claim(vip("fd30::1/128", "lo"), 10)
    got = {(t.interface, t.address) for t in await am.tagged()}
    assert got == {("lo", V4("10.30.0.1/32")), ("lo", V6("fd30::1/128"))}
    assert await Announcer(nl).announce(vip("10.30.0.1/32", "lo")) == 0


async def wait_gone(am: AddressManager, v: VipSpec, start: float, limit: float) -> float:
    """Seconds from ``start`` until ``v`` is gone; checked every 20 ms, at most ``limit`` s."""
    with trio.fail_after(limit):
        while await am.holds(v):
            await trio.sleep(0.02)
    return trio.current_time() - start


async def test_kernel_removes_address_when_lifetime_ends(host: tuple[str, str], nl: Netlink) -> None:
    ns, ifname = host
    am = AddressManager(nl)
    v4, v6 = vip("10.20.0.11/24", ifname), vip("fd20::11/64", ifname)
    start = trio.current_time()
    await am.claim(v4, 2)
    await am.claim(v6, 2)
    assert await am.holds(v4) and await am.holds(v6)
    gone4 = await wait_gone(am, v4, start, 4)
    gone6 = await wait_gone(am, v6, start, 4)
    # never early (the kernel batches expiries 20 ms ahead); late by up to ~1.3 s: the kernel's
    # lifetime check runs at rounded times and at most once a second (see the dataplane report)
    assert 1.9 <= gone4 <= 3.4, gone4
    assert 1.9 <= gone6 <= 3.4, gone6
    assert addr_info(ns, ifname, "10.20.0.11") is None and addr_info(ns, ifname, "fd20::11") is None


async def test_claim_again_restarts_countdown(host: tuple[str, str], nl: Netlink) -> None:
    am = AddressManager(nl)
    v = vip("10.20.0.12/24", host[1])
    start = trio.current_time()
    await am.claim(v, 2)
    await trio.sleep(1.3)
    refreshed = trio.current_time()
    await am.claim(v, 2)  # the refresh
    await trio.sleep(start + 2.5 - trio.current_time())
    assert await am.holds(v), "the address expired at its first deadline despite the refresh"
    gone = await wait_gone(am, v, refreshed, 2.5)
    assert 1.9 <= gone <= 3.4, gone


async def test_release_removes_only_tagged(host: tuple[str, str], nl: Netlink) -> None:
    ns, ifname = host
    am = AddressManager(nl)
    ip("-n", ns, "addr", "add", "10.20.0.20/24", "dev", ifname)  # an administrator's address
    ours = vip("10.20.0.10/24", ifname)
    await am.claim(ours, 30)
    await am.release(ours)
    assert addr_info(ns, ifname, "10.20.0.10") is None
    assert addr_info(ns, ifname, "10.20.0.20") is not None
    await am.release(ours)  # absent: fine
    await am.release(vip("10.20.0.20/24", ifname))  # untagged: left alone, no error
    assert addr_info(ns, ifname, "10.20.0.20") is not None
    await am.release(vip("10.20.0.10/24", "vtbnosuchif"))  # no interface: nothing to release


@pytest.mark.parametrize("existing, claimed", [
    ("10.20.0.30/24", "10.20.0.30/24"),
    ("10.20.0.30/32", "10.20.0.30/24"),  # same IP, other prefix: still not ours
    ("fd20::30/64", "fd20::30/64"),
])
async def test_claim_refuses_untagged_address(host: tuple[str, str], nl: Netlink, existing: str,
                                              claimed: str) -> None:
    ns, ifname = host
    am = AddressManager(nl)
    ip("-n", ns, "addr", "add", existing, "dev", ifname, "nodad")
    with pytest.raises(AddressError, match="without vipd's tag"):
        await am.claim(vip(claimed, ifname), 5)
    info = addr_info(ns, ifname, existing)
    assert info is not None and info["valid_life_time"] == 0xFFFFFFFF  # untouched: still forever
    assert await am.tagged() == []
    assert not await am.holds(vip(claimed, ifname))


async def test_permanent_claim_for_the_bgp_source(host: tuple[str, str], nl: Netlink) -> None:
    """lifetime=None: the fixed BGP source address, tagged like a VIP but with no countdown."""
    ns, ifname = host
    am = AddressManager(nl)
    src4, src6 = vip("10.20.0.90/32", "lo"), vip("fd20::90/128", "lo")
    for v in (src4, src6):
        await am.claim(v, None)
        await am.claim(v, None)  # again: no second entry, still forever
    for a in ("10.20.0.90", "fd20::90"):
        info = addr_info(ns, "lo", a)
        assert info is not None and info["valid_life_time"] == 0xFFFFFFFF == info["preferred_life_time"]
        assert not info.get("dynamic")
    assert {(t.interface, t.address, t.valid_lft) for t in await am.tagged()} == {
        ("lo", V4("10.20.0.90/32"), None), ("lo", V6("fd20::90/128"), None)}
    assert await am.holds(src4) and await am.lifetime_left(src4) is None
    # a lifetime turns it into a lease-bound address, and None back into a permanent one
    await am.claim(src4, 20)
    assert 18 <= (await am.lifetime_left(src4) or 0) <= 20
    await am.claim(src4, None)
    assert await am.lifetime_left(src4) is None and await am.holds(src4)
    # still refuses to take over an untagged duplicate, permanent or not
    ip("-n", ns, "addr", "add", "10.20.0.91/32", "dev", "lo")
    with pytest.raises(AddressError, match="without vipd's tag"):
        await am.claim(vip("10.20.0.91/32", "lo"), None)
    with pytest.raises(AddressError, match="or None"):
        await am.claim(src4, 0)
    await am.release(src4)
    await am.release(src6)
    assert await am.tagged() == [] and addr_info(ns, "lo", "10.20.0.91") is not None


async def test_tagged_lists_only_ours_and_remove(host: tuple[str, str], nl: Netlink) -> None:
    ns, ifname = host
    am = AddressManager(nl)
    ip("-n", ns, "addr", "add", "10.20.0.40/24", "dev", ifname)
    ip("-n", ns, "addr", "add", "10.20.0.41/32", "dev", "lo")
    await am.claim(vip("10.20.0.42/24", ifname), 20)
    await am.claim(vip("10.20.0.43/32", "lo"), 20)
    await am.claim(vip("fd20::44/64", ifname), 20)
    found = await am.tagged()
    assert {(t.interface, t.address) for t in found} == {
        (ifname, V4("10.20.0.42/24")), ("lo", V4("10.20.0.43/32")), (ifname, V6("fd20::44/64"))}
    assert all(t.valid_lft is not None and 18 <= t.valid_lft <= 20 for t in found)
    for t in found:
        await am.remove(t)
        await am.remove(t)  # already gone: fine
    assert await am.tagged() == []
    assert addr_info(ns, ifname, "10.20.0.40") and addr_info(ns, "lo", "10.20.0.41")
    # remove() never deletes an untagged address, even when named explicitly
    await am.remove(tagged_address(ifname, V4("10.20.0.40/24")))
    assert addr_info(ns, ifname, "10.20.0.40")


async def test_ipv6_claim_is_usable_at_once(nslab: NsLab, host: tuple[str, str], nl: Netlink) -> None:
    ns, ifname = host
    peer_ns = nslab.namespaces[1]
    peer_if = nslab.link("p")
    ip("-n", peer_ns, "addr", "add", "fd20::2/64", "dev", peer_if, "nodad")
    await AddressManager(nl).claim(vip("fd20::50/64", ifname), 10)
    info = addr_info(ns, ifname, "fd20::50")
    assert info is not None and info.get("nodad") is True and not info.get("tentative")
    ping = subprocess.run(["ip", "netns", "exec", peer_ns, "ping", "-6", "-c1", "-W1", "-q", "fd20::50"],
                          capture_output=True, text=True, timeout=5)
    assert ping.returncode == 0, ping.stdout + ping.stderr


# -- announcements ----------------------------------------------------------------------------


@dataclass
class Segment:
    """Hosts a and c (the VIP moves from a to c) and client b, on one bridge."""

    a: str
    c: str
    b: str
    a_if: str
    c_if: str
    b_if: str

    def mac(self, ns: str, ifname: str) -> str:
        return ip_json("-n", ns, "link", "show", "dev", ifname)[0]["address"]

    def neigh(self, address: str) -> str | None:
        for n in ip_json("-n", self.b, "neigh", "show", address, "dev", self.b_if):
            return n.get("lladdr")
        return None

    def ping_from_b(self, address: str) -> None:
        r = subprocess.run(["ip", "netns", "exec", self.b, "ping", "-c1", "-W1", "-q", address],
                           capture_output=True, text=True, timeout=5)
        assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture
def segment(nslab: NsLab) -> Segment:
    sw = nslab.ns("s")
    bridge = nslab.link("br")
    ip("-n", sw, "link", "add", bridge, "type", "bridge", "mcast_snooping", "0")
    ip("-n", sw, "link", "set", bridge, "up")
    names = {}
    for role in "acb":
        ns = nslab.ns(role)
        ifname, port = nslab.veth(ns, role, sw, "p" + role)
        ip("-n", sw, "link", "set", port, "master", bridge)
        names[role] = (ns, ifname)
    ip("-n", names["b"][0], "addr", "add", "10.40.0.2/24", "dev", names["b"][1])
    ip("-n", names["b"][0], "addr", "add", "fd40::2/64", "dev", names["b"][1], "nodad")
    return Segment(names["a"][0], names["c"][0], names["b"][0], names["a"][1], names["c"][1], names["b"][1])


async def move_and_announce(seg: Segment, v_a: VipSpec, v_c: VipSpec) -> tuple[str, str, int]:
    """Claim on a, let b learn a's MAC, move the VIP to c, announce from c: (a_mac, c_mac, sent)."""
    async with Netlink(seg.a) as nl_a, Netlink(seg.c) as nl_c:
        await AddressManager(nl_a).claim(v_a, 30)
        seg.ping_from_b(str(v_a.ip))
        a_mac, c_mac = seg.mac(seg.a, seg.a_if), seg.mac(seg.c, seg.c_if)
        assert seg.neigh(str(v_a.ip)) == a_mac
        await AddressManager(nl_a).release(v_a)
        await AddressManager(nl_c).claim(v_c, 30)
        assert seg.neigh(str(v_a.ip)) == a_mac  # nothing told b yet
        sent = await Announcer(nl_c).announce(v_c)
    return a_mac, c_mac, sent


async def wait_neigh(seg: Segment, address: str, mac: str) -> None:
    with trio.fail_after(2):
        while seg.neigh(address) != mac:
            await trio.sleep(0.02)


async def test_gratuitous_arp_moves_neighbour_entry(segment: Segment) -> None:
    v_a = vip("10.40.0.10/24", segment.a_if)
    v_c = vip("10.40.0.10/24", segment.c_if, announce_count=2, announce_interval=0.05, announce_reply=True)
    a_mac, c_mac, sent = await move_and_announce(segment, v_a, v_c)
    assert sent == 4  # two bursts of request + reply
    await wait_neigh(segment, "10.40.0.10", c_mac)
    assert a_mac != c_mac


async def test_unsolicited_na_moves_neighbour_entry(segment: Segment) -> None:
    v_a = vip("fd40::10/64", segment.a_if)
    v_c = vip("fd40::10/64", segment.c_if, announce_count=1)
    a_mac, c_mac, sent = await move_and_announce(segment, v_a, v_c)
    assert sent == 1
    await wait_neigh(segment, "fd40::10", c_mac)


async def test_announce_timing_and_errors(host: tuple[str, str], nl: Netlink) -> None:
    ns, ifname = host
    ann = Announcer(nl)
    start = trio.current_time()
    assert await ann.announce(vip("10.20.0.60/24", ifname, announce_count=3, announce_interval=0.05)) == 3
    assert 0.1 <= trio.current_time() - start < 0.5
    assert await ann.announce(vip("10.20.0.60/24", ifname, announce_count=0)) == 0
    with pytest.raises(AnnounceError, match="vtbnosuchif"):
        await ann.announce(vip("10.20.0.60/24", "vtbnosuchif"))
    ip("-n", ns, "link", "set", ifname, "down")
    with pytest.raises(AnnounceError, match="down"):
        await ann.announce(vip("10.20.0.60/24", ifname))


async def test_announce_survives_frames_the_kernel_refuses(host: tuple[str, str], nl: Netlink) -> None:
    """A netdev egress drop (what the token fence does while a token is closed) makes the send fail
    with ENOBUFS: that burst is lost, the next ones go out; all refused is a clear error."""
    ns, ifname = host
    table = f"netdev vtann{ifname[-4:]}"
    ip_nft = ["ip", "netns", "exec", ns, "nft"]
    subprocess.run(ip_nft + [f"add table {table}; add chain {table} out {{ type filter hook egress device "
                             f"{ifname} priority 0; policy drop; }}"], check=True, timeout=10)
    ip("-n", ns, "link", "set", ifname, "up")
    ann = Announcer(nl)
    try:
        with pytest.raises(AnnounceError, match="refused by the kernel"):
            await ann.announce(vip("10.20.0.61/24", ifname, announce_count=2, announce_interval=0.02))
        result: list[int] = []

        async def announce() -> None:
            result.append(await ann.announce(vip("10.20.0.61/24", ifname, announce_count=3,
                                                 announce_interval=0.1)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(announce)
            await trio.sleep(0.05)  # the first burst was refused
            subprocess.run(ip_nft + ["delete", "table", *table.split()], check=True, timeout=10)
        assert result == [2]  # bursts 2 and 3, one gratuitous ARP each
    finally:
        subprocess.run(ip_nft + ["delete", "table", *table.split()], capture_output=True, timeout=10)


# -- kernel events ------------------------------------------------------------------------------


async def test_kernel_events_link_and_address(nslab: NsLab, host: tuple[str, str], nl: Netlink) -> None:
    ns, ifname = host
    peer_ns, peer_if = nslab.namespaces[1], nslab.link("p")
    am = AddressManager(nl)
    ip("-n", ns, "addr", "add", "10.20.0.70/24", "dev", ifname)
    await am.claim(vip("fd20::71/64", ifname), 30)
    send, receive = trio.open_memory_channel[Any](1000)

    async def consume() -> None:
        async with send, contextlib.aclosing(kernel_events(nl)) as events:
            async for event in events:
                await send.send(event)

    async def expect(*wanted: Any) -> None:
        """The next len(wanted) events, in any order; IPv6 link-local addresses (which come and
        go with links) are skipped."""
        got: list[Any] = []
        with trio.fail_after(3):
            while len(got) < len(wanted):
                event = await receive.receive()
                if not (isinstance(event, (AddressAdded, AddressRemoved)) and event.address.ip.is_link_local):
                    got.append(event)
        assert collections.Counter(got) == collections.Counter(wanted)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        await trio.testing.wait_all_tasks_blocked(0.05)  # subscribed, initial state read
        ip("-n", ns, "link", "set", ifname, "mtu", "1400")  # a link change but not up/down: no event
        ip("-n", ns, "link", "set", ifname, "down")  # IPv6 addresses go with it (keep_addr_on_down=0)
        await expect(LinkChanged(ifname, False), AddressRemoved(ifname, V6("fd20::71/64"), VIPD_PROTO))
        ip("-n", ns, "link", "set", ifname, "down")  # no change, no event
        ip("-n", ns, "link", "set", ifname, "up")
        await expect(LinkChanged(ifname, True))
        ip("-n", peer_ns, "link", "set", peer_if, "down")  # still admin up, but no carrier
        await expect(LinkChanged(ifname, False))
        ip("-n", peer_ns, "link", "set", peer_if, "up")
        await expect(LinkChanged(ifname, True))
        ip("-n", ns, "addr", "del", "10.20.0.70/24", "dev", ifname)
        await expect(AddressRemoved(ifname, V4("10.20.0.70/24"), None))
        start = trio.current_time()
        await am.claim(vip("10.20.0.72/24", ifname), 1)
        await expect(AddressAdded(ifname, V4("10.20.0.72/24"), VIPD_PROTO))
        await expect(AddressRemoved(ifname, V4("10.20.0.72/24"), VIPD_PROTO))  # the kernel's own expiry
        assert 0.9 <= trio.current_time() - start <= 2.4
        ip("-n", peer_ns, "link", "del", peer_if)  # the pair vanishes while up: one "down"
        await expect(LinkChanged(ifname, False))
        ip("-n", ns, "link", "add", nslab.link("n"), "type", "veth", "peer", "name", nslab.link("m"))
        ip("-n", ns, "link", "set", "lo", "down")
        await expect(LinkChanged("lo", False))  # nothing about the new (down) pair came first
        nursery.cancel_scope.cancel()


async def test_kernel_events_address_added(nslab: NsLab, host: tuple[str, str], nl: Netlink) -> None:
    """AddressAdded: once per appearance (refreshes are swallowed), IPv6 only once DAD is done,
    addresses present at start are not reported, and a removed address coming back is."""
    ns, ifname = host
    ip("-n", ns, "addr", "add", "10.20.0.60/24", "dev", ifname)  # present before: never reported
    am = AddressManager(nl)
    src = vip("10.20.0.61/32", "lo")
    send, receive = trio.open_memory_channel[Any](1000)

    async def consume() -> None:
        async with send, contextlib.aclosing(kernel_events(nl)) as events:
            async for event in events:
                await send.send(event)

    async def next_added() -> AddressAdded:
        with trio.fail_after(4):
            while True:
                event = await receive.receive()
                if isinstance(event, AddressAdded) and not event.address.ip.is_link_local:
                    return event

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        await trio.testing.wait_all_tasks_blocked(0.05)
        await am.claim(src, None)
        assert await next_added() == AddressAdded("lo", V4("10.20.0.61/32"), VIPD_PROTO)
        lease = vip("10.20.0.62/24", ifname)
        await am.claim(lease, 30)
        for _ in range(3):
            await am.claim(lease, 30)  # refreshes: RTM_NEWADDR again, but nothing new
        await am.claim(src, None)
        ip("-n", ns, "addr", "add", "10.20.0.63/24", "dev", ifname)
        assert await next_added() == AddressAdded(ifname, V4("10.20.0.62/24"), VIPD_PROTO)
        assert await next_added() == AddressAdded(ifname, V4("10.20.0.63/24"), None)
        # the source address goes and comes back: reported again (routes with prefsrc must follow)
        await am.release(src)
        await am.claim(src, None)
        assert await next_added() == AddressAdded("lo", V4("10.20.0.61/32"), VIPD_PROTO)
        # with DAD, an IPv6 address is reported when it becomes usable, not while tentative
        ip("-n", ns, "addr", "add", "fd20::64/64", "dev", ifname)
        assert await next_added() == AddressAdded(ifname, V6("fd20::64/64"), None)
        info = addr_info(ns, ifname, "fd20::64")
        assert info is not None and not info.get("tentative")
        nursery.cancel_scope.cancel()
    assert all(not isinstance(e, AddressAdded) or e.address.ip.is_link_local
               for e in [receive.receive_nowait() for _ in range(receive.statistics().current_buffer_used)])


async def test_kernel_events_overflow_resyncs_links(host: tuple[str, str], nl: Netlink,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    ns, ifname = host
    send, receive = trio.open_memory_channel[Any](20000)

    async def consume() -> None:
        async with send, contextlib.aclosing(kernel_events(nl)) as events:
            async for event in events:
                await send.send(event)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        await trio.testing.wait_all_tasks_blocked(0.05)
        # The loop is blocked by these synchronous commands, so nothing reads the socket: 6,000
        # address notifications overflow its buffer and the link change after them is lost.
        batch = "".join(f"address add 10.{50 + i // 250}.{i % 250}.1/32 dev lo\n" for i in range(6000))
        subprocess.run(["ip", "-n", ns, "-batch", "-"], input=batch, text=True, check=True, timeout=20)
        ip("-n", ns, "link", "set", ifname, "down")
        added: collections.Counter[Any] = collections.Counter()
        links = []
        overflows = 0
        with trio.fail_after(5):
            while sum(added.values()) < 6000 or not links:
                event = await receive.receive()
                if isinstance(event, Overflowed):
                    overflows += 1  # the consumer's cue to re-list now
                elif isinstance(event, LinkChanged):
                    links.append(event)
                elif isinstance(event, AddressAdded) and event.ifname == "lo":
                    added[event.address] += 1
        assert links == [LinkChanged(ifname, False)]  # found again by the dump after the overflow
        # every address reported exactly once: before the overflow, or by the address dump after it
        assert len(added) == 6000 and set(added.values()) == {1}
        assert "overflowed" in caplog.text and overflows >= 1
        nursery.cancel_scope.cancel()


# -- errors and cancellation -----------------------------------------------------------------


async def test_claim_on_missing_interface_names_it(nl: Netlink) -> None:
    with pytest.raises(AddressError, match="vtbnosuchif"):
        await AddressManager(nl).claim(vip("10.20.0.80/24", "vtbnosuchif"), 5)
    with pytest.raises(DataplaneError, match="vtbnosuchif"):
        await nl.link("vtbnosuchif")
    with pytest.raises(AddressError, match="lifetime"):
        await AddressManager(nl).claim(vip("10.20.0.80/24", "lo"), 0)


async def test_netlink_on_missing_netns() -> None:
    name = f"vtb-{secrets.token_hex(2)}-missing"
    with pytest.raises(DataplaneError, match=name):
        async with Netlink(name):
            pass
    assert name not in ip("netns", "list")  # flags=0: a mistyped name never creates a netns


async def test_netlink_call_results_errors_and_cancellation(host: tuple[str, str], nl: Netlink) -> None:
    ns, ifname = host
    link = await nl.link(ifname)
    assert link.name == ifname and link.up and link.mac and link.mtu == 1500
    assert (await nl.link("lo")).mac is None

    def boom(ipr: Any) -> None:
        raise KeyError("from the owner thread")

    with pytest.raises(KeyError, match="from the owner thread"):
        await nl.call(boom)
    ran: list[str] = []

    def slow(name: str) -> Any:
        def job(ipr: Any) -> str:
            time.sleep(0.1)
            ran.append(name)
            return name
        return job

    async def first() -> None:
        assert await nl.call(slow("first")) == "first"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(0.02) as scope:
            await nl.call(slow("queued"))  # waits behind "first", cancelled before it starts
        assert scope.cancelled_caught
    with trio.move_on_after(0.02) as scope:
        await nl.call(slow("running"))  # already running when cancelled: runs to completion
    assert scope.cancelled_caught
    # the thread is still busy with "running"; the next call queues behind it and gets its own result
    assert (await nl.link(ifname)).index == link.index
    assert ran == ["first", "running"]
    with trio.CancelScope() as scope:
        scope.cancel()
        await nl.call(slow("never"))  # cancelled before it was queued
    assert ran == ["first", "running"]


async def test_netlink_in_own_netns_and_after_close() -> None:
    # the daemon's way: no netns name, the process's own netns (read-only here: the root netns)
    async with Netlink() as nl:
        assert (await nl.link("lo")).index == 1
        sock = await nl.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        sock.close()
    with pytest.raises(DataplaneError, match="not open"):
        await nl.link("lo")


async def test_the_l2_checks_never_ask_from_an_address_vipd_added(host: tuple[str, str], nl: Netlink) -> None:
    """segment_facts marks the addresses vipd added (IFA_PROTO), and sender_for never names one as
    an ARP request's sender: the daemon's L2 check runs before it removes an earlier run's
    addresses, and such an address (or a VIP no longer configured here) may be another host's
    now. Here a tagged address comes first in the kernel's order, the host's own second."""
    from vipd.dataplane.proxyarp import segment_facts

    ns, ifname = host
    await AddressManager(nl).claim(vip("192.0.2.50/24", ifname), 30)  # tagged, first
    subprocess.run(["ip", "-n", ns, "addr", "add", "192.0.2.1/24", "dev", ifname], check=True, timeout=10)
    facts = await segment_facts(nl, ifname)
    stale, own = ipaddress.IPv4Address("192.0.2.50"), ipaddress.IPv4Address("192.0.2.1")
    assert [a.ip for a in facts.addresses] == [stale, own] and facts.moving == {stale}
    assert facts.sender_for(ipaddress.IPv4Network("192.0.2.0/24")) == own
    assert facts.sender_for(ipaddress.IPv4Network("198.51.100.0/24")) == own  # (outside: any of ours)

"""Routed VIPs with real BIRD 2: a router namespace peering with BIRD on every host, vipd holding the
VIPs on lo and each host's fixed BGP source address. `birdc show route` on the router is the oracle:
the VIP/32 is routed to exactly the owner and moves on failover (convergence printed); an anycast VIP
is one multipath route over every healthy host; the router accepts sessions only from the fixed
source addresses. The BIRD configs are the shipped conf/bird2-vipd.conf and conf/router-bird2.conf.

Namespaces vtg<random> (+ the router vtg<random>r); every BIRD is stopped at teardown; traffic stays
in the lab (198.18.0.0/24 exists only in the router's table)."""

from __future__ import annotations

import ipaddress
import re
import secrets
import shutil
import signal
import socket
import time
from typing import Any, Callable, Iterator

import pytest

from vipd.lab import netns
from vipd.lab.bgp import VIP_RANGE, BgpLab, kernel_nexthops, watch_routes
from vipd.lab.frr import Frr, frr_config
from vipd.lab.cluster import Cluster, VipDef
from vipd.lab.topology import Lab


_SINCE = re.compile(r"\b(\d\d):(\d\d):(\d\d)\.(\d{3})\b")


def same_session(now: str, before: str) -> bool:
    """`birdc show protocols` twice shows one session (no flap): the same lines, and the same
    "since", up to the millisecond BIRD's display of it jitters by (it turns a monotonic time into
    wall time each time it prints: CI saw .805 then .806 with no state change)."""
    def split(text: str) -> tuple[str, list[float]]:
        times = [int(h) * 3600 + int(m) * 60 + int(sec) + int(ms) / 1000 for h, m, sec, ms in _SINCE.findall(text)]
        return _SINCE.sub("T", text), times
    (a, ta), (b, tb) = split(now), split(before)
    return a == b and len(ta) == len(tb) and all(abs(x - y) <= 0.01 for x, y in zip(ta, tb))

pytestmark = pytest.mark.needs_tools("bird", "birdc")  # tests/conftest.py: skip, or fail under VIPD_REQUIRE_LAB

RT = "198.18.0.10/32"
ANY = "198.18.0.20/32"


@pytest.fixture
def lab() -> Iterator[Lab]:  # overrides conftest's: this module's namespaces are vtg<random>
    with Lab("vtg" + secrets.token_hex(2), n_hosts=3) as lab:
        yield lab


@pytest.fixture
def bgp(lab: Lab, tmp_path: Any) -> Iterator[BgpLab]:
    b = BgpLab(lab, tmp_path / "bird")
    try:
        yield b
    finally:
        b.stop()
        assert b.bird_pids() == [], "a BIRD process survived its stop"


def start(make_cluster: Callable[..., Cluster], bgp: BgpLab, vips: Callable[[str], list[VipDef]],
          **kw: Any) -> Cluster:
    """vipd on every host (`vips(host name)`: its [[vip]] tables) with [bgp], then every BIRD."""
    c = make_cluster(vips("h1"), start=False, **kw)
    bgp.configure(c)
    for h in bgp.lab.hosts:
        c.vips = vips(h.name)
        c.start(h)
    bgp.start()
    return c


def converge(bgp: BgpLab, prefix: str, until: Callable[[list[str]], bool], fault: Callable[[], object] = lambda: None,
             timeout: float = 10.0) -> tuple[float, list[Any]]:
    """t0, fault(), then watch the router's table: (seconds from t0 until its routes to `prefix` go via
    hosts that satisfy `until`, the lists of hosts seen on the way)."""
    t0 = time.monotonic()
    fault()
    states = watch_routes(bgp.router_bird, prefix, lambda hops: until([bgp.host_of(h) for h in hops]), timeout)
    print(f"  {prefix}: " + ", ".join(f"+{(s.t - t0) * 1000:.1f} ms {[bgp.host_of(h) for h in s.nexthops]}"
                                     for s in states))
    return states[-1].t - t0, [[bgp.host_of(h) for h in s.nexthops] for s in states]


def kernel_routes(lab: Lab, bgp: BgpLab, prefix: str, want: list[str], timeout: float = 2.0) -> None:
    """The router's kernel route to `prefix` goes (as one multipath route) via exactly `want`'s
    source addresses, within `timeout` (BIRD's kernel export follows its table within milliseconds)."""
    expected = sorted(bgp.sources[h] for h in want)
    deadline = time.monotonic() + timeout
    while (got := sorted(kernel_nexthops(lab, bgp.router, prefix))) != expected:
        assert time.monotonic() < deadline, f"router's kernel: {prefix} via {got}, expected {expected}"
        time.sleep(0.02)


def import_updates(bgp: BgpLab, host: str) -> int:
    """Updates the router received on its session with `host` (`show protocols all`)."""
    text = bgp.router_bird.birdc("show", "protocols", "all", host)
    m = re.search(r"Import updates:\s+(\d+)", text)
    assert m, text
    return int(m[1])


def test_router_routes_the_vip_to_its_owner_and_follows_failover(lab: Lab, make_cluster: Callable[..., Cluster],
                                                                  bgp: BgpLab) -> None:
    c = start(make_cluster, bgp, lambda _host: [VipDef("rt", RT, interface="lo")])
    router, rb = bgp.router, bgp.router_bird
    vip = ipaddress.ip_interface(RT).ip
    owner = c.wait_owner(vip)

    # sessions come up from the fixed source addresses, and only from them
    peers = lab.run(router, ["ss", "-Htn", "state", "established", "( sport = :179 or dport = :179 )"]).stdout
    assert sorted(line.split()[-1].rsplit(":", 1)[0] for line in peers.splitlines()) == sorted(bgp.sources.values())
    for h in lab.hosts:
        assert f"Source address:   {bgp.sources[h.name]}" in bgp.speakers[h.name].birdc("show", "protocols", "all",
                                                                                          "vipd_uplink")
    h1 = lab.hosts[0]
    s = netns.socket_in(h1.ns, socket.AF_INET, socket.SOCK_STREAM)
    try:  # from the host's NIC address: not a neighbour
        s.settimeout(2)
        s.bind((str(h1.ip.ip), 0))
        s.connect((str(router.ip.ip), 179))
    finally:
        s.close()
    deadline = time.monotonic() + 3
    while f"Unexpected connect from unknown address {h1.ip.ip}" not in rb.log.read_text():
        assert time.monotonic() < deadline, rb.log_tail()
        time.sleep(0.02)

    # the oracle: exactly the owner's route, in BIRD and in the router's kernel; and it answers.
    # (the owner's first export can follow its session's establishment by a moment: a CI run found
    # no route yet, right after the owner and the sessions were seen; never any other host's)
    _, seen_first = converge(bgp, RT, lambda hs: hs == [owner], timeout=5.0)
    assert all(hs in ([], [owner]) for hs in seen_first), seen_first
    assert bgp.announcers(RT) == [owner]
    assert rb.routes(RT) == [bgp.sources[owner]]
    kernel_routes(lab, bgp, RT, [owner])
    for h in lab.hosts:
        exported = bgp.speakers[h.name].birdc("show", "route", "export", "vipd_uplink")
        assert (RT in exported) == (h.name == owner), exported  # the source address itself never
        assert bgp.sources[h.name] not in exported
    assert lab.ping(router, vip)
    # vipd refreshes the address lifetime every keepalive (RTM_NEWADDR each time): no BGP update for that
    before = import_updates(bgp, owner)
    time.sleep(1.2)
    assert import_updates(bgp, owner) == before

    # planned handover: the owner's vipd stops; the route moves to the new owner, never to two hosts
    took_term, seen = converge(bgp, RT, lambda hs: len(hs) == 1 and hs[0] != owner,
                               lambda: c.signal(c.host(owner), signal.SIGTERM))
    assert all(len(hs) <= 1 for hs in seen), seen
    new = c.wait_owner(vip, exclude=[owner])
    assert bgp.announcers(RT) == [new]
    kernel_routes(lab, bgp, RT, [new])
    assert lab.ping(router, vip)
    # the stopped host keeps its source address, and so its BGP session: nothing else moved
    assert rb.protocols()[owner] == "Established"

    # crash: SIGKILL; the kernel lifetime ends the old route, then the next owner's appears
    took_kill, seen_kill = converge(bgp, RT, lambda hs: len(hs) == 1 and hs[0] not in (owner, new),
                                    lambda: c.signal(c.host(new), signal.SIGKILL))
    assert all(len(hs) <= 1 for hs in seen_kill), seen_kill
    last = c.wait_owner(vip, exclude=[owner, new])
    assert bgp.announcers(RT) == [last]
    print(f"\nBGP convergence (fault -> router's `show route` names the new owner): "
          f"SIGTERM {took_term * 1000:.0f} ms ({' -> '.join(map(str, seen))}), "
          f"SIGKILL {took_kill * 1000:.0f} ms ({' -> '.join(map(str, seen_kill))})")
    assert took_term < 3.0 and took_kill < 8.0


def test_anycast_vip_is_one_multipath_route_over_every_healthy_host(lab: Lab, make_cluster: Callable[..., Cluster],
                                                                   bgp: BgpLab, tmp_path: Any) -> None:
    flags = {h.name: tmp_path / f"{h.name}.ok" for h in lab.hosts}  # each host's service check passes while it exists
    for f in flags.values():
        f.touch()

    def vips(host: str) -> list[VipDef]:
        check = {"type": "command", "command": ["/usr/bin/test", "-e", str(flags[host])], "interval": 0.2,
                 "timeout": 0.2, "rise": 2, "fall": 2}
        return [VipDef("any", ANY, interface="lo", extra={"mode": "anycast", "check": [check]})]

    c = start(make_cluster, bgp, vips, monitor=False)
    router, rb = bgp.router, bgp.router_bird
    vip = ipaddress.ip_interface(ANY).ip
    everyone = sorted(h.name for h in lab.hosts)
    c.wait_holders(vip, lambda hs: sorted(hs) == everyone)
    converge(bgp, ANY, lambda hs: sorted(hs) == everyone, timeout=5)
    assert sorted(rb.routes(ANY)) == sorted(bgp.sources.values())  # one BGP route per host
    kernel_routes(lab, bgp, ANY, everyone)  # merged into one multipath route
    # fib_multipath_hash_policy = 1: flows (by port) spread over the hosts
    gets = "".join(f"route get {vip} from {router.ip.ip} ipproto tcp sport {40000 + i} dport 443\n" for i in range(64))
    chosen = netns.run(["ip", "-n", router.ns, "-batch", "-"], input=gets).stdout
    assert {bgp.host_of(m[1]) for m in re.finditer(r" via (\S+)", chosen)} == set(everyone), chosen
    assert lab.ping(router, vip)

    # the service fails on one host: it leaves the multipath route, and comes back when healthy again
    sick = lab.hosts[1].name
    took_sick, seen_sick = converge(bgp, ANY, lambda hs: sick not in hs and len(hs) == 2, flags[sick].unlink)
    kernel_routes(lab, bgp, ANY, [h for h in everyone if h != sick])
    flags[sick].touch()
    converge(bgp, ANY, lambda hs: sorted(hs) == everyone)
    kernel_routes(lab, bgp, ANY, everyone)

    stopped, killed, last = lab.hosts[1].name, lab.hosts[0].name, lab.hosts[2].name
    # SIGTERM: vipd releases its copy at once; the route loses that next hop
    took, seen = converge(bgp, ANY, lambda hs: sorted(hs) == sorted([killed, last]),
                          lambda: c.signal(c.host(stopped), signal.SIGTERM))
    kernel_routes(lab, bgp, ANY, [killed, last])
    # SIGKILL: its copy stays until its kernel lifetime runs out, then the route loses it
    took_kill, seen_kill = converge(bgp, ANY, lambda hs: hs == [last], lambda: c.signal(c.host(killed), signal.SIGKILL))
    kernel_routes(lab, bgp, ANY, [last])
    assert lab.ping(router, vip)
    print(f"\nanycast convergence (fault -> the host leaves the router's multipath route): "
          f"check failing {took_sick * 1000:.0f} ms ({' -> '.join(map(str, seen_sick))}), "
          f"SIGTERM {took * 1000:.0f} ms ({' -> '.join(map(str, seen))}), "
          f"SIGKILL {took_kill * 1000:.0f} ms ({' -> '.join(map(str, seen_kill))})")


@pytest.mark.needs_tools("/usr/lib/frr/zebra", "/usr/lib/frr/bgpd", "vtysh")
def test_frr_snippet_announces_exactly_the_vips_on_lo(lab: Lab, bgp: BgpLab) -> None:
    """conf/frr-vipd.conf (zebra + bgpd) on h1 against the router: /32s on lo inside the VIP range are
    announced from the fixed source address and withdrawn with the address; nothing else is."""
    h1 = lab.hosts[0]
    src = bgp.sources[h1.name]
    netns.ip_batch([f"addr add {src}/32 dev lo",  # (vipd would keep it there)
                    "addr add 198.18.0.30/32 dev lo",  # a VIP
                    "addr add 198.18.1.5/32 dev lo",  # outside the VIP range
                    f"addr add 198.18.0.77/24 dev {h1.ifname}"], ns=h1.ns)  # in the range, but not a /32 on lo
    bgp.router_bird.start()
    frr = Frr(lab, h1, frr_config(src, str(bgp.router.ip.ip), VIP_RANGE)).start()
    try:
        bgp.router_bird.wait_established([h1.name], timeout=10)
        watch_routes(bgp.router_bird, "198.18.0.30/32", lambda hops: hops == (src,), timeout=5)  # initial update: ~1 s
        routes = bgp.router_bird.route_table()  # everything the router has
        assert [(r.net, r.nexthops) for r in routes] == [("198.18.0.30/32", (src,))], routes
        lab.ip(h1, "addr", "del", "198.18.0.30/32", "dev", "lo")
        watch_routes(bgp.router_bird, "198.18.0.30/32", lambda hops: not hops, timeout=3)
        lab.ip(h1, "addr", "add", "198.18.0.31/32", "dev", "lo")
        watch_routes(bgp.router_bird, "198.18.0.31/32", lambda hops: hops == (src,), timeout=3)
        assert "Source address:   10.213.0.1" in bgp.router_bird.birdc("show", "protocols", "all", h1.name)
        # the host's NIC is renumbered: the session (from the fixed source) and the route stay
        session = bgp.router_bird.birdc("show", "protocols", h1.name)
        import threading

        t = threading.Thread(target=lambda: (time.sleep(0.3), _renumber(lab, h1, 150)))
        t.start()
        seen = watch_route_kept(bgp, "198.18.0.31/32", (src,), 4.0)
        t.join()
        assert seen == [(src,)], f"the router's route went through {seen}"
        assert same_session(bgp.router_bird.birdc("show", "protocols", h1.name), session)  # no flap
    finally:
        frr.stop()


def _renumber(lab: Lab, host: Any, new_offset: int) -> str:
    """Give `host`'s NIC a new address in its subnet (add the new one, then delete the old one), as
    an operator renumbering a host does; returns the new address."""
    net = ipaddress.ip_interface(host.ip).network
    new = f"{net[new_offset]}/{net.prefixlen}"
    lab.ip(host, "addr", "add", new, "dev", host.ifname)
    lab.ip(host, "addr", "del", str(host.ip), "dev", host.ifname)
    return new


def watch_route_kept(bgp: BgpLab, prefix: str, hops: tuple[str, ...], duration: float) -> list[tuple[str, ...]]:
    """Sample the router's BIRD table for `duration` s (every ~2 ms); every distinct state seen."""
    seen: list[tuple[str, ...]] = []
    end = time.monotonic() + duration
    while time.monotonic() < end:
        now = tuple(sorted(bgp.router_bird.routes(prefix, fast=True)))
        if not seen or seen[-1] != now:
            seen.append(now)
        time.sleep(0.002)
    return seen


def test_a_nic_address_change_keeps_the_session_and_the_route(lab: Lab, make_cluster: Callable[..., Cluster],
                                                             bgp: BgpLab) -> None:
    """The owner's NIC is renumbered (new address added, old one deleted): with the shipped BIRD
    snippet the session from the fixed source address stays up and the router never loses the VIP's
    route (with a `direct` session BIRD dropped it for ~1.1 s: it ties the session to the interface
    address covering the neighbour)."""
    c = start(make_cluster, bgp, lambda _host: [VipDef("rt", RT, interface="lo")])
    vip = ipaddress.ip_interface(RT).ip
    owner = c.wait_owner(vip)
    src = bgp.sources[owner]
    watch_routes(bgp.router_bird, RT, lambda hops: hops == (src,), timeout=10)
    session = bgp.router_bird.birdc("show", "protocols", owner)
    host = c.host(owner)
    done: list[str] = []
    import threading

    t = threading.Thread(target=lambda: (time.sleep(0.3), done.append(_renumber(lab, host, 150))))
    t.start()
    seen = watch_route_kept(bgp, RT, (src,), 4.0)
    t.join()
    assert done, "the renumbering did not run"
    assert seen == [(src,)], f"the router's route to {RT} went through {seen}"
    assert bgp.router_bird.protocols()[owner] == "Established"
    assert bgp.speakers[owner].protocols()["vipd_uplink"] == "Established"
    assert same_session(bgp.router_bird.birdc("show", "protocols", owner), session)  # same "since": no flap
    assert c.wait_owner(vip) == owner

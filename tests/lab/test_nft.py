"""vipd's nftables table against a real kernel: egress SNAT that follows arm/disarm and the lease
timeout, the BGP source SNAT, and the ruleset as `nft list ruleset` shows it.

Two namespaces per test, vtn<tag>h (the host) and vtn<tag>s (a server), joined by one veth pair;
both are deleted by the fixture, also when the test fails. Traffic stays between them.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator

import pytest
import trio

from vipd.dataplane.netlink import Netlink
from vipd.dataplane.nft import BgpSnat, EgressRule, NftError, NftManager
from vipd.lab import netns
from vipd.lab.topology import Lab

IP = ipaddress.ip_address
NET = ipaddress.ip_network


def sh(*argv: str, input: str | None = None) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=10, input=input)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed: {r.stderr.strip()}")
    return r.stdout


@dataclass
class Pair:
    """host ns (NIC hnic: 10.77.0.1, fd77::1) <-> server ns (snic: 10.77.0.2, fd77::2).
    VIPs 10.77.0.10 and fd77::10 (deprecated: never picked as source by itself) are on hnic;
    the BGP source 10.99.0.1 is on the host's lo, and the server routes it back to the host."""

    host: str
    server: str
    hnic: str
    snic: str
    vip4 = IP("10.77.0.10")
    vip6 = IP("fd77::10")
    host4 = IP("10.77.0.1")
    host6 = IP("fd77::1")
    server4 = IP("10.77.0.2")
    server6 = IP("fd77::2")
    bgp_source = IP("10.99.0.1")

    def nft(self, *args: str, ns: str | None = None, input: str | None = None) -> str:
        return sh("ip", "netns", "exec", ns or self.host, "nft", *args, input=input)

    def ruleset(self) -> str:
        return self.nft("list", "ruleset")

    def connect(self, dst: Any, port: int) -> tuple[Any, Any]:
        return connect(self.host, self.server, dst, port)


def connect(client_ns: str, server_ns: str, dst: Any, port: int) -> tuple[Any, Any]:
    """One TCP connection client -> server (listening on ``dst``): (the client socket's own
    address, the source address the server saw)."""
    family = socket.AF_INET if dst.version == 4 else socket.AF_INET6
    srv = netns.socket_in(server_ns, family, socket.SOCK_STREAM)
    cli = netns.socket_in(client_ns, family, socket.SOCK_STREAM)
    try:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((str(dst), port))
        srv.listen(4)
        srv.settimeout(3)
        cli.settimeout(3)
        cli.connect((str(dst), port))
        conn, peer = srv.accept()
        conn.close()
        return IP(cli.getsockname()[0]), IP(peer[0])
    finally:
        cli.close()
        srv.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    tag = secrets.token_hex(2)
    p = Pair(host=f"vtn{tag}h", server=f"vtn{tag}s", hnic=f"vtn{tag}h", snic=f"vtn{tag}s")
    made: list[str] = []
    try:
        for ns in (p.host, p.server):
            sh("ip", "netns", "add", ns)
            made.append(ns)
            # no DAD: link-local addresses usable at once (a tentative one stalls neighbour discovery)
            netns.sysctl(ns, {"net.ipv6.conf.all.accept_dad": 0, "net.ipv6.conf.default.accept_dad": 0})
        sh("ip", "link", "add", p.hnic, "netns", p.host, "type", "veth", "peer", "name", p.snic, "netns", p.server)
        netns.ip_batch([
            "link set lo up", f"link set {p.hnic} up",
            f"addr add {p.host4}/24 dev {p.hnic}", f"addr add {p.host6}/64 dev {p.hnic} nodad",
            f"addr add {p.vip4}/32 dev {p.hnic}", f"addr add {p.vip6}/128 dev {p.hnic} nodad preferred_lft 0",
            f"addr add {p.bgp_source}/32 dev lo",
        ], ns=p.host)
        netns.ip_batch([
            "link set lo up", f"link set {p.snic} up",
            f"addr add {p.server4}/24 dev {p.snic}", f"addr add {p.server6}/64 dev {p.snic} nodad",
            f"route add {p.bgp_source}/32 via {p.host4}",
        ], ns=p.server)
        yield p
    finally:
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


@pytest.fixture
async def nft(pair: Pair) -> Any:
    async with Netlink(pair.host) as nl, NftManager(nl) as m:
        yield m


def web_rule(p: Pair, port: int = 8443) -> EgressRule:
    return EgressRule("web", p.vip4, dst=(NET(f"{p.server4}/32"),), proto="tcp", dports=(port,), oifname=p.hnic)


EXPECTED_ONE_RULE = """\
table inet vipd {{
	comment "managed by vipd; do not edit"
	set eg_web_dst {{
		type ipv4_addr
		flags interval,timeout
		comment "vip 10.77.0.10"
	}}

	set eg_web_ports {{
		type inet_service
		elements = {{ 8443 }}
	}}

	chain postrouting {{
		type nat hook postrouting priority srcnat; policy accept;
		ip daddr @eg_web_dst tcp dport @eg_web_ports oifname "{nic}" snat ip to 10.77.0.10 comment "vipd egress web"
	}}
}}
"""


async def test_ruleset_for_one_rule_is_exact_and_idempotent(pair: Pair, nft: NftManager) -> None:
    rule = web_rule(pair)
    await nft.ensure_base([rule])
    first = pair.ruleset()
    assert first == EXPECTED_ONE_RULE.format(nic=pair.hnic)
    await nft.ensure_base([rule])
    assert pair.ruleset() == first  # no duplicates

    await nft.arm(pair.vip4, 30_000)
    armed = pair.ruleset()
    assert re.search(r"elements = \{ 10\.77\.0\.2 timeout 30s expires 29s9\d\dms \}", armed), armed
    # a restart (new socket, new manager) converges to the same table and keeps the arm, never extends it
    async with Netlink(pair.host) as nl2, NftManager(nl2) as again:
        await again.ensure_base([rule])
        left = (await again.armed())[pair.vip4]
    assert 29_000 < left <= 30_000
    def no_times(text: str) -> str:  # re-armed for the time it had left: timeout = expires = left
        return re.sub(r"timeout \S+ expires \S+", "", text)

    assert no_times(pair.ruleset()) == no_times(armed)
    assert pair.ruleset().count("snat ip to") == 1


async def test_egress_follows_arm_and_disarm(pair: Pair, nft: NftManager) -> None:
    await nft.ensure_base([web_rule(pair)])
    assert pair.connect(pair.server4, 8443)[1] == pair.host4  # not armed: nothing applies
    await nft.arm(pair.vip4, 10_000)
    assert await nft.armed() == {pair.vip4: pytest.approx(10_000, abs=100)}
    cli, seen = pair.connect(pair.server4, 8443)
    assert (cli, seen) == (pair.host4, pair.vip4)  # SNAT: the socket keeps the host address
    assert pair.connect(pair.server4, 8080)[1] == pair.host4  # another port: the rule does not match
    await nft.disarm(pair.vip4)
    assert await nft.armed() == {}
    assert pair.connect(pair.server4, 8443)[1] == pair.host4
    await nft.disarm(pair.vip4)  # idempotent


async def test_ipv6_rule_any_destination(pair: Pair, nft: NftManager) -> None:
    rule = EgressRule("all6", pair.vip6)  # no selectors: every IPv6 destination
    await nft.ensure_base([web_rule(pair), rule])
    assert pair.connect(pair.server6, 8080)[1] == pair.host6
    await nft.arm(pair.vip6, 10_000)
    assert "ip6 daddr @eg_all6_dst snat ip6 to fd77::10" in pair.ruleset()
    assert "elements = { ::/0 timeout 10s" in pair.ruleset()
    assert pair.connect(pair.server6, 8080)[1] == pair.vip6
    assert pair.connect(pair.server4, 8443)[1] == pair.host4  # the IPv4 VIP is not armed
    await nft.disarm(pair.vip6)
    assert pair.connect(pair.server6, 8080)[1] == pair.host6


async def wait_disarmed(nft: NftManager, vip: Any, limit: float) -> float:
    """trio time at which ``vip`` has no armed element left (polled every 5 ms)."""
    with trio.fail_after(limit):
        while vip in await nft.armed():
            await trio.sleep(0.005)
    return trio.current_time()


@pytest.mark.parametrize("timeout_update", [True, False], ids=["timeout-update", "flush-add"])
async def test_refresh_resets_the_timeout(pair: Pair, timeout_update: bool) -> None:
    async with Netlink(pair.host) as nl, NftManager(nl, timeout_update=timeout_update) as nft:
        await nft.ensure_base([web_rule(pair)])
        start = trio.current_time()
        await nft.arm(pair.vip4, 600)
        await trio.sleep(0.4)
        refreshed = trio.current_time()
        await nft.arm(pair.vip4, 600)
        await trio.sleep(start + 0.75 - trio.current_time())  # past the first deadline
        assert pair.connect(pair.server4, 8443)[1] == pair.vip4, "expired at the first deadline"
        gone = await wait_disarmed(nft, pair.vip4, 2) - refreshed
        assert 0.55 <= gone <= 0.7, gone  # 4 ms ticks, rounded down; 5 ms polling
        assert pair.connect(pair.server4, 8443)[1] == pair.host4
        await nft.arm(pair.vip4, 5_000)  # an expired element can be armed again
        assert pair.connect(pair.server4, 8443)[1] == pair.vip4


async def test_arm_shortens_a_longer_timeout(pair: Pair, nft: NftManager) -> None:
    """A refresh sets the deadline, it never keeps a later one (e.g. after a lease got shorter)."""
    await nft.ensure_base([web_rule(pair)])
    await nft.arm(pair.vip4, 60_000)
    await nft.arm(pair.vip4, 300)
    assert 250 <= (await nft.armed())[pair.vip4] <= 300
    assert "timeout 300ms expires" in pair.ruleset()


REFRESHER = """
import ipaddress, sys, trio
from vipd.dataplane.netlink import Netlink
from vipd.dataplane.nft import EgressRule, NftManager
ns, nic = sys.argv[1], sys.argv[2]
rule = EgressRule("web", ipaddress.ip_address("10.77.0.10"), dst=(ipaddress.ip_network("10.77.0.2/32"),),
                  proto="tcp", dports=(8443,), oifname=nic)
async def main():
    async with Netlink(ns) as nl, NftManager(nl) as nft:
        await nft.ensure_base([rule])
        while True:
            await nft.arm(rule.vip, 500)
            print("armed", flush=True)
            await trio.sleep(0.05)
trio.run(main)
"""


async def test_rules_stop_when_the_refresher_is_sigkilled(pair: Pair, nft: NftManager) -> None:
    proc = subprocess.Popen([sys.executable, "-c", REFRESHER, pair.host, pair.hnic],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for _ in range(5):  # a few refreshes
            assert proc.stdout.readline() == "armed\n"
        assert pair.connect(pair.server4, 8443)[1] == pair.vip4
        killed = trio.current_time()
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    gone = await wait_disarmed(nft, pair.vip4, 2) - killed
    assert 0.4 <= gone <= 0.6, gone  # last refresh (<= 50 ms before the kill) + 500 ms
    assert pair.connect(pair.server4, 8443)[1] == pair.host4


USER_TABLES = """
table inet vtuser {
	set blocked {
		type ipv4_addr
		flags interval
		elements = { 192.0.2.0/24 }
	}
	chain post {
		type nat hook postrouting priority srcnat + 5; policy accept;
		ip daddr @blocked masquerade
	}
	chain out {
		type filter hook output priority 0; policy accept;
		ip daddr 198.51.100.1 drop comment "user"
	}
}
table ip vipd {
	chain c {
		type filter hook forward priority 0; policy accept;
		ip saddr 203.0.113.0/24 accept
	}
}
"""


async def test_other_tables_are_untouched(pair: Pair, nft: NftManager) -> None:
    pair.nft("-f", "-", input=USER_TABLES)  # incl. a user's `table ip vipd`: same name, other family

    def user_view() -> str:
        return pair.nft("-a", "list", "table", "inet", "vtuser") + pair.nft("-a", "list", "table", "ip", "vipd")

    before = user_view()
    await nft.ensure_base([web_rule(pair)], BgpSnat(pair.bgp_source, (pair.server4,)))
    await nft.arm(pair.vip4, 5_000)
    await nft.ensure_base([web_rule(pair)])
    await nft.disarm(pair.vip4)
    assert user_view() == before
    await nft.remove_all()
    assert user_view() == before
    assert "table inet vipd" not in pair.ruleset()
    await nft.remove_all()  # absent is fine
    with pytest.raises(NftError, match="ensure_base"):
        await nft.arm(pair.vip4, 1_000)


async def test_arm_rebuilds_a_deleted_table(pair: Pair, nft: NftManager) -> None:
    await nft.ensure_base([web_rule(pair)], BgpSnat(pair.bgp_source, (pair.server4,)))
    expected = pair.ruleset()
    pair.nft("delete", "table", "inet", "vipd")  # e.g. `nft flush ruleset`: the rules fail open...
    await nft.arm(pair.vip4, 5_000)  # ...until the next refresh, which puts everything back
    assert re.sub(r"\s*elements = \{ 10\.77\.0\.2 timeout 5s expires \S+ \}", "", pair.ruleset()) == expected
    assert pair.connect(pair.server4, 8443)[1] == pair.vip4


async def test_bgp_snat_sends_port_179_from_the_source(pair: Pair, nft: NftManager) -> None:
    await nft.ensure_base([], BgpSnat(pair.bgp_source, (pair.server4,)))
    assert "ip daddr @bgp_peers tcp dport 179 snat ip to 10.99.0.1" in pair.ruleset()
    cli, seen = pair.connect(pair.server4, 179)
    assert seen == pair.bgp_source and cli == pair.host4  # not lease-bound; the socket is not rebound
    assert pair.connect(pair.server4, 8080)[1] == pair.host4


def test_refresh_cost(pair: Pair) -> None:
    """Not a benchmark gate: a sanity bound (one batch per arm, well under a millisecond here)."""

    async def main() -> float:
        async with Netlink(pair.host) as nl, NftManager(nl) as nft:
            await nft.ensure_base([web_rule(pair)])
            t = time.perf_counter()
            for _ in range(200):
                await nft.arm(pair.vip4, 5_000)
            return (time.perf_counter() - t) / 200

    per_call = trio.run(main)
    assert per_call < 0.005, per_call


async def test_egress_source_moves_with_a_failover() -> None:
    """Two hosts and a server on one segment (vipd.lab's Lab; its client node is the server): the
    server sees egress from the VIP from the owner only, before and after the VIP moves."""
    with Lab("vtn" + secrets.token_hex(2), n_hosts=2) as lab:
        h1, h2, server = lab.hosts[0], lab.hosts[1], lab.client
        vip, dst = lab.vip4(1), server.ip.ip
        rule = EgressRule("out", vip.ip, dst=(NET(f"{dst}/32"),), proto="tcp")

        def seen(h: Any) -> Any:
            return connect(h.ns, server.ns, dst, 9000)[1]

        async with Netlink(h1.ns) as nl1, NftManager(nl1) as nft1, Netlink(h2.ns) as nl2, NftManager(nl2) as nft2:
            for m in (nft1, nft2):
                await m.ensure_base([rule])
            lab.ip(h1, "addr", "add", str(vip), "dev", h1.ifname)  # h1 owns the VIP
            await nft1.arm(vip.ip, 10_000)
            assert (seen(h1), seen(h2)) == (vip.ip, h2.ip.ip)

            await nft1.disarm(vip.ip)  # release on h1 ...
            lab.ip(h1, "addr", "del", str(vip), "dev", h1.ifname)
            lab.ip(h2, "addr", "add", str(vip), "dev", h2.ifname)  # ... take over on h2
            lab.announce(h2, vip.ip)
            await nft2.arm(vip.ip, 10_000)
            assert (seen(h1), seen(h2)) == (h1.ip.ip, vip.ip)
            assert await nft1.armed() == {} and vip.ip in await nft2.armed()
            assert "elements" not in lab.run(h1, ["nft", "list", "set", "inet", "vipd", rule.set_name()]).stdout

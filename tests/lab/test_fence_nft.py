"""The nftables token fence against a real kernel, in a vt* lab (bridge, client, hosts h1..h3).

The VIP (vip4(1), vip6(1)) is on h1's NIC; the client pings it, resolves it, talks TCP to it.
The oracle for "h1 sends nothing from the VIP" is a `table bridge vtwatch` of counters in the
bridge namespace (frames from h1's MAC sourced from the VIP, ARP from it, NA for it).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import trio

from tests.lab.util import wait_for
from vipd.config import VipSpec
from vipd.dataplane.fence_build import chain_names
from vipd.dataplane.fence_wire import MIN_TOKEN_MS
from vipd.dataplane.fence_nft import FenceError, NftFence
from vipd.dataplane.netlink import Netlink
from vipd.peers.grants import GrantWriter
from vipd.peers.transport import loop_clock
from vipd.lab import netns
from vipd.lab.topology import Lab

TOKEN_S = 0.3  # the short token of the lapse tests
SLACK_S = 1.0  # generous: the shared 2-core machine


def vips_of(lab: Lab) -> list[VipSpec]:
    return [VipSpec("v4", lab.vip4(1), lab.nic), VipSpec("v6", lab.vip6(1), lab.nic)]


def put_vips(lab: Lab) -> None:
    h1 = lab.host("h1")
    lab.ip(h1, "addr", "add", str(lab.vip4(1)), "dev", lab.nic)
    lab.ip(h1, "addr", "add", str(lab.vip6(1)), "dev", lab.nic, "nodad")


def nft(lab: Lab, ns: str, *args: str) -> str:
    return lab.run(ns, ["nft", *args]).stdout


def watch(lab: Lab) -> None:
    """Counters in the bridge for everything h1 sends from (or announces for) the VIPs."""
    h1 = lab.host("h1")
    v4, v6 = lab.vip4(1).ip, lab.vip6(1).ip
    target = "0x" + v6.packed.hex()
    text = f"""table bridge vtwatch {{
  chain vtsee {{ type filter hook forward priority 0; policy accept;
    ether saddr {h1.mac} ip saddr {v4} counter
    ether saddr {h1.mac} arp saddr ip {v4} counter
    ether saddr {h1.mac} ip6 saddr {v6} counter
    ether saddr {h1.mac} icmpv6 type nd-neighbor-advert @th,64,128 {target} counter
  }}
}}
"""
    subprocess.run(netns.exec_argv(lab.bridge_ns, ["nft", "-f", "-"]), input=text, text=True, check=True,
                   capture_output=True, timeout=10)


def seen(lab: Lab) -> list[int]:
    """Packets counted by each vtwatch rule (ipv4, arp, ipv6, na)."""
    doc = json.loads(nft(lab, lab.bridge_ns, "-j", "list", "table", "bridge", "vtwatch"))
    out = []
    for item in doc["nftables"]:
        rule = item.get("rule")
        if rule:
            out.append(next(e["counter"]["packets"] for e in rule["expr"] if "counter" in e))
    return out


def neighbour(lab: Lab, ip: Any) -> str:
    """The client's neighbour entry for ip ('' if none)."""
    return lab.ip(lab.client, "neigh", "show", str(ip), "dev", lab.nic).stdout.strip()


def resolved(lab: Lab, ip: Any) -> bool:
    return "lladdr" in neighbour(lab, ip)


def reachable(lab: Lab) -> bool:
    """Both VIPs answer the client's ping (fresh neighbour resolution first)."""
    lab.ip(lab.client, "neigh", "flush", "dev", lab.nic)
    return all(lab.ping(lab.client, ip, count=1, timeout=0.5) for ip in (lab.vip4(1), lab.vip6(1)))


def dark(lab: Lab) -> bool:
    """Neither VIP answers ping, ARP or ND (a fresh resolution is attempted)."""
    lab.ip(lab.client, "neigh", "flush", "dev", lab.nic)
    if any(lab.ping(lab.client, ip, count=2, timeout=0.4) for ip in (lab.vip4(1), lab.vip6(1))):
        return False
    return not resolved(lab, lab.vip4(1).ip) and not resolved(lab, lab.vip6(1).ip)


def tcp_pair(lab: Lab, port: int) -> tuple[socket.socket, socket.socket, socket.socket]:
    """(listener on h1 at the VIP, client socket, accepted server socket), connected."""
    srv = netns.socket_in(lab.host("h1").ns, socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((str(lab.vip4(1).ip), port))
    srv.listen(4)
    srv.settimeout(3)
    cli = netns.socket_in(lab.client.ns, socket.AF_INET, socket.SOCK_STREAM)
    cli.settimeout(3)
    cli.connect((str(lab.vip4(1).ip), port))
    conn, _ = srv.accept()
    conn.settimeout(1.5)
    return srv, cli, conn


def tcp_connects(lab: Lab, port: int) -> bool:
    cli = netns.socket_in(lab.client.ns, socket.AF_INET, socket.SOCK_STREAM)
    cli.settimeout(1.0)
    try:
        cli.connect((str(lab.vip4(1).ip), port))
        return True
    except OSError:
        return False
    finally:
        cli.close()


async def test_token_gates_traffic_and_lapses_by_itself(lab: Lab) -> None:
    put_vips(lab)
    watch(lab)
    vips = vips_of(lab)
    async with Netlink(lab.host("h1").ns) as nl, NftFence(nl) as fence:
        assert fence.covers(vips) and not fence.covers([VipSpec("r", lab.vip4(2), "lo")])
        await fence.ensure(vips[:1])
        assert fence.covers(vips[:1]) and not fence.covers(vips)  # set up: only what the table fences
        await fence.ensure(vips)
        assert fence.covers(vips)
        # managed without a token: dropped from the start
        assert await trio.to_thread.run_sync(dark, lab)
        await fence.arm(vips, trio.current_time() + 60)
        assert await trio.to_thread.run_sync(reachable, lab)
        srv, cli, conn = await trio.to_thread.run_sync(tcp_pair, lab, 8080)
        try:
            cli.sendall(b"hello")
            assert conn.recv(5) == b"hello"
            before = seen(lab)
            assert before[0] > 0 and before[1] > 0 and before[2] > 0  # the oracle sees h1's traffic
            # a short token, then nothing: the kernel alone ends it
            until = trio.current_time() + TOKEN_S
            await fence.arm(vips, until)
            assert fence.armed_until(vips) == until
            await trio.sleep_until(until + 0.05)
            after_deadline = seen(lab)
            assert await trio.to_thread.run_sync(dark, lab)
            assert not await trio.to_thread.run_sync(tcp_connects, lab, 8080)
            cli.sendall(b"stalled")  # the established connection stalls (no reset, no data)
            with pytest.raises(socket.timeout):
                conn.recv(7)
            for ip in (lab.vip4(1).ip, lab.vip6(1).ip):  # AF_PACKET frames from the VIP: dropped too
                try:
                    lab.announce(lab.host("h1"), ip)
                except OSError as e:  # the egress hook's drop, reported to the sender
                    assert e.errno == errno.ENOBUFS
            assert seen(lab) == after_deadline  # h1 sent nothing from (or for) the VIPs
            assert fence.lapses() == 0
            assert not await fence.verify()
            assert fence.lapses() == 2  # each lapsed element is noticed, once
            assert not await fence.verify() and fence.lapses() == 2
            # a new proof re-opens it; the stalled connection resumes
            await fence.arm(vips, trio.current_time() + 60)
            assert await trio.to_thread.run_sync(reachable, lab)
            assert conn.recv(7) == b"stalled"
        finally:
            for s in (cli, conn, srv):
                s.close()
        # disarm cuts at once
        await fence.disarm(vips)
        assert fence.armed_until(vips) is None
        assert await trio.to_thread.run_sync(dark, lab)
        await fence.remove_all()


REFRESHER = r"""
import ipaddress, os, sys, time, trio
from vipd.config import VipSpec
from vipd.dataplane.netlink import Netlink
from vipd.dataplane.fence_nft import NftFence
state, go, iface, lifetime, *addrs = sys.argv[1:]
vips = [VipSpec(f"v{i}", ipaddress.ip_interface(a), iface) for i, a in enumerate(addrs)]
async def main():
    async with Netlink() as nl, NftFence(nl) as fence:
        await fence.ensure(vips)
        last = time.monotonic()
        while True:
            # frozen meanwhile (in the sleep or inside arm()): nothing until a new proof comes
            if time.monotonic() - last > 0.2:
                with open(state, "a") as f:
                    f.write("frozen\n")
                while not os.path.exists(go):
                    await trio.sleep(0.01)
            proof = time.monotonic()
            await fence.arm(vips, trio.current_time() + float(lifetime))
            if time.monotonic() - proof > 0.2:
                last = proof  # the freeze hit inside arm(): the top of the loop reports it
                continue
            last = proof
            with open(state, "a") as f:
                f.write(f"armed {last}\n")
            await trio.sleep(0.02)
trio.run(main)
"""


def start_refresher(lab: Lab, tmp: Path) -> tuple[subprocess.Popen[bytes], Path, Path]:
    state, go = tmp / "state", tmp / "go"
    argv = [sys.executable, "-c", REFRESHER, str(state), str(go), lab.nic, str(TOKEN_S),
            str(lab.vip4(1)), str(lab.vip6(1))]
    proc = lab.popen(lab.host("h1"), argv, log=tmp / "refresher.log")
    wait_for(lambda: state.exists() and "armed" in state.read_text(), 20, "the refresher's first arm")
    return proc, state, go


def last_refresh(state: Path) -> float:
    return max(float(line.split()[1]) for line in state.read_text().splitlines() if line.startswith("armed"))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP])
def test_dead_or_frozen_refresher_loses_the_vip(lab: Lab, tmp_path: Path, sig: signal.Signals) -> None:
    put_vips(lab)
    proc, state, go = start_refresher(lab, tmp_path)
    assert wait_for(lambda: reachable(lab), 10, "the VIP served while the token is refreshed")
    os.killpg(proc.pid, sig)
    deadline = last_refresh(state) + TOKEN_S  # the kernel ends it here, no code running
    time.sleep(max(0.0, deadline + SLACK_S - time.monotonic()))
    assert dark(lab), f"VIP still served {SLACK_S}s after its last token ran out"
    if sig == signal.SIGKILL:
        return
    os.killpg(proc.pid, signal.SIGCONT)
    wait_for(lambda: "frozen" in state.read_text(), 10, "the thawed refresher to notice its freeze")
    assert dark(lab), "a thawed process re-opened the VIP without a new proof"
    go.touch()
    assert wait_for(lambda: reachable(lab), 10, "the VIP served again after an explicit re-arm")


def token_elements(lab: Lab, set_name: str) -> dict[str, int]:
    """Element -> its timeout (ms), from `nft -j list set`."""
    doc = json.loads(nft(lab, lab.host("h1").ns, "-j", "list", "set", "netdev", "vipd_fence", set_name))
    out: dict[str, int] = {}
    for item in doc["nftables"]:
        for el in item.get("set", {}).get("elem", []):
            e = el["elem"]
            out[str(e["val"])] = int(e["timeout"] * 1000) if isinstance(e["timeout"], (int, float)) else e["timeout"]
    return out


@pytest.mark.parametrize("timeout_update", [True, False], ids=["element-update", "delete-add"])
async def test_arm_many_one_batch_and_timeouts(lab: Lab, timeout_update: bool) -> None:
    nic = lab.nic
    many = [VipSpec(f"m{i}", ipaddress.ip_interface(f"10.214.{i // 250}.{i % 250 + 1}/32"), nic)
            for i in range(1000)]
    async with Netlink(lab.host("h1").ns) as nl, NftFence(nl, timeout_update=timeout_update) as fence:
        await fence.ensure(many)
        now = trio.current_time()
        await fence.arm_many([((v,), now + 100 + i) for i, v in enumerate(many)])  # unit i: 100+i s
        got = token_elements(lab, "token4")
        assert len(got) == 1000
        for i, v in enumerate(many):
            assert (100 + i) * 1000 - 5000 < got[str(v.ip)] <= (100 + i) * 1000  # rounded down, never up
        assert fence.refreshes() == 1000
        # a refresh restarts the countdown, also to a SHORTER one
        await fence.arm_many([((v,), trio.current_time() + 20) for v in many[:10]])
        got = token_elements(lab, "token4")
        assert all(15000 < got[str(v.ip)] <= 20000 for v in many[:10])
        assert got[str(many[10].ip)] > 100000
        # a deadline in the past, or closer than one safe tick: removed, never a permanent element
        await fence.arm([many[0]], trio.current_time() - 1)
        await fence.arm([many[1]], trio.current_time() + MIN_TOKEN_MS / 2000)
        await fence.disarm([many[2]])
        await fence.disarm([many[2]])  # absent: fine
        got = token_elements(lab, "token4")
        assert len(got) == 997 and not {str(v.ip) for v in many[:3]} & set(got)
        with pytest.raises(FenceError, match="not managed"):
            await fence.arm([VipSpec("x", lab.vip4(9), nic)], trio.current_time() + 10)
        with pytest.raises(FenceError, match="routed"):
            await fence.arm([VipSpec("x", lab.vip4(9), "lo")], trio.current_time() + 10)
        await fence.remove_all()


async def test_ten_thousand_vips_fit_in_the_table_and_in_one_arm(lab: Lab) -> None:
    """5,000 IPv4 and 5,000 IPv6 VIPs: the managed sets and one arm of every token go in messages of
    a bounded size (one message per set overflowed a netlink attribute's 16-bit length: a traceback
    at start-up with ~2,300 IPv6 VIPs on a NIC)."""
    nic = lab.nic
    many = [VipSpec(f"m{i}", ipaddress.ip_interface(f"10.214.{i // 250}.{i % 250 + 1}/32" if i % 2 == 0
                                                      else f"fd00:214::{i + 1:x}/128"), nic) for i in range(10000)]
    async with Netlink(lab.host("h1").ns) as nl, NftFence(nl) as fence:
        await fence.ensure(many)
        now = trio.current_time()
        await fence.arm_many([((v,), now + 100) for v in many])
        got = {**token_elements(lab, "token4"), **token_elements(lab, "token6")}
        assert len(got) == 10000 and all(95000 < ms <= 100000 for ms in got.values())
        await fence.remove_all()


USER_TABLE = """table inet vtuser {
	set vtkeep {
		type ipv4_addr
		elements = { 10.1.2.3 }
	}

	chain vtin {
		type filter hook input priority 0; policy accept;
		ip saddr 10.9.9.9 counter packets 0 bytes 0 drop
	}
}
"""


async def test_own_table_only_cleanup_and_repair(lab: Lab) -> None:
    ns = lab.host("h1").ns
    subprocess.run(netns.exec_argv(ns, ["nft", "-f", "-"]), input=USER_TABLE, text=True, check=True, timeout=10)

    def user() -> str:
        return nft(lab, ns, "list", "table", "inet", "vtuser")

    before = user()
    vips = vips_of(lab)
    async with Netlink(ns) as nl, NftFence(nl) as fence:
        await fence.ensure(vips)
        await fence.ensure(vips)  # idempotent
        await fence.arm(vips, trio.current_time() + 60)
        assert not await fence.verify()
        await fence.ensure(vips[:1])  # the IPv6 VIP no longer configured: unmanaged, token gone
        assert token_elements(lab, "token6") == {}
        assert json.loads(nft(lab, ns, "-j", "list", "set", "netdev", "vipd_fence", "managed6"))["nftables"][1][
            "set"].get("elem") is None
        await fence.ensure(vips)
        await fence.arm(vips, trio.current_time() + 60)
        assert user() == before
        tables = nft(lab, ns, "list", "tables").split("\n")
        assert "table netdev vipd_fence" in tables and "table inet vtuser" in tables
        # someone deletes everything: verify() rebuilds, tokens re-armed from vipd's record
        nft(lab, ns, "flush", "ruleset")
        assert await fence.verify()
        assert set(token_elements(lab, "token4")) == {str(lab.vip4(1).ip)}
        assert not await fence.verify()
        # a flushed managed set (the fence would fail open) is repaired too
        nft(lab, ns, "flush", "set", "netdev", "vipd_fence", "managed4")
        assert await fence.verify() and fence.repairs() == 2
        # a hooked chain's rules deleted: a reload's ensure() leaves a hooked chain as it is (no rule
        # rewrite under the lock), verify() repairs it
        chain = chain_names(vips[0].interface)[0]
        nft(lab, ns, "flush", "chain", "netdev", "vipd_fence", chain)
        await fence.ensure(vips)
        assert "rule" not in json.dumps(json.loads(nft(lab, ns, "-j", "list", "chain", "netdev", "vipd_fence",
                                                       chain))["nftables"][1:])
        assert await fence.verify() and fence.repairs() == 3
        assert not await fence.verify()
        # a reload writes the managed sets' difference from what the kernel holds (not from what
        # vipd believes): an element someone deleted comes back, one someone added goes
        v4 = str(lab.vip4(1).ip)
        nft(lab, ns, "delete", "element", "netdev", "vipd_fence", "managed4", "{ " + v4 + " }")
        nft(lab, ns, "add", "element", "netdev", "vipd_fence", "managed4", "{ 10.213.9.9 }")
        await fence.ensure(vips)
        doc = json.loads(nft(lab, ns, "-j", "list", "set", "netdev", "vipd_fence", "managed4"))
        assert doc["nftables"][1]["set"].get("elem") == [v4]
        assert not await fence.verify()
        # the table gone before a reload (nothing to read back: every set is filled whole, and the
        # tokens come back from vipd's record, as verify() brings them back: not dark until the
        # next refresh)
        await fence.arm(vips, trio.current_time() + 60)
        nft(lab, ns, "delete", "table", "netdev", "vipd_fence")
        await fence.ensure(vips)
        assert set(token_elements(lab, "token4")) == {v4}
        for name, ip in (("managed4", v4), ("managed6", str(lab.vip6(1).ip))):
            doc = json.loads(nft(lab, ns, "-j", "list", "set", "netdev", "vipd_fence", name))
            assert doc["nftables"][1]["set"].get("elem") == [ip]
        assert not await fence.verify()
        # a reload adding a VIP on a device the table does not hook yet: its chain pair, encoded
        # before the lock (fence_build.prebuild), is sent whole and numbered; the others' tokens
        # stay; out again, its chains go (this kernel hooks a device that does not exist yet)
        extra = VipSpec("x", ipaddress.ip_interface("10.213.77.1/32"), "vtfx0")
        await fence.ensure([*vips, extra])
        assert not await fence.verify()
        assert "vtfx0" in nft(lab, ns, "list", "chain", "netdev", "vipd_fence", chain_names("vtfx0")[0])
        assert set(token_elements(lab, "token4")) == {v4}
        await fence.ensure(vips)
        assert chain_names("vtfx0")[0] not in nft(lab, ns, "list", "table", "netdev", "vipd_fence")
        assert not await fence.verify()
        subprocess.run(netns.exec_argv(ns, ["nft", "-f", "-"]), input=USER_TABLE, text=True, check=True,
                       timeout=10)
        await fence.remove_all()
        assert nft(lab, ns, "list", "tables").split() == ["table", "inet", "vtuser"]
        assert user() == before
        await fence.remove_all()  # absent: fine


async def test_a_dsr_vip_is_gated_for_arp_and_nd_only(lab: Lab) -> None:
    """A DSR VIP reaches every backend (the director forwards frames to the VIP unchanged) and
    every backend answers from it, owner or not: its IP traffic passes without a token, while
    only a live token lets the kernel answer ARP/ND for it."""
    from vipd.config_dsr import ServiceSpec
    put_vips(lab)
    svc = (ServiceSpec("tcp", 80, ()),)
    vips = [VipSpec("v4", lab.vip4(1), lab.nic, services=svc), VipSpec("v6", lab.vip6(1), lab.nic, services=svc)]
    h1 = lab.host("h1")
    async with Netlink(h1.ns) as nl, NftFence(nl) as fence:
        await fence.ensure(vips)
        assert await trio.to_thread.run_sync(dark, lab)  # no token: nobody resolves the VIPs
        for ip in (lab.vip4(1).ip, lab.vip6(1).ip):  # frames sent to h1's MAC, as a director does
            lab.ip(lab.client, "neigh", "replace", str(ip), "lladdr", h1.mac, "dev", lab.nic, "nud", "permanent")
        for ip in (lab.client.ip.ip, lab.client.ip6.ip):  # (h1 resolving the client from the VIP is ARP: gated)
            lab.ip(h1, "neigh", "replace", str(ip), "lladdr", lab.client.mac, "dev", lab.nic, "nud", "permanent")
        try:
            assert all(lab.ping(lab.client, ip, count=1, timeout=1) for ip in (lab.vip4(1), lab.vip6(1)))
            assert not await fence.verify()  # the ARP/ND-only sets are part of a whole table
            await fence.arm(vips, trio.current_time() + 60)
            assert await trio.to_thread.run_sync(reachable, lab)  # the owner's kernel answers ARP/ND
        finally:
            lab.ip(lab.client, "neigh", "flush", "dev", lab.nic)
            lab.ip(h1, "neigh", "flush", "dev", lab.nic)
        await fence.remove_all()


def grant_elements(lab: Lab) -> dict[int, list[int]]:
    """Grant id -> the timeouts (ms) of its elements (ip, arp, ip6), from `nft -j list sets`: only
    grants with a live element."""
    doc = json.loads(nft(lab, lab.host("h1").ns, "-j", "list", "sets", "netdev"))
    out: dict[int, list[int]] = {}
    for item in doc["nftables"]:
        s = item.get("set", {})
        if s.get("table") == "vipd_fence" and s["name"].startswith("grant_") and s.get("elem"):
            out[int(s["name"][6:])] = sorted(int(e["elem"]["timeout"] * 1000) for e in s["elem"])
    return out


def group_members(lab: Lab) -> dict[str, int]:
    """VIP -> the grant id its group depends on, from `nft -j list map ... group4/group6`."""
    out: dict[str, int] = {}
    for name in ("group4", "group6"):
        doc = json.loads(nft(lab, lab.host("h1").ns, "-j", "list", "map", "netdev", "vipd_fence", name))
        for item in doc["nftables"]:
            for key, verdict in item.get("map", {}).get("elem", []):
                out[str(key)] = int(verdict["jump"]["target"].removeprefix("grant_"))
    return out


@contextlib.asynccontextmanager
async def grouped(lab: Lab, grant_s: float) -> AsyncIterator[tuple[NftFence, list[VipSpec], str, float]]:
    """h1's VIPs in the fence, tokens armed for a minute, all in h2's group with its grant armed
    for `grant_s`: (fence, vips, netns, the trio time they were armed)."""
    put_vips(lab)
    vips = vips_of(lab)
    ns = lab.host("h1").ns
    async with Netlink(ns) as nl, NftFence(nl) as fence:
        await fence.ensure(vips)
        now = trio.current_time()
        await fence.arm_many([(vips, now + 60)], grants=[("h2", now + grant_s)], groups=[(vips, "h2")])
        yield fence, vips, ns, now


async def test_a_vip_in_a_group_is_served_only_while_its_grant_lives_too(lab: Lab) -> None:
    """One grant element bounds every VIP of its group (the successor's grant, vipd/succession.py):
    a lapsed grant darkens them with their own tokens alive; leaving the group re-opens them
    without the grant; the table's repair restores groups and grants with the tokens (a token
    never comes back without its group)."""
    async with grouped(lab, grant_s=60) as (fence, vips, ns, now):
        assert group_members(lab) == {str(lab.vip4(1).ip): 1, str(lab.vip6(1).ip): 1}
        assert len(grant_elements(lab)[1]) == 3 and all(55000 < ms <= 60000 for ms in grant_elements(lab)[1])
        assert "vipd_fence" in nft(lab, ns, "list", "ruleset")  # nft itself reads all of it back
        assert fence.grant_of(vips[0]) == "h2" and fence.armed_until(vips) == now + 60
        assert await trio.to_thread.run_sync(reachable, lab)
        # the grant alone runs out: both VIPs go dark, their own tokens still alive for a minute
        until = trio.current_time() + TOKEN_S
        await fence.arm_many([], grants=[("h2", until)])
        assert fence.armed_until(vips) == until
        await trio.sleep_until(until + 0.05)
        assert grant_elements(lab) == {} and len(token_elements(lab, "token4")) == 1
        assert await trio.to_thread.run_sync(dark, lab)
        assert not await fence.verify() and fence.lapses() == 2
        # a grant in the past removes it at once; a new one re-opens the group
        await fence.arm_many([], grants=[("h2", trio.current_time() + 60)])
        assert await trio.to_thread.run_sync(reachable, lab)
        await fence.arm_many([], grants=[("h2", trio.current_time() - 1)])
        assert await trio.to_thread.run_sync(dark, lab)
        # moved to another grant's group (leave, then join, in one batch), then to none
        await fence.arm_many([], grants=[("h3", trio.current_time() + 60)], groups=[(vips[:1], "h3")])
        assert group_members(lab) == {str(lab.vip4(1).ip): 2, str(lab.vip6(1).ip): 1}
        await fence.arm_many([], groups=[(vips[1:], None)])
        assert group_members(lab) == {str(lab.vip4(1).ip): 2}
        assert await trio.to_thread.run_sync(reachable, lab)  # v4 by h3's grant, v6 by its token alone
        # someone deletes everything: the repair brings back tokens, groups and grants together
        nft(lab, ns, "flush", "ruleset")
        assert await fence.verify()
        assert group_members(lab) == {str(lab.vip4(1).ip): 2} and set(grant_elements(lab)) == {2}
        assert await trio.to_thread.run_sync(reachable, lab)
        # a flushed group map (the token alone would serve the VIP) is repaired too
        nft(lab, ns, "flush", "map", "netdev", "vipd_fence", "group4")
        assert await fence.verify() and group_members(lab) == {str(lab.vip4(1).ip): 2}
        assert not await fence.verify()
        # a disarm takes the VIP out of its group with its token
        await fence.disarm(vips[:1])
        assert group_members(lab) == {} and fence.grant_of(vips[0]) is None
        await fence.remove_all()


async def test_a_grant_the_heartbeat_thread_rearms_keeps_its_group_served_and_counts_no_lapse(lab: Lab) -> None:
    """Once handed to the heartbeat thread (vipd/peers/grants.py), a grant is written there only:
    its writes keep the group served past the last deadline this side armed, the fence reads the
    thread's deadline (a lapse was counted for every grouped VIP at each verify, and a repair
    re-armed the grant to this side's old, lapsed deadline), and when the thread lets the grant
    end the group goes dark and is counted once."""
    async with grouped(lab, grant_s=TOKEN_S) as (fence, vips, ns, now):
        gid = fence.grant_id("h2")
        assert gid is not None
        writer = GrantWriter(ns, fence.timeout_update, loop_clock(), step=0.02)
        writer.hand({"h2": gid})
        fence.grant_source = writer.written
        until = now + 30
        try:
            await trio.to_thread.run_sync(writer.write, [("h2", gid, until)])
            assert writer.writes == 1 and writer.failures == 0
            await trio.sleep(TOKEN_S + 0.05)  # past this side's grant
            assert await trio.to_thread.run_sync(reachable, lab)
            assert not await fence.verify() and fence.lapses() == 0
            assert fence.armed_until(vips) == until
            nft(lab, ns, "flush", "ruleset")  # the repair re-arms the thread's grant
            assert await fence.verify() and 25000 < min(grant_elements(lab)[gid]) <= 30000
            assert await trio.to_thread.run_sync(reachable, lab)
            await trio.to_thread.run_sync(writer.write, [("h2", gid, -math.inf)])  # the grant ends
            assert grant_elements(lab) == {} and await trio.to_thread.run_sync(dark, lab)
            assert not await fence.verify() and fence.lapses() == 2
        finally:
            writer.close()
        await fence.remove_all()


async def test_a_new_process_starts_from_an_empty_table(lab: Lab) -> None:
    """A previous run's groups and grants (its grant ids, its peers) mean nothing to the next run:
    its first ensure() starts from an empty table, so its own groups go in without a clash (a
    restarted daemon failed every arm with EEXIST in the chaos soak), and no VIP is served by a
    token or grant it did not arm; a reload's ensure() keeps what this run armed."""
    put_vips(lab)
    vips = vips_of(lab)
    async with Netlink(lab.host("h1").ns) as nl:
        async with NftFence(nl) as old:
            await old.ensure(vips)
            now = trio.current_time()
            await old.arm_many([(vips, now + 60)], grants=[("h3", now + 60)], groups=[(vips, "h3")])
        async with NftFence(nl) as fence:
            await fence.ensure(vips)
            assert group_members(lab) == {} and grant_elements(lab) == {} and token_elements(lab, "token4") == {}
            assert await trio.to_thread.run_sync(dark, lab)
            now = trio.current_time()
            await fence.arm_many([(vips, now + 60)], grants=[("h2", now + 60)], groups=[(vips, "h2")])
            await fence.ensure(vips)  # a reload: what this run armed stays
            assert group_members(lab) == {str(lab.vip4(1).ip): 1, str(lab.vip6(1).ip): 1}
            assert await trio.to_thread.run_sync(reachable, lab)
            await fence.remove_all()


async def test_a_prebuilt_batch_the_kernel_refuses_is_a_clear_error_and_changes_nothing(lab: Lab) -> None:
    """A new device's chain pair, encoded before the lock (fence_build.prebuild) and sent numbered
    (fence_send.send_prebuilt): refused whole (no table yet), or for one message in its middle
    (the rest would pass), it raises FenceError with the kernel's reason, leaves the kernel as it
    was, and the fence's sockets still work."""
    from vipd.dataplane.fence_build import TABLE, Op, hook_ops, prebuild
    from vipd.dataplane.fence_send import send_prebuilt
    from pyroute2.netlink.nfnetlink import nftsocket as nfts

    ns = lab.host("h1").ns
    vips = vips_of(lab)
    async with Netlink(ns) as nl, NftFence(nl) as fence:
        refused = prebuild(hook_ops(["vtfx1"]))
        with pytest.raises(FenceError, match=r"^hook vtfx1: .*No such file or directory"):
            await fence._run("hook vtfx1", lambda s: send_prebuilt(s, refused))  # noqa: SLF001
        assert "vipd_fence" not in nft(lab, ns, "list", "tables")
        await fence.ensure(vips)
        before = nft(lab, ns, "list", "table", "netdev", TABLE)
        middle = prebuild(hook_ops(["vtfx1"]) + [Op(nfts.NFT_MSG_DELCHAIN, (("NFTA_CHAIN_TABLE", TABLE),
                                                                           ("NFTA_CHAIN_NAME", "vtnochain")))]
                          + hook_ops(["vtfx2"]))
        with pytest.raises(FenceError, match=r"^hook vtfx1, vtfx2: .*No such file or directory"):
            await fence._run("hook vtfx1, vtfx2", lambda s: send_prebuilt(s, middle))  # noqa: SLF001
        assert nft(lab, ns, "list", "table", "netdev", TABLE) == before  # the batch was aborted whole
        await fence.arm(vips, trio.current_time() + 60)
        assert not await fence.verify()
        await fence.remove_all()

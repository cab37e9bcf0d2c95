"""The dataplane ports batch per host, transparently (real kernel, namespaces vtb-<tag>-*): many
concurrent claims / releases are a few netlink jobs and each still gets its own verdict; many
concurrent announcements on one interface share one sender and one AF_PACKET socket, and every
VIP's frames still go out."""

from __future__ import annotations

import ipaddress
import json
import socket
from typing import Any

import pytest
import trio
import trio.testing

from tests.lab.test_conflict import Pair, pair  # noqa: F401 - fixtures
from tests.lab.test_dataplane import NsLab, host, ip, nl, nslab, vip  # noqa: F401 - fixtures
from vipd.dataplane.address import AddressManager
from vipd.dataplane.announce import Announcer
from vipd.dataplane import conflict
from vipd.dataplane.conflict import AddressConflict, check_free, parse_arp, parse_nd
from vipd.dataplane.start_probe import StartProbe
from vipd.dataplane.netlink import Netlink
from vipd.errors import AddressError, DataplaneError

N = 300


def addresses(ifname: str, n: int) -> list[Any]:
    return [vip(f"10.21.{i // 250}.{1 + i % 250}/32", ifname) if i % 2 == 0 else vip(f"fd21::{i:x}/128", ifname)
            for i in range(n)]


async def run_all(fn: Any, items: list[Any]) -> dict[int, BaseException | Any]:
    out: dict[int, BaseException | Any] = {}

    async def one(n: int, item: Any) -> None:
        try:
            out[n] = await fn(item)
        except AddressError as e:
            out[n] = e

    async with trio.open_nursery() as nursery:
        for n, item in enumerate(items):
            nursery.start_soon(one, n, item)
    return out


async def test_concurrent_claims_and_releases_are_batched(host: tuple[str, str], nl: Netlink) -> None:  # noqa: F811
    ns, ifname = host
    vips = addresses(ifname, N)
    ip("-n", ns, "addr", "add", "10.21.0.5/32", "dev", ifname)  # an untagged copy of vips[4]: not ours
    am = AddressManager(nl)
    results = await run_all(lambda v: am.claim(v, 30), vips)
    assert isinstance(results[4], AddressError) and "without vipd's tag" in str(results[4])
    assert all(results[n] is None for n in range(N) if n != 4)
    assert am._claims.batches <= 3  # not one netlink job (and interface listing) per claim
    tagged = {(t.interface, t.address) for t in await am.tagged()}
    assert tagged == {(ifname, v.address) for n, v in enumerate(vips) if n != 4}
    results = await run_all(am.release, vips)
    assert all(r is None for r in results.values())
    assert am._releases.batches <= 3
    assert await am.tagged() == []
    assert "10.21.0.5/32" in ip("-n", ns, "addr", "show", "dev", ifname)  # the foreign copy stays


async def test_concurrent_announcements_share_one_socket(host: tuple[str, str], nl: Netlink, nslab: NsLab) -> None:  # noqa: F811
    ns, ifname = host
    peer_ns, peer_if = nslab.namespaces[1], nslab.link("p")
    vips = [vip(str(v.address), ifname, announce_count=2, announce_interval=0.05) for v in addresses(ifname, 100)]
    async with Netlink(peer_ns) as peer:
        listener = await peer.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        await listener.bind((peer_if, 0))
        seen: dict[Any, int] = {}

        async def listen() -> None:
            while True:
                frame = await listener.recv(2048)
                claim = parse_arp(frame) or parse_nd(frame)
                if claim is not None:
                    seen[claim.ip] = seen.get(claim.ip, 0) + 1

        ann = Announcer(nl)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(listen)
            await trio.sleep(0.05)
            cancelled = trio.CancelScope()

            async def first() -> None:  # runs the sender, and is cancelled while the others are due
                with cancelled:
                    await ann.announce(vip("10.21.9.8/32", ifname, announce_count=1000, announce_interval=0.01))

            results: dict[int, Any] = {}

            async def rest() -> None:
                results.update(await run_all(ann.announce, vips[1:] + [vip("10.21.9.9/32", ifname, announce_count=1)]))

            nursery.start_soon(first)
            await trio.sleep(0.02)
            assert ann.sockets_opened(ifname) == 1
            nursery.start_soon(rest)
            await trio.sleep(0.02)  # the others' first bursts are out, their second ones are due
            cancelled.cancel()
            with trio.fail_after(5):
                while len(results) < len(vips):
                    await trio.sleep(0.02)
            await trio.sleep(0.2)  # the last frames cross the veth
            nursery.cancel_scope.cancel()
        listener.close()
    assert all(results[n] == 2 for n in range(len(vips) - 1)) and results[len(vips) - 1] == 1
    assert ann.sockets_opened(ifname) == 2  # one sender, then the caller that took over from it
    for v in vips[1:]:
        assert seen.get(v.ip) == 2, v.ip
    assert seen.get(ipaddress.ip_address("10.21.9.9")) == 1


async def test_concurrent_conflict_checks_share_one_probe_round(pair: Pair) -> None:  # noqa: F811
    taken = ["192.0.2.77", "2001:db8::77"]
    pair.foreign_holds(f"{taken[0]}/24", f"{taken[1]}/64")
    vips = [vip(a, pair.our_if) for a in [f"192.0.2.{100 + i}/24" for i in range(40)]
            + [f"2001:db8::{0x100 + i:x}/64" for i in range(40)] + [f"{taken[0]}/24", f"{taken[1]}/64"]]
    async with Netlink(pair.ours) as nl:
        results: dict[str, BaseException | None] = {}

        async def one(v: Any) -> None:
            try:
                await check_free(nl, v, wait=0.1)
                results[str(v.ip)] = None
            except AddressConflict as e:
                results[str(v.ip)] = e

        async with trio.open_nursery() as nursery:
            for v in vips:
                nursery.start_soon(one, v)
        [batcher] = conflict._batchers[nl].values()
        assert batcher.batches == 1  # one ARP and one ND socket for all of them, not a pair per VIP
    conflicts = {a: e for a, e in results.items() if e is not None}
    assert sorted(conflicts) == sorted(taken)
    assert all(isinstance(e, AddressConflict) and e.mac == pair.foreign_mac for e in conflicts.values())


async def test_the_start_probe_answers_the_first_claims_of_free_addresses_only(pair: Pair) -> None:  # noqa: F811
    """vipd.dataplane.start_probe against real frames: one probe round at start; a free address's
    first claim takes its answer (no probe of its own), a held one is probed again and conflicts."""
    taken = ["192.0.2.88", "2001:db8::88"]
    pair.foreign_holds(f"{taken[0]}/24", f"{taken[1]}/64")
    vips = [vip(a, pair.our_if) for a in ["192.0.2.101/24", "2001:db8::101/64", f"{taken[0]}/24", f"{taken[1]}/64"]]
    async with Netlink(pair.ours) as nl:
        probed: list[str] = []

        async def one(v: Any) -> None:
            probed.append(str(v.ip))
            await check_free(nl, v, wait=0.05)

        p = StartProbe(lambda ifname, ips: conflict.probe_many(nl, ifname, ips, wait=0.05), one)
        await p.run(vips)
        assert p.pending == 2
        conflicts = []
        for v in vips:
            try:
                await p.check_free(v)
            except AddressConflict as e:
                conflicts.append((str(v.ip), e.mac))
    assert sorted(probed) == sorted(taken)
    assert sorted(conflicts) == sorted((a, pair.foreign_mac) for a in taken)


async def test_a_start_probe_on_a_missing_interface_fails_that_interface_only(pair: Pair, caplog) -> None:  # noqa: F811
    """An interface gone at start (the daemon starts with it missing): its round fails with one
    line naming it, the other interface's answers still count, and that VIP's claim probes on
    its own, failing with a clear DataplaneError (the controller logs it, conflict_probe_failed)."""
    import logging

    caplog.set_level(logging.INFO, logger="vipd")
    here, gone = vip("192.0.2.102/24", pair.our_if), vip("192.0.2.103/24", "vtnosuch0")
    async with Netlink(pair.ours) as nl:
        p = StartProbe(lambda ifname, ips: conflict.probe_many(nl, ifname, ips, wait=0.05),
                       lambda v: check_free(nl, v, wait=0.05))
        await p.run([here, gone])
        assert p.pending == 1
        await p.check_free(here)
        with pytest.raises(DataplaneError, match="vtnosuch0"):
            await p.check_free(gone)
    text = caplog.text
    assert "event=start_probe_failed interface=vtnosuch0" in text and "failed=vtnosuch0" in text
    assert "Traceback" not in text


async def test_raw_address_dump_matches_pyroute2(host: tuple[str, str], nl: Netlink) -> None:  # noqa: F811
    ns, ifname = host
    am = AddressManager(nl)
    await run_all(lambda v: am.claim(v, 30), addresses(ifname, 50))
    ip("-n", ns, "addr", "add", "10.22.0.1/24", "dev", ifname)  # untagged, forever
    ip("-n", ns, "addr", "add", "10.22.0.9", "peer", "10.22.1.1/32", "dev", ifname)  # point-to-point: local != peer
    await am.claim(vip("fd22::1/64", "lo"), 40)

    def both(ipr: Any) -> tuple[set[Any], set[Any]]:
        from vipd.dataplane.address import _entries
        raw = {(e.index, e.address, e.proto, e.valid_lft) for e in _entries(nl)}
        ref = set()
        for m in ipr.addr("dump"):
            local = m.get("IFA_LOCAL") if m["family"] == socket.AF_INET else None
            cache = m.get("IFA_CACHEINFO")
            valid = cache["ifa_valid"] if cache else 0xFFFFFFFF
            ref.add((m["index"], ipaddress.ip_interface(f"{local or m.get('IFA_ADDRESS')}/{m['prefixlen']}"),
                     m.get("IFA_PROTO"), None if valid == 0xFFFFFFFF else valid))
        return raw, ref

    raw, ref = await nl.call(both)
    assert len(raw) >= 55 and {r[:3] for r in raw} == {r[:3] for r in ref}
    lifetimes = {r[:3]: r[3] for r in ref}  # the two dumps may straddle a second boundary
    for r in raw:
        ref_lft = lifetimes[r[:3]]
        assert (r[3] is None) == (ref_lft is None) and abs((r[3] or 0) - (ref_lft or 0)) <= 1, r
    assert (ipaddress.ip_interface("10.22.0.9/32") in {a for _, a, _, _ in raw})


async def test_listing_reflects_claims_started_before_it(host: tuple[str, str], nl: Netlink) -> None:  # noqa: F811
    ns, ifname = host
    vips = addresses(ifname, 1200)  # more than one netlink job's worth
    am = AddressManager(nl)
    listed: list[Any] = []

    async with trio.open_nursery() as nursery:
        for v in vips:
            nursery.start_soon(am.claim, v, 30)
        await trio.testing.wait_all_tasks_blocked()  # every claim has started: its batch is queued
        listed = await am.tagged()  # a reconcile tick here must not report them missing
    assert {t.address for t in listed} == {v.address for v in vips}


async def test_refresh_many_restarts_every_lifetime(host: tuple[str, str], nl: Netlink) -> None:  # noqa: F811
    ns, ifname = host
    vips = addresses(ifname, 300)
    am = AddressManager(nl)
    await run_all(lambda v: am.claim(v, 5), vips)
    gone = vip("10.21.9.1/32", "vtbnosuchif")
    failures = await am.refresh_many([(v, 40) for v in vips] + [(gone, 40)])
    assert set(failures) == {gone.name} and "no interface" in str(failures[gone.name])
    info = {ipaddress.ip_address(a["local"]): a for link in json.loads(ip("-n", ns, "-j", "-d", "addr", "show", "dev", ifname))
            for a in link.get("addr_info", [])}
    for v in vips:
        a = info[v.ip]
        assert a["prefixlen"] == v.address.network.prefixlen
        assert 38 <= a["valid_life_time"] <= 40 and 38 <= a["preferred_life_time"] <= 40, a
        assert not a.get("tentative")  # IPv6: no DAD
    assert {t.address for t in await am.tagged() if 38 <= (t.valid_lft or 0) <= 40} == {v.address for v in vips}


class TaskSteps(trio.abc.Instrument):
    """How many times each task was stepped (each step after the first followed a checkpoint)."""

    def __init__(self) -> None:
        self.steps: dict[Any, int] = {}

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[task] = self.steps.get(task, 0) + 1


async def test_a_burst_of_many_vips_goes_out_without_a_scheduler_batch_per_frame(
        host: tuple[str, str], nl: Netlink, nslab: NsLab) -> None:  # noqa: F811
    """trio's socket send ends each success with a checkpoint, so in a busy loop (a handover wave)
    each frame waited for a scheduler batch of its own; the sender writes a whole burst between
    checkpoints (one per PER_CHECKPOINT VIPs), and every frame still arrives."""
    ns, ifname = host
    peer_ns, peer_if = nslab.namespaces[1], nslab.link("p")
    vips = [vip(str(v.address), ifname, announce_count=1) for v in addresses(ifname, 600)]
    async with Netlink(peer_ns) as peer:
        listener = await peer.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        listener.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE  # the test's reader takes the burst
        await listener.bind((peer_if, 0))
        seen: set[Any] = set()

        async def listen() -> None:
            while True:
                frame = await listener.recv(2048)
                claim = parse_arp(frame) or parse_nd(frame)
                if claim is not None:
                    seen.add(claim.ip)

        ann = Announcer(nl)
        steps = TaskSteps()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(listen)
            await trio.sleep(0.05)
            trio.lowlevel.add_instrument(steps)
            try:
                results = await run_all(ann.announce, vips)
            finally:
                trio.lowlevel.remove_instrument(steps)
            await trio.sleep(0.2)  # the last frames cross the veth
            nursery.cancel_scope.cancel()
        listener.close()
    assert all(results[n] == 1 for n in range(len(vips)))
    assert ann.sockets_opened(ifname) == 1
    busiest = max(n for task, n in steps.steps.items() if task.name.endswith("one"))
    assert busiest < 60, busiest  # the sender's task: was a step per frame (600 frames)
    assert {v.ip for v in vips} - seen == set()

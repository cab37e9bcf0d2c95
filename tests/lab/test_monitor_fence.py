"""AddressMonitor against vipd's nftables token fence (NftFence, real kernel, vt* lab).

A host serves a VIP when it has the address and its fence lets it through: no `netdev vipd_fence`
table, the VIP not managed by it, or the VIP's token alive. A fenced host whose token ran out keeps
the address but serves nothing: that is no dual ownership, an overlap of live tokens is.
"""

from __future__ import annotations

import time
from contextlib import AsyncExitStack

import trio

from vipd.config import VipSpec
from vipd.dataplane.fence_nft import NftFence
from vipd.dataplane.netlink import Netlink
from vipd.lab.monitor import AddressMonitor
from vipd.lab.topology import Host, Lab

TOKEN_S = 0.4  # the first holder's only token
KERNEL_CUT_S = 0.012  # the kernel ends a token up to ~3 ticks (HZ 250) before its deadline, never after
SLACK_S = 0.05  # the monitor's error, generous for the shared 2-core machine


def vips_of(lab: Lab) -> list[VipSpec]:
    return [VipSpec("v4", lab.vip4(1), lab.nic), VipSpec("v6", lab.vip6(1), lab.nic)]


def add_addresses(lab: Lab, host: Host, vips: list[VipSpec]) -> None:
    for v in vips:
        lab.ip(host, "addr", "add", str(v.address), "dev", lab.nic, *(("nodad",) if v.ip.version == 6 else ()))


def del_addresses(lab: Lab, host: Host, vips: list[VipSpec]) -> None:
    for v in vips:
        lab.ip(host, "addr", "del", str(v.address), "dev", lab.nic)


def to_mono(until: float) -> float:
    """A trio-clock deadline on time.monotonic()'s clock (both count CLOCK_MONOTONIC)."""
    return until - (trio.current_time() - time.monotonic())


async def fences(stack: AsyncExitStack, lab: Lab, *hosts: Host) -> list[NftFence]:
    out = []
    for h in hosts:
        nl = await stack.enter_async_context(Netlink(h.ns))
        out.append(await stack.enter_async_context(NftFence(nl)))
    return out


async def wait_holders(mon: AddressMonitor, ip: object, expected: list[str]) -> bool:
    return await trio.to_thread.run_sync(lambda: mon.wait_holders(ip, expected, timeout=5))  # type: ignore[arg-type]


async def test_lapsed_token_keeps_the_address_but_is_no_holder(lab: Lab) -> None:
    """(a) h1 has the address and a token; h2 takes the VIP after h1's token ran out, while h1 keeps
    the address (a frozen owner): never dual. The address-only view sees both at once."""
    h1, h2, _ = lab.hosts
    vips = vips_of(lab)
    ips = [v.ip for v in vips]
    with AddressMonitor(lab, ips) as mon, AddressMonitor(lab, ips, address_only=True) as addr_mon:
        async with AsyncExitStack() as stack:
            f1, f2 = await fences(stack, lab, h1, h2)
            await f1.ensure(vips)
            await f2.ensure(vips)
            add_addresses(lab, h1, vips)  # managed, no token yet: h1 does not serve
            until = trio.current_time() + TOKEN_S
            await f1.arm(vips, until)
            for ip in ips:
                assert await wait_holders(mon, ip, ["h1"]), mon.holders_timeline(ip)
            end1 = to_mono(until)
            await trio.sleep_until(until + 0.1)
            for ip in ips:  # the token ran out: h1 keeps the address and serves nothing
                assert mon.holders_now(ip) == frozenset() and addr_mon.holders_now(ip) == {"h1"}
            add_addresses(lab, h2, vips)
            await f2.arm(vips, trio.current_time() + 60)
            for ip in ips:
                assert await wait_holders(mon, ip, ["h2"]), mon.holders_timeline(ip)
                assert await wait_holders(addr_mon, ip, ["h1", "h2"])
            del_addresses(lab, h1, vips)  # first: h1 without its table would serve again
            await f1.remove_all()
            await f2.remove_all()
    mon.assert_never_dual()
    assert all(d > 0 for d in addr_mon.dual_ownership().values())  # the old meaning: dual
    for ip in ips:
        assert [(sorted(a), sorted(b)) for _, a, b in mon.owner_changes(ip)] == [
            ([], ["h1"]), (["h1"], []), ([], ["h2"])], mon.holders_timeline(ip)
        lapse = mon.owner_changes(ip)[1][0]
        assert end1 - KERNEL_CUT_S <= lapse <= end1 + SLACK_S, (lapse - end1, mon.holders_timeline(ip))
        assert {"h1", "h2"} in [hs for _, hs in mon.address_timeline(ip)]
    assert mon.stats()["token_reads"] > 0 and mon.stats()["token_wakeups"] >= 1, mon.summary()


async def test_live_tokens_on_two_hosts_are_dual(lab: Lab) -> None:
    """(b) h2 takes the VIP while h1's token is still alive: dual ownership, from h2's arm to the end
    of h1's token (the kernel's, not the address's: h1 keeps the address throughout)."""
    h1, h2, _ = lab.hosts
    vips = vips_of(lab)[:1]
    ip = vips[0].ip
    with AddressMonitor(lab, [ip]) as mon:
        async with AsyncExitStack() as stack:
            f1, f2 = await fences(stack, lab, h1, h2)
            await f1.ensure(vips)
            await f2.ensure(vips)
            add_addresses(lab, h1, vips)
            until = trio.current_time() + TOKEN_S
            await f1.arm(vips, until)
            assert await wait_holders(mon, ip, ["h1"])
            add_addresses(lab, h2, vips)  # managed on h2, no token: not yet dual
            await trio.sleep(0.05)
            assert mon.holders_now(ip) == {"h1"}
            armed_from = time.monotonic()
            await f2.arm(vips, trio.current_time() + 60)
            armed_by = time.monotonic()
            assert await wait_holders(mon, ip, ["h2"])
            end1 = to_mono(until)
            del_addresses(lab, h1, vips)
            await f1.remove_all()
            await f2.remove_all()
    [(_, start, end, holders)] = mon.dual_windows()
    assert holders == {"h1", "h2"}
    assert armed_from <= start <= armed_by + SLACK_S, (start - armed_from, mon.holders_timeline(ip))
    assert end1 - KERNEL_CUT_S <= end <= end1 + SLACK_S, (end - end1, mon.holders_timeline(ip))
    assert {"h1", "h2"} in [hs for _, hs in mon.address_timeline(ip)]


async def test_no_table_or_unmanaged_vip_is_held_by_the_address(lab: Lab) -> None:
    """(c) A host with the address and no fence table holds it (the old meaning); so does one whose
    table does not manage that VIP; a managed VIP without a token is held by nobody."""
    h1, h2, h3 = lab.hosts
    vips = vips_of(lab)[:1]
    ip = vips[0].ip
    other = [VipSpec("other", lab.vip4(2), lab.nic)]
    with AddressMonitor(lab, [ip]) as mon:
        async with AsyncExitStack() as stack:
            f2, f3 = await fences(stack, lab, h2, h3)
            await f2.ensure(other)
            await f3.ensure(vips)
            add_addresses(lab, h1, vips)  # no table at all
            assert await wait_holders(mon, ip, ["h1"])
            add_addresses(lab, h3, vips)  # managed, no token
            await trio.sleep(0.05)
            assert mon.holders_now(ip) == {"h1"} and mon.address_timeline(ip)[-1][1] == {"h1", "h3"}
            add_addresses(lab, h2, vips)  # a table that manages another VIP only
            assert await wait_holders(mon, ip, ["h1", "h2"])
            lab.ip(h1, "addr", "del", str(vips[0].address), "dev", lab.nic)
            lab.ip(h2, "addr", "del", str(vips[0].address), "dev", lab.nic)
            assert await wait_holders(mon, ip, [])
            await f3.arm(vips, trio.current_time() + 60)
            assert await wait_holders(mon, ip, ["h3"])
            await f3.remove_all()  # the table goes, the address stays: h3 still serves
            await trio.sleep(0.05)
            assert mon.holders_now(ip) == {"h3"}
            await f2.remove_all()
    [(_, _, _, holders)] = mon.dual_windows()
    assert holders == {"h1", "h2"}
    assert [sorted(b) for _, _, b in mon.owner_changes(ip)] == [["h1"], ["h1", "h2"], ["h2"], [], ["h3"]] or \
        [sorted(b) for _, _, b in mon.owner_changes(ip)] == [["h1"], ["h1", "h2"], [], ["h3"]], \
        mon.holders_timeline(ip)

"""vipd.dataplane.start_probe: a unit's first conflict probe takes the start's answer only when it
said "free", is fresh, and was not used before; anything else probes now."""

from __future__ import annotations

import ipaddress

import pytest
import trio

from vipd.dataplane.conflict import AddressConflict
from vipd.dataplane.start_probe import FRESH, IPAddress, StartProbe
from vipd.errors import DataplaneError
from vipd.model import VipSpec


def vip(addr: str, interface: str = "eth0") -> VipSpec:
    return VipSpec(name=f"v{addr}", address=ipaddress.ip_interface(addr), interface=interface)


FREE, TAKEN, V6 = vip("192.0.2.10/32"), vip("192.0.2.11/32"), vip("2001:db8::10/128")
OTHER = vip("198.51.100.10/32", "eth1")
LOOP = vip("203.0.113.1/32", "lo")


class Wire:
    """The probes: `taken` answers on the wire; every probe is recorded."""

    def __init__(self, taken: set[IPAddress], *, rounds_take: float = 0.2, fail: set[str] = frozenset()) -> None:
        self.taken, self.rounds_take, self.fail = taken, rounds_take, fail
        self.rounds: list[tuple[str, list[IPAddress]]] = []
        self.single: list[VipSpec] = []

    async def many(self, ifname: str, ips: list[IPAddress]) -> dict[IPAddress, str]:
        self.rounds.append((ifname, list(ips)))
        await trio.sleep(self.rounds_take)
        if ifname in self.fail:
            raise DataplaneError(f"{ifname}: no such device")
        return {ip: "02:00:00:00:00:99" for ip in ips if ip in self.taken}

    async def one(self, v: VipSpec) -> None:
        self.single.append(v)
        if v.ip in self.taken:
            raise AddressConflict(v.ip, "02:00:00:00:00:99", v.interface)


def probe(wire: Wire) -> StartProbe:
    return StartProbe(wire.many, wire.one)


async def test_a_free_answer_is_used_once_and_lo_is_never_probed_at_start(autojump_clock) -> None:
    wire = Wire(set())
    p = probe(wire)
    await p.run([FREE, V6, OTHER, LOOP])
    assert sorted(wire.rounds) == [("eth0", [FREE.ip, V6.ip]), ("eth1", [OTHER.ip])]  # one round per interface
    for v in (FREE, V6, OTHER):
        await p.check_free(v)
    assert wire.single == [] and p.pending == 0
    await p.check_free(FREE)  # a second claim probes now
    assert wire.single == [FREE]


async def test_a_conflict_at_start_is_never_reused(autojump_clock) -> None:
    wire = Wire({TAKEN.ip})
    p = probe(wire)
    await p.run([FREE, TAKEN])
    wire.taken.clear()  # the machine that answered let go (another vipd host released cleanly)
    await p.check_free(TAKEN)  # probed now: free
    assert wire.single == [TAKEN]
    wire.taken.add(TAKEN.ip)
    p2 = probe(wire)
    await p2.run([TAKEN])
    with pytest.raises(AddressConflict):
        await p2.check_free(TAKEN)


async def test_an_answer_older_than_fresh_is_not_used(autojump_clock) -> None:
    wire = Wire(set())
    p = probe(wire)
    await p.run([FREE, V6])
    await trio.sleep(FRESH - wire.rounds_take - 0.01)
    await p.check_free(FREE)  # just inside: counted from when the start probe began
    await trio.sleep(0.02)
    wire.taken.add(V6.ip)  # a foreign machine took it meanwhile
    with pytest.raises(AddressConflict):
        await p.check_free(V6)
    assert wire.single == [V6]


async def test_a_failed_interface_probes_at_the_claim_and_the_others_still_count(autojump_clock) -> None:
    wire = Wire(set(), fail={"eth1"})
    p = probe(wire)
    await p.run([FREE, OTHER])
    await p.check_free(FREE)
    await p.check_free(OTHER)
    assert wire.single == [OTHER]


async def test_a_claim_during_the_start_probe_waits_for_it_and_a_hung_probe_is_given_up(autojump_clock) -> None:
    wire = Wire(set())
    p = probe(wire)
    async with trio.open_nursery() as n:
        n.start_soon(p.run, [FREE])
        await trio.sleep(0.05)  # the start probe is sending
        await p.check_free(FREE)
    assert wire.single == [] and len(wire.rounds) == 1

    hung = Wire(set(), rounds_take=60.0)
    p = probe(hung)
    t0 = trio.current_time()
    async with trio.open_nursery() as n:
        n.start_soon(p.run, [FREE])
        await trio.sleep(0.05)
        await p.check_free(FREE)  # waits while an answer could still be used, then probes itself
        assert trio.current_time() - t0 == pytest.approx(FRESH)
    assert hung.single == [FREE] and p.pending == 0  # the start probe gave up at FRESH too


async def test_without_a_start_probe_every_claim_probes(autojump_clock) -> None:
    wire = Wire(set())
    p = probe(wire)
    await p.check_free(FREE)
    await p.check_free(LOOP)  # (lo passes to the port, which skips it)
    assert wire.single == [FREE, LOOP]


async def test_the_start_line_counts_free_answered_and_failed_apart(autojump_clock, caplog) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="vipd")
    wire = Wire({TAKEN.ip}, fail={"eth1"})
    await probe(wire).run([FREE, TAKEN, V6, OTHER])
    [line] = [r.getMessage() for r in caplog.records if "event=start_probe " in r.getMessage() + " "]
    assert "interfaces=2 free=2 answered=1 failed=eth1 took=0.2" in line

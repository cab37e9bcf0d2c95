"""Placement from host presence (vipd/election/hosts.py): who may campaign and who may be named
successor. A host in its release hold-off for a unit does not campaign for it, yet is a fine
successor (it takes over when the owner that named it dies)."""

from __future__ import annotations

import ipaddress
import math
import time

import pytest
import trio

from vipd.election.hosts import HostInfo, joined_at, rankings
from vipd.model import Unit, VipSpec

UNITS = [Unit(f"v{i}", (VipSpec(f"v{i}", ipaddress.ip_interface(f"10.0.0.{i + 1}/24"), "eth0"),)) for i in range(6)]


def test_presence_round_trips_with_held_units():
    h = HostInfo("h2", down=("v1", "v2"), held=("v1",), reasons=("v1: release hold-off", "v2/0:http: refused"))
    assert HostInfo.from_json("h2", h.to_json()) == h
    assert HostInfo.from_json("h2", '{"healthy": true}').held == ()  # a host of an older version


def test_a_held_unit_is_no_candidate_but_a_successor_an_unfit_one_neither():
    hosts = {"h1": HostInfo("h1"), "h2": HostInfo("h2", down=("v1", "v2"), held=("v1",)), "h3": HostInfo("h3")}
    campaign = rankings(UNITS, hosts)
    succeed = rankings(UNITS, hosts, successors=True)
    assert "h2" not in campaign["v1"] and "h2" in succeed["v1"]
    assert "h2" not in campaign["v2"] and "h2" not in succeed["v2"]
    assert all(campaign[u.name] == succeed[u.name] for u in UNITS if u.name not in ("v1", "v2"))
    # the order among the others is the same: a successor ranking only adds the held host
    assert [h for h in succeed["v1"] if h != "h2"] == list(campaign["v1"])


def _reference(units, hosts, successors):  # type: ignore[no-untyped-def]
    """The placement as first written (one ranking per unit over its own candidates), to hold the
    one-pass `placements` to the same answers."""
    from vipd.placement import Item, assign, ranking
    healthy = {n: h.weight for n, h in hosts.items() if h.healthy and not h.drained}
    targets = assign([Item(u.name, u.prefer, u.avoid, len(u.vips)) for u in units], healthy)
    out = {}
    for u in units:
        cands = {n: w for n, w in healthy.items()
                 if u.name not in hosts[n].down or (successors and u.name in hosts[n].held)}
        order = ranking(u.name, cands, u.prefer, u.avoid)
        target = targets.get(u.name)
        if target in cands:
            order = [target] + [h for h in order if h != target]
        out[u.name] = tuple(order)
    return out


def test_one_pass_placements_match_the_per_unit_definition():
    import random
    from dataclasses import replace

    from vipd.election.hosts import placements
    rnd = random.Random(13)
    names = [f"h{i}" for i in range(1, 6)]
    for _ in range(200):
        units = [Unit(u.name, (replace(u.vips[0], prefer=tuple(rnd.sample(names, rnd.randint(0, 1))),
                                       avoid=tuple(rnd.sample(names, rnd.randint(0, 1)))),))
                 if rnd.random() < 0.3 else u for u in UNITS]
        hosts = {}
        for n in rnd.sample(names, rnd.randint(1, 5)):
            down = tuple(u.name for u in UNITS if rnd.random() < 0.3)
            held = tuple(x for x in down if rnd.random() < 0.5)
            hosts[n] = HostInfo(n, healthy=rnd.random() < 0.9, weight=rnd.choice([0.0, 1.0, 1.0, 2.0]),
                                drained=rnd.random() < 0.1, down=down, held=held)
        place, succ = placements(units, hosts)
        assert place == _reference(units, hosts, False) and succ == _reference(units, hosts, True)


def test_the_memo_answers_from_the_last_placement_only_while_nothing_it_reads_changed():
    """A host key that changes only what placement does not read (its heartbeat address, a
    reason) costs no recomputation: the same answer, the same objects. Any change it does read
    (health, weight, drain, down or held units, the units themselves) is a fresh answer, equal
    to the one without a memo."""
    from dataclasses import replace

    from vipd.election.hosts import PlacementMemo, placements
    memo = PlacementMemo()
    hosts = {n: HostInfo(n) for n in ("h1", "h2", "h3")}
    first = placements(UNITS, hosts, memo)
    cosmetic = dict(hosts, h2=replace(hosts["h2"], peer="10.0.0.2:9655", reasons=("x",), bgp_source="10.0.0.2"))
    assert placements(UNITS, cosmetic, memo) is first
    units2 = list(UNITS)
    for changed, units in [(dict(hosts, h2=replace(hosts["h2"], healthy=False)), UNITS),
                           (dict(hosts, h2=replace(hosts["h2"], weight=2.0)), UNITS),
                           (dict(hosts, h2=replace(hosts["h2"], drained=True)), UNITS),
                           (dict(hosts, h2=replace(hosts["h2"], down=("v1",))), UNITS),
                           (dict(hosts, h2=replace(hosts["h2"], down=("v1",), held=("v1",))), UNITS),
                           ({n: h for n, h in hosts.items() if n != "h3"}, UNITS),
                           (hosts, units2[:3])]:
        got = placements(units, changed, memo)
        assert got is not first and got == placements(units, changed)
    assert placements(units2[:3], hosts, memo) == placements(units2[:3], hosts)


def test_a_host_joined_when_its_vipd_started_never_later_than_now():
    """Placements carry when each host started (on our clock): a host that has run for a while
    is no newcomer just because this host started after it (a restarted host deferred to every
    other host for join_grace, and a planned handover waited a stagger: 230 ms instead of 30)."""
    async def main() -> None:
        now, wall = trio.current_time(), time.time()
        assert joined_at(HostInfo("h2", since=wall - 600), math.inf) == pytest.approx(now - 600, abs=1)
        assert joined_at(HostInfo("h2", since=wall + 60), math.inf) == pytest.approx(now, abs=1)  # clock ahead
        assert joined_at(HostInfo("h2"), math.inf) == -math.inf  # an older vipd, already there: old
        assert joined_at(HostInfo("h2"), 0.0) == pytest.approx(now, abs=1)  # ... that just appeared: new
        h = HostInfo("h2", since=1765000000.123)
        assert HostInfo.from_json("h2", h.to_json()) == h

    trio.run(main)

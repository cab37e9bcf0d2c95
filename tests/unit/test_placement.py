"""Weighted rendezvous hashing: deterministic, stable when hosts leave, spread, weights, prefer/avoid;
bounded-load assignment; the preemption hold-down."""

from __future__ import annotations

import collections
import subprocess
import sys

import pytest

from vipd.placement import (Item, assign, capacities, preferred, ranking, score, unit_hash)

HOSTS = {"h1": 1.0, "h2": 1.0, "h3": 1.0}
VIPS = [f"vip{i}" for i in range(30)]


def counts(placement: dict[str, str | None]) -> list[int]:
    return sorted(collections.Counter(placement.values()).values())


def test_unit_hash_is_in_open_interval_and_known() -> None:
    for v in VIPS:
        for h in HOSTS:
            assert 0.0 < unit_hash(v, h) < 1.0
    # pinned value: placement must never depend on the Python process (no hash() randomisation)
    assert unit_hash("api", "cp1") == pytest.approx(0.8154371266392537, abs=1e-15)
    assert score("api", "cp1", 0) == 0.0


def test_deterministic_across_processes() -> None:
    here = [preferred(v, HOSTS) for v in VIPS]
    code = ("from vipd.placement import preferred;"
            "print(','.join(preferred(f'vip{i}', {'h1': 1.0, 'h2': 1.0, 'h3': 1.0}) for i in range(30)))")
    env = {"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip().split(",") == here
    # and independent of the candidates' order
    assert [preferred(v, dict(reversed(list(HOSTS.items())))) for v in VIPS] == here


def test_no_candidates() -> None:
    assert preferred("api", {}) is None
    assert ranking("api", {}) == []
    assert assign([Item("api")], {}) == {"api": None}


@pytest.mark.parametrize("n_hosts", [2, 3, 5, 8])
def test_removing_a_host_moves_only_its_vips(n_hosts: int) -> None:
    hosts = {f"node{i}": 1.0 + (i % 3) for i in range(n_hosts)}
    vips = [f"svc-{i}" for i in range(200)]
    before = {v: preferred(v, hosts) for v in vips}
    for gone in hosts:
        rest = {h: w for h, w in hosts.items() if h != gone}
        after = {v: preferred(v, rest) for v in vips}
        moved = {v for v in vips if before[v] != after[v]}
        assert moved == {v for v in vips if before[v] == gone}
        # and the host coming back takes back exactly those
        assert {v: preferred(v, hosts) for v in vips} == before


def test_ranking_restricted_is_consistent() -> None:
    """The order of the remaining hosts never changes when one leaves (the rendezvous property)."""
    hosts = {f"n{i}": 1.0 for i in range(6)}
    for v in VIPS:
        full = ranking(v, hosts)
        for gone in hosts:
            rest = {h: w for h, w in hosts.items() if h != gone}
            assert ranking(v, rest) == [h for h in full if h != gone]


def test_pure_spread_three_hosts_thirty_vips() -> None:
    """vip0..vip29 on h1..h3 happens to spread 9/10/11; other names spread worse (multinomial):
    that is what assign() is for."""
    assert counts({v: preferred(v, HOSTS) for v in VIPS}) == [9, 10, 11]
    assert counts({f"vip{i}": preferred(f"vip{i}", {"node1": 1, "node2": 1, "node3": 1}) for i in range(30)}) == [3, 10, 17]


def test_pure_spread_large_sample() -> None:
    vips = [f"vip{i}" for i in range(3000)]
    c = collections.Counter(preferred(v, HOSTS) for v in vips)
    assert all(900 <= n <= 1100 for n in c.values()), c


def test_weights_bias_the_spread() -> None:
    vips = [f"vip{i}" for i in range(3000)]
    c = collections.Counter(preferred(v, {"small": 1.0, "big": 3.0}) for v in vips)
    assert 650 <= c["small"] <= 850 and 2150 <= c["big"] <= 2350, c
    # weight 0 drains: never preferred while another host is around, still better than nothing
    c0 = collections.Counter(preferred(v, {"a": 1.0, "b": 1.0, "drained": 0.0}) for v in vips)
    assert c0["drained"] == 0
    assert preferred("x", {"drained": 0.0}) == "drained"


def test_prefer_and_avoid() -> None:
    for v in VIPS:
        assert preferred(v, HOSTS, prefer=["h2"]) == "h2"
        assert preferred(v, HOSTS, prefer=["h2", "h3"]) in ("h2", "h3")
        assert preferred(v, HOSTS, avoid=["h1", "h2"]) == "h3"
        r = ranking(v, HOSTS, prefer=["h3"], avoid=["h1"])
        assert r[0] == "h3" and r[-1] == "h1"
        # a preferred host that is not a healthy candidate does not count
        assert preferred(v, {"h1": 1.0, "h3": 1.0}, prefer=["h2"]) == preferred(v, {"h1": 1.0, "h3": 1.0})
        # avoided hosts are still taken when nothing else is healthy
        assert preferred(v, {"h1": 1.0}, avoid=["h1"]) == "h1"
    # the prefer tier spreads by rendezvous too
    c = collections.Counter(preferred(v, HOSTS, prefer=["h1", "h2"]) for v in VIPS)
    assert set(c) == {"h1", "h2"}


def test_assign_balances_three_by_thirty() -> None:
    for hosts in (HOSTS, {"node1": 1, "node2": 1, "node3": 1}, {"cp1": 1, "cp2": 1, "cp3": 1}):
        placed = assign([Item(v) for v in VIPS], hosts)
        assert counts(placed) == [10, 10, 10]
        # each VIP sits on one of its two best hosts (the third only when both are full)
        top2 = sum(placed[v] in ranking(v, hosts)[:2] for v in VIPS)
        assert top2 >= 28


def test_assign_removal_moves_few_others() -> None:
    total_extra = 0
    for trial in range(50):
        items = [Item(f"t{trial}-vip{i}") for i in range(30)]
        before = assign(items, HOSTS)
        after = assign(items, {"h1": 1.0, "h2": 1.0})
        extra = [k for k, h in before.items() if h != "h3" and after[k] != h]
        assert len(extra) <= 6
        total_extra += len(extra)
        assert counts(after) == [15, 15]
    assert total_extra / 50 < 2.0  # on average about one VIP beyond the 10 that had to move


def test_assign_weights_groups_and_prefer() -> None:
    hosts = {"a": 1.0, "b": 1.0, "c": 2.0}
    assert capacities(30, hosts) == {"a": 8, "b": 8, "c": 15}
    placed = assign([Item(v) for v in VIPS], hosts)
    c = collections.Counter(placed.values())
    assert c["c"] == 15 and c["a"] + c["b"] == 15
    # a group of 2 counts as 2 units; pinned items go where they are pinned even over capacity
    items = [Item("grp", size=2)] + [Item(f"p{i}", prefer=("a",)) for i in range(12)] + [Item(v) for v in VIPS[:6]]
    placed = assign(items, {"a": 1.0, "b": 1.0})
    assert all(placed[f"p{i}"] == "a" for i in range(12))
    assert placed["grp"] == "b" and all(placed[v] == "b" for v in VIPS[:6])
    # avoid beats balance too
    placed = assign([Item(v, avoid=("a",)) for v in VIPS[:4]], {"a": 1.0, "b": 1.0})
    assert set(placed.values()) == {"b"}


def test_assign_overload_lets_rendezvous_decide_more() -> None:
    loose = assign([Item(v) for v in VIPS], {"node1": 1, "node2": 1, "node3": 1}, overload=0.2)
    assert max(counts(loose)) == 12

"""The lab monitor's fence reading, without a kernel: element parsing and the serving rule."""

from __future__ import annotations

import ipaddress
import struct

from vipd.dataplane.fence_wire import _elem, _key_attr, _nla
from vipd.lab import fence_tokens as ft
from vipd.lab.fence_tokens import REREAD, TokenGates

A, B, C = (ipaddress.ip_address(x) for x in ("10.0.0.1", "10.0.0.2", "fd00::1"))


def message(elems: bytes) -> bytes:
    """The attributes of one NEWSETELEM message (after nfgenmsg): table, set, elements."""
    return ft._TABLE_ATTR + ft._SET_ATTR["token4"] + _nla(ft._L_ELEMENTS, elems)


def both(data: bytes, keys: frozenset[bytes]) -> tuple[dict[bytes, int | None], dict[bytes, int | None]]:
    fast: dict[bytes, int | None] = {}
    full: dict[bytes, int | None] = {}
    ft._find_elements(data, 0, len(data), keys, fast)
    ft._parse_elements(data, 0, len(data), keys, full)
    return fast, full


def test_wanted_elements_with_their_remaining_time() -> None:
    data = message(_elem(_key_attr(A), 1500) + _elem(_key_attr(B), None) + _elem(_key_attr(ipaddress.ip_address("10.0.0.3")), 7))
    fast, full = both(data, frozenset({A.packed, B.packed, ipaddress.ip_address("10.0.0.9").packed}))
    assert fast == full == {A.packed: 1500, B.packed: None}


def test_a_key_elsewhere_than_an_element_key_falls_back_to_the_full_parse() -> None:
    # A's bytes as the *data* of another element: not A's element
    trap = struct.pack("=HH", 8, 1) + A.packed
    odd = _nla(ft._LIST_ELEM, _nla(ft._E_KEY, _nla(1, B.packed)) + _nla(2, trap))
    fast, full = both(message(odd), frozenset({A.packed, B.packed}))
    assert fast == full == {B.packed: None}


def serving(g: TokenGates, state: dict[str, frozenset], t: float) -> dict:  # type: ignore[type-arg]
    return {ip: sorted(names) for ip, names in g.judge(state, t).serving.items()}


def test_serving_rule() -> None:
    g = TokenGates()
    state = {"h1": frozenset({A}), "h2": frozenset({A}), "h3": frozenset({C})}
    assert serving(g, state, 0.0) == {A: ["h1", "h2"], C: ["h3"]}  # never read: the address decides
    g.open[("h1", A)] = False
    g.end[("h1", A)] = 10.0
    g.read_at["h1"] = 5.0
    g.open[("h2", A)] = False  # managed, no token ever seen
    g.read_at["h2"] = 5.0
    g.open[("h3", C)] = True  # no table
    j = g.judge(state, 9.0)
    # h1 serves through its token; last read 4 s ago: due for a re-read (a re-arm may have shortened it)
    assert j.serving == {A: {"h1"}, C: {"h3"}} and j.gated == {("h1", A)} and j.passed == {"h1"}
    g.read_at["h1"] = 9.0
    j = g.judge(state, 9.01)
    assert j.serving == {A: {"h1"}, C: {"h3"}} and not j.passed and j.next_end == 9.0 + REREAD
    # past its known end, h1 is read again before it counts as gone; after that read, it is gone
    j = g.judge(state, 10.5)
    assert j.serving == {C: {"h3"}} and j.passed == {"h1"}
    g.read_at["h1"] = 10.4
    assert not g.judge(state, 10.5).passed


def test_group_elements_name_the_grant_chain_they_jump_to() -> None:
    from vipd.dataplane.fence_wire import _jump
    data = ft._TABLE_ATTR + _nla(2, b"group4\0") + _nla(ft._L_ELEMENTS, _elem(_key_attr(A), None, _jump(2))
                                                         + _elem(_key_attr(B), None, _jump(7)))
    out: dict[bytes, str] = {}
    ft._find_groups(data, 0, len(data), frozenset({A.packed, C.packed}), out)
    assert out == {A.packed: "grant_2"}


def test_a_read_a_batch_landed_in_is_taken_again(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The token set, group map and grants are separate dumps: a batch between them (a VIP leaving
    its group as its token closes) read half before, half after looked like a live token in no
    group. A read whose generation moved is taken again (at most TRIES times)."""
    gens = iter([7, 8, 8, 8])  # before/after of each attempt: torn, then whole
    monkeypatch.setattr(ft, "generation", lambda sock: next(gens))
    calls = []
    gates = TokenGates()
    monkeypatch.setattr(gates, "_read", lambda host, sock, ips: calls.append(host) or 1.0)
    assert gates.read("h1", None, [A]) == 1.0  # type: ignore[arg-type]
    assert calls == ["h1", "h1"] and gates.torn == 1
    always = iter(range(100))
    monkeypatch.setattr(ft, "generation", lambda sock: next(always))
    calls.clear()
    gates.read("h1", None, [A])  # type: ignore[arg-type]
    assert len(calls) == ft.TRIES  # bounded: the last is taken

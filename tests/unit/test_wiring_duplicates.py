"""vipd/wiring_duplicates.py: which interfaces get a duplicate-responder watch, at start and when a
reload adds VIPs (one place decides; a reload gets back only the watches it must run)."""

from __future__ import annotations

import ipaddress
from typing import Any

from vipd.model import VipSpec
from vipd.wiring_duplicates import DuplicateWatching


def vip(name: str, address: str, interface: str, **kw: Any) -> VipSpec:
    return VipSpec(name=name, address=ipaddress.ip_interface(address), interface=interface, **kw)


def test_a_watch_per_checked_nic_interface_and_a_reload_gets_only_the_new_ones() -> None:
    d = DuplicateWatching()
    d.duplicates = {}
    nl: Any = object()  # (a watch touches the netlink only when it runs)
    first = d.watch_duplicates_of(nl, [vip("a", "10.0.0.1/32", "eth0"), vip("r", "10.9.0.1/32", "lo"),
                                       vip("u", "10.1.0.1/32", "eth1", conflict_check=False)])
    assert [w.ifname for w in first] == ["eth0"] and sorted(d.duplicates) == ["eth0"]
    again = d.watch_duplicates_of(nl, [vip("a", "10.0.0.1/32", "eth0"), vip("b", "10.2.0.1/32", "eth2")])
    assert [w.ifname for w in again] == ["eth2"] and sorted(d.duplicates) == ["eth0", "eth2"]
    assert d.duplicates["eth0"] is first[0]  # kept, running, not replaced
    assert d._unit_of_ip == {ipaddress.ip_address("10.0.0.1"): "a", ipaddress.ip_address("10.2.0.1"): "b"}

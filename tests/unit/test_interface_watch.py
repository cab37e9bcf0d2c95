"""InterfaceWatch (vipd/interfaces.py) with a fake interface listing: which units are unfit here
because a NIC of theirs is missing, on every tick and after a reload replaces the units."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any, Callable

import pytest

from vipd import interfaces
from vipd.interfaces import InterfaceWatch
from vipd.model import Unit, VipSpec


def unit(name: str, address: str, nic: str) -> Unit:
    v = VipSpec(name, ipaddress.ip_interface(address), nic)
    return Unit(v.unit, (v,))


class Fitness:
    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}

    def set_unavailable(self, reasons: dict[str, str]) -> None:
        self.reasons = dict(reasons)


class Netlink:
    async def call_checked(self, what: str, fn: Callable[[Any], Any], error: type[Exception]) -> Any:
        return fn(None)


async def test_missing_nics_make_their_units_unfit_and_a_reload_is_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    present = {"eth0", "eth1"}
    monkeypatch.setattr(interfaces, "_names", lambda nl: set(present))
    first = (unit("a", "10.0.0.1/32", "eth0"), unit("b", "10.0.0.2/32", "eth1"), unit("c", "10.0.0.3/32", "lo"))
    units: list[tuple[Unit, ...]] = [first]
    fitness = Fitness()
    watch = InterfaceWatch(Netlink(), fitness, lambda: units[0])  # type: ignore[arg-type]
    await watch.refresh()
    assert watch.missing == frozenset() and fitness.reasons == {}
    present.discard("eth1")
    await watch.refresh()
    assert watch.missing == {"eth1"} and fitness.reasons == {"b": "interface eth1 missing"}
    units[0] = (unit("a", "10.0.0.1/32", "eth0"), unit("d", "10.0.0.4/32", "eth2"))  # a reload
    await watch.refresh()
    assert watch.missing == {"eth2"} and fitness.reasons == {"d": "interface eth2 missing"}
    present.add("eth2")
    await watch.refresh()
    assert watch.missing == frozenset() and fitness.reasons == {}


async def test_a_failed_listing_is_one_error_line_and_changes_nothing(monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """The interface listing fails (netlink): one `interface_list_failed` line naming the error; the
    missing set and every unit's fitness stay as the last good listing left them."""
    from vipd.errors import DataplaneError

    caplog.set_level(logging.INFO, logger="vipd")
    present = {"eth0"}
    monkeypatch.setattr(interfaces, "_names", lambda nl: set(present))
    units = (unit("a", "10.0.0.1/32", "eth0"), unit("b", "10.0.0.2/32", "eth1"))
    fitness = Fitness()
    watch = InterfaceWatch(Netlink(), fitness, lambda: units)  # type: ignore[arg-type]
    await watch.refresh()
    assert watch.missing == {"eth1"} and fitness.reasons == {"b": "interface eth1 missing"}

    def fail(nl: object) -> set[str]:
        raise DataplaneError("list interfaces: ENOBUFS")

    monkeypatch.setattr(interfaces, "_names", fail)
    caplog.clear()
    await watch.refresh()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "event=interface_list_failed" in lines[0] and "ENOBUFS" in lines[0], lines
    assert all(r.exc_info is None for r in caplog.records)  # no traceback
    assert watch.missing == {"eth1"} and fitness.reasons == {"b": "interface eth1 missing"}

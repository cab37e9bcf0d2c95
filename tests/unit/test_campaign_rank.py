"""Campaigns of units that probe before claiming (a VIP on a NIC) go first (vipd/app.py
`Daemon._campaign_rank`, used by OwnerKeys' campaign batches), read from the running controllers:
a unit a reload added is ranked by its own VIPs; an unknown unit goes last."""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace

from vipd.app import Daemon
from vipd.config import VipSpec


def test_nic_units_rank_first_lo_units_and_unknown_ones_after() -> None:
    nic = VipSpec("n", ipaddress.ip_interface("10.0.0.1/32"), "eth0")
    lo = VipSpec("l", ipaddress.ip_interface("10.9.0.1/32"), "lo")
    d = SimpleNamespace(controllers={"n": SimpleNamespace(vips=[nic]), "l": SimpleNamespace(vips=[lo]),
                                     "both": SimpleNamespace(vips=[lo, nic])})
    assert [Daemon._campaign_rank(d, u) for u in ("n", "l", "both", "gone")] == [0, 1, 0, 1]  # type: ignore[arg-type]

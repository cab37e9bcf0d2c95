"""Placement from host presence (vipd/election/hosts.py): who may campaign and who may be named
successor. A host in its release hold-off for a unit does not campaign for it, yet is a fine
successor (it takes over when the owner that named it dies)."""

from __future__ import annotations

import ipaddress

from vipd.election.hosts import HostInfo, rankings
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

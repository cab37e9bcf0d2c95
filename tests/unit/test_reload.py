"""Config reload: the pure diff (vipd/reload_diff.py), and Fitness across a reload, a drain and a
missing NIC (what HealthChanged each unit gets, and what the presence says)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from vipd import config
from vipd.fitness import Fitness
from vipd.interfaces import unavailable
from vipd.model import Event, HealthChanged
from vipd.reload_diff import diff

TCP = {"type": "tcp", "host": "127.0.0.1", "port": 22}


def cfg(vips: list[dict[str, Any]] | None = None, **tables: Any) -> config.Config:
    data: dict[str, Any] = {"node": "h1", "state_dir": "/run/vt-test", **tables}
    data["vip"] = vips if vips is not None else [
        {"name": "keep", "address": "10.0.0.10/24", "interface": "eth0"},
        {"name": "tune", "address": "10.0.0.11/24", "interface": "eth0"},
        {"name": "move", "address": "10.0.0.12/24", "interface": "eth0"},
        {"name": "gone", "address": "10.0.0.13/24", "interface": "eth0"},
    ]
    return config.parse(data)


def test_every_kind_of_change_is_classified() -> None:
    old = cfg()
    new = cfg([{"name": "keep", "address": "10.0.0.10/24", "interface": "eth0"},
               {"name": "tune", "address": "10.0.0.11/24", "interface": "eth0", "check": [TCP],
                "prefer": ["h2"], "announce_count": 5},
               {"name": "move", "address": "10.0.0.22/24", "interface": "eth0"},
               {"name": "new", "address": "10.0.0.14/24", "interface": "eth0"}],
              timing={"release_holdoff": 5.0, "reconcile_interval": 0.5},
              placement={"preempt_delay": 9.0, "handover_batch": 16}, host={"weight": 2.0}, hooks={"owner": ["/bin/true"]},
              log_level="debug")
    d = diff(old, new)
    assert [u.name for u in d.added] == ["new"]
    assert d.removed == ("gone",)
    assert [u.name for u in d.replaced] == ["move"]
    assert [u.name for u in d.retuned] == ["tune"]
    assert d.unchanged == ("keep",)
    assert set(d.live) == {"timing.release_holdoff", "timing.reconcile_interval", "placement.preempt_delay",
                           "placement.handover_batch", "host.weight", "hooks", "log_level"}
    assert d.restart == ()
    assert "added new" in d.summary() and "removed gone" in d.summary()
    assert diff(old, cfg()).empty


@pytest.mark.parametrize("tables, key", [
    ({"node": "h9"}, "node"),
    ({"state_dir": "/run/vt-other"}, "state_dir"),
    ({"etcd": {"lease_ttl": 5}}, "etcd"),
    ({"etcd": {"endpoints": ["http://127.0.0.2:2379"]}}, "etcd"),
    ({"metrics": {"listen": "127.0.0.1:9999"}}, "metrics_listen"),
    ({"timing": {"fence_margin": 2.0}}, "timing.fence_margin"),
    ({"timing": {"keepalives_per_ttl": 4}}, "timing.keepalives_per_ttl"),
])
def test_settings_only_a_restart_can_change_are_named(tables: dict[str, Any], key: str) -> None:
    d = diff(cfg(), cfg(**tables))
    assert d.restart and d.restart[0] == key


def test_a_dsr_services_change_needs_a_restart_and_says_which_vip() -> None:
    """The DSR director and backend roles are built at start (vipd/wiring_dsr.py): a reload that
    adds, changes or removes a VIP's services is refused, naming the VIP."""
    def web(port: int | None) -> list[dict[str, Any]]:
        v: dict[str, Any] = {"name": "web", "address": "10.0.0.10/24", "interface": "eth0"}
        if port is not None:
            v["service"] = [{"protocol": "tcp", "port": port, "backends": [{"address": "10.0.0.20"}]}]
        return [v]

    for old, new in ((None, 80), (80, 8080), (80, None)):
        d = diff(cfg(web(old)), cfg(web(new)))
        assert d.restart == ("services (DSR of VIP web changed)",), (old, new)
    assert diff(cfg(web(80)), cfg(web(80))).empty


def test_a_group_gaining_a_member_is_replaced_and_interface_change_too() -> None:
    old = cfg([{"name": "a", "address": "10.0.0.10/24", "interface": "eth0", "group": "g"}])
    new = cfg([{"name": "a", "address": "10.0.0.10/24", "interface": "eth0", "group": "g"},
               {"name": "b", "address": "10.0.0.11/24", "interface": "eth0", "group": "g"}])
    assert [u.name for u in diff(old, new).replaced] == ["g"]
    moved = cfg([{"name": "a", "address": "10.0.0.10/24", "interface": "eth1", "group": "g"}])
    assert [u.name for u in diff(old, moved).replaced] == ["g"]


class Posts:
    def __init__(self) -> None:
        self.events: list[tuple[str, Event]] = []
        self.presence = 0

    def post(self, unit: str, ev: Event) -> None:
        self.events.append((unit, ev))

    def changed(self) -> None:
        self.presence += 1

    def set_healthy(self, vip: str, healthy: bool) -> None:
        pass


def test_missing_nic_makes_only_its_units_unfit_and_says_why() -> None:
    c = cfg([{"name": "a", "address": "10.0.0.10/24", "interface": "eth0"},
             {"name": "b", "address": "10.1.0.10/24", "interface": "eth1"},
             {"name": "lo1", "address": "10.2.0.10/32", "interface": "lo"}])
    assert unavailable(c.units, {"eth0"}) == {"b": "interface eth1 missing"}
    p = Posts()
    f = Fitness(c, p.post, p.changed, p)
    f.set_unavailable(unavailable(c.units, {"eth0"}))
    assert p.events == [("b", HealthChanged(False, "interface eth1 missing"))]
    assert f.unavailable("b") == "interface eth1 missing" and f.unavailable("a") == ""
    info = json.loads(f.presence())
    assert info["healthy"] and info["down"] == ["b"] and "b: interface eth1 missing" in info["reasons"]
    f.set_unavailable({})
    assert p.events[-1] == ("b", HealthChanged(True, ""))


def test_drain_publishes_first_then_makes_every_unit_unfit() -> None:
    c = cfg()
    p = Posts()
    f = Fitness(c, p.post, p.changed, p)
    f.set_drained("since now", units=False)
    assert p.events == [] and json.loads(f.presence())["drained"] is True
    f.set_drained("since now")
    assert sorted(u for u, ev in p.events) == ["gone", "keep", "move", "tune"]
    assert all(isinstance(ev, HealthChanged) and not ev.healthy and "drained" in ev.reason for _, ev in p.events)
    f.set_drained("")
    assert json.loads(f.presence())["drained"] is False and all(f.ok.values())


def test_a_stop_publishes_drained_and_never_makes_a_drained_host_fit_again() -> None:
    c = cfg()
    p = Posts()
    f = Fitness(c, p.post, p.changed, p)
    f.stopping()
    assert p.events == [] and json.loads(f.presence())["drained"] is True and all(f.ok.values())
    f = Fitness(c, p.post, p.changed, p)
    f.set_drained("since now")  # the operator drained it: every unit unfit
    p.events.clear()
    f.stopping()
    assert p.events == [] and not any(f.ok.values()) and f.drained == "since now"
    assert json.loads(f.presence())["drained"] is True


async def test_reconfigure_keeps_unchanged_checks_and_a_new_check_does_not_drop_a_served_unit() -> None:
    old = cfg([{"name": "a", "address": "10.0.0.10/24", "interface": "eth0"},
               {"name": "b", "address": "10.0.0.11/24", "interface": "eth0"}])
    p = Posts()
    f = Fitness(old, p.post, p.changed, p)
    async with trio.open_nursery() as nursery:
        await nursery.start(f.monitor.run)
        new = cfg([{"name": "a", "address": "10.0.0.10/24", "interface": "eth0", "check": [TCP]},
                   {"name": "c", "address": "10.0.0.12/24", "interface": "eth0", "check": [TCP]}])
        started = f.reconfigure(new)
        assert [n for n, _ in started] == ["a/0:tcp:127.0.0.1:22", "c/0:tcp:127.0.0.1:22"]
        # "a" was served without a check: the new one does not count until it decides; the new
        # unit "c" counts its check from the start, as at start-up; "b" is forgotten
        assert f.ok == {"a": True, "c": False}
        assert p.events == []
        assert "b" not in json.loads(f.presence())["down"]
        nursery.cancel_scope.cancel()

"""Config validation: every bad input names its key and why; good input parses into frozen types."""

from __future__ import annotations

import dataclasses
import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest

from vipd import config
from vipd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def parse(extra: dict | None = None, vips: list | None = None, **top):
    data = {"node": "h1", **top}
    if extra:
        data.update(extra)
    data["vip"] = vips if vips is not None else [{"name": "api", "address": "10.0.0.10/24", "interface": "eth0"}]
    return config.parse(data)


def test_example_config_parses():
    cfg = config.load(ROOT / "conf" / "vipd.toml", hostname="cp1")
    assert cfg.node == "cp1"
    assert [v.name for v in cfg.vips] == ["api", "api-v6"]
    assert cfg.etcd.lease_ttl == 10 and cfg.etcd.endpoints[0].startswith("https://")


def test_defaults_and_types():
    cfg = parse()
    v = cfg.vips[0]
    assert v.address == ipaddress.ip_interface("10.0.0.10/24") and v.interface == "eth0"
    assert (v.announce_count, v.announce_interval, v.announce_reply) == (3, 0.2, False)
    assert cfg.etcd.prefix == "/vipd/default/"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.node = "x"  # type: ignore[misc]


def test_bare_address_gets_host_prefix_and_lo_default():
    cfg = parse(vips=[{"name": "a", "address": "192.0.2.1"}, {"name": "b", "address": "2001:db8::1"}])
    assert str(cfg.vips[0].address) == "192.0.2.1/32" and cfg.vips[0].on_loopback
    assert str(cfg.vips[1].address) == "2001:db8::1/128" and cfg.vips[1].version == 6


def test_prefix_gets_trailing_slash():
    assert parse({"etcd": {"prefix": "/vipd/x"}}).etcd.prefix == "/vipd/x/"


THREE = ["http://10.0.0.11:2379", "http://10.0.0.12:2379", "http://10.0.0.13:2379"]


def test_defaults_fit_three_members_and_ride_out_an_election():
    cfg = parse({"etcd": {"endpoints": THREE}})
    e, t = cfg.etcd, cfg.timing
    assert (e.lease_ttl, e.request_timeout, t.fence_margin, t.keepalives_per_ttl) == (10, 1.0, 1.5, 10)
    # a request timeout per member still fits between one keepalive interval and the fence deadline
    assert e.request_timeout * 3 <= e.lease_ttl - t.fence_margin - e.lease_ttl / t.keepalives_per_ttl
    # the fast single-etcd profile the lab uses stays valid
    assert parse({"etcd": {"lease_ttl": 3, "request_timeout": 0.5}, "timing": {"keepalives_per_ttl": 6}})


@pytest.mark.parametrize("data,key,why", [
    ({"bogus": 1}, "bogus", "unknown key"),
    ({"etcd": {"endpoint": ["http://a:1"]}}, "etcd.endpoint", "unknown key"),
    ({"etcd": {"endpoints": []}}, "etcd.endpoints", "at least one"),
    ({"etcd": {"endpoints": ["a:2379"]}}, "etcd.endpoints[0]", "http(s)://"),
    ({"etcd": {"lease_ttl": 0}}, "etcd.lease_ttl", ">= 1"),
    ({"etcd": {"lease_ttl": "3"}}, "etcd.lease_ttl", "expected an integer"),
    ({"etcd": {"lease_ttl": True}}, "etcd.lease_ttl", "boolean"),
    ({"etcd": {"lease_ttl": 2}}, "etcd.lease_ttl", "fence_margin"),
    ({"etcd": {"endpoints": THREE, "request_timeout": 2.6}}, "etcd.request_timeout", "does not fit"),
    ({"etcd": {"endpoints": THREE, "lease_ttl": 3}}, "etcd.request_timeout", "3 endpoints"),
    ({"etcd": {"lease_ttl": 3, "request_timeout": 1.5}}, "etcd.request_timeout", "(1.20 s)"),
    ({"etcd": {"prefix": "vipd/"}}, "etcd.prefix", "start with '/'"),
    ({"etcd": {"cert_file": "/x"}}, "etcd.key_file", "go together"),
    ({"etcd": {"username": "u"}}, "etcd.password", "go together"),
    ({"etcd": {"password": "p", "password_file": "/x", "username": "u"}}, "etcd.password_file", "not both"),
    ({"etcd": {"username": "u", "password_file": "/nonexistent/pw"}}, "etcd.password_file", "cannot read"),
    ({"timing": {"fence_margin": -1}}, "timing.fence_margin", ">= 1.25"),
    ({"timing": {"fence_margin": 0.5}}, "timing.fence_margin", ">= 1.25"),
    ({"timing": {"keepalives_per_ttl": 1}}, "timing.keepalives_per_ttl", ">= 2"),
    ({"metrics": {"listen": "9654"}}, "metrics.listen", "host:port"),
    ({"log_level": "loud"}, "log_level", "one of"),
    ({"node": "bad name"}, "node", "not a valid node name"),
])
def test_invalid_top_level(data, key, why):
    with pytest.raises(ConfigError) as ei:
        parse(data)
    assert ei.value.key == key
    assert why in ei.value.reason


@pytest.mark.parametrize("vip,key,why", [
    ({"address": "10.0.0.10"}, "vip[0].name", "required"),
    ({"name": "a"}, "vip[0].address", "required"),
    ({"name": "a", "address": "10.0.0.300"}, "vip[0].address", "not an IP address"),
    ({"name": "a", "address": "10.0.0.0/24"}, "vip[0].address", "network or broadcast"),
    ({"name": "a", "address": "224.0.0.5"}, "vip[0].address", "cannot be a VIP"),
    ({"name": "a", "address": "fe80::1"}, "vip[0].address", "cannot be a VIP"),
    ({"name": "a b", "address": "10.0.0.10"}, "vip[0].name", "not a valid name"),
    ({"name": "a", "address": "10.0.0.10", "interface": "eth0/1"}, "vip[0].interface", "not a valid interface"),
    ({"name": "a", "address": "10.0.0.10", "interface": "averyveryverylongname"}, "vip[0].interface", "not a valid"),
    ({"name": "a", "address": "10.0.0.10", "announce_count": 101}, "vip[0].announce_count", "between 0 and 100"),
    ({"name": "a", "address": "10.0.0.10", "announce_interval": 0}, "vip[0].announce_interval", "> 0"),
    ({"name": "a", "address": "10.0.0.10", "announce_reply": "yes"}, "vip[0].announce_reply", "boolean"),
    ({"name": "a", "address": "10.0.0.10", "port": 80}, "vip[0].port", "unknown key"),
])
def test_invalid_vip(vip, key, why):
    with pytest.raises(ConfigError) as ei:
        parse(vips=[vip])
    assert (ei.value.key, why in ei.value.reason) == (key, True), str(ei.value)


def test_duplicates_are_rejected():
    with pytest.raises(ConfigError, match=r"vip\[1\].name: duplicate name 'a'"):
        parse(vips=[{"name": "a", "address": "10.0.0.1"}, {"name": "a", "address": "10.0.0.2"}])
    with pytest.raises(ConfigError, match=r"vip\[1\].address: duplicate address 10.0.0.1"):
        parse(vips=[{"name": "a", "address": "10.0.0.1/24"}, {"name": "b", "address": "10.0.0.1/32"}])


def test_vip_list_must_hold_tables():
    with pytest.raises(ConfigError, match=r"vip\[0\]: must be a table"):
        parse(vips=["10.0.0.1"])


def test_bad_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("node = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "missing.toml")


def test_check_host_rejects_missing_interface(tmp_path):
    (tmp_path / "eth0").mkdir()
    cfg = parse()
    config.check_host(cfg, sys_class_net=str(tmp_path))
    cfg = parse(vips=[{"name": "a", "address": "10.0.0.1", "interface": "eth9"}])
    with pytest.raises(ConfigError, match=r"vip\[0\].interface: no interface 'eth9'"):
        config.check_host(cfg, sys_class_net=str(tmp_path))


def test_vipd_check_command_exit_codes(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('node = "h1"\n[[vip]]\nname = "a"\naddress = "192.0.2.10"\ninterface = "lo"\n')
    bad = tmp_path / "bad.toml"
    bad.write_text('node = "h1"\n[[vip]]\nname = "a"\naddress = "192.0.2.10"\ninterface = "lo"\nport = 1\n')
    ok = subprocess.run([sys.executable, "-m", "vipd", "check", "-c", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "ok" in ok.stdout
    ko = subprocess.run([sys.executable, "-m", "vipd", "check", "-c", str(bad)], capture_output=True, text=True)
    assert ko.returncode == 2
    assert "vip[0].port: unknown key" in ko.stderr


def test_groups_make_one_election_unit():
    cfg = parse(vips=[{"name": "web4", "address": "10.0.0.1", "group": "web"},
                      {"name": "web6", "address": "2001:db8::1", "group": "web"},
                      {"name": "api", "address": "10.0.0.2"}])
    assert [(u.name, [v.name for v in u.vips]) for u in cfg.units] == [("web", ["web4", "web6"]), ("api", ["api"])]
    assert cfg.unit_of("web6") == "web" and cfg.unit_of("web") == "web" and cfg.unit_of("api") == "api"
    with pytest.raises(KeyError):
        cfg.unit_of("nosuch")


def test_group_name_may_not_shadow_another_vip():
    with pytest.raises(ConfigError, match=r"vip\[1\].group: 'api' is also the name of vip\[0\]"):
        parse(vips=[{"name": "api", "address": "10.0.0.2"}, {"name": "x", "address": "10.0.0.1", "group": "api"}])


def test_health_placement_hooks_sections():
    cfg = parse({"host": {"weight": 2, "check": [{"type": "tcp", "host": "127.0.0.1", "port": 22}]},
                 "placement": {"preempt": False, "preempt_delay": 7},
                 "hooks": {"owner": ["/bin/true"], "timeout": 3}},
                vips=[{"name": "a", "address": "10.0.0.1", "prefer": ["h2"], "avoid": ["h3"],
                       "check": [{"type": "http", "url": "https://127.0.0.1:6443/readyz", "insecure": True}]}])
    assert cfg.host.weight == 2.0 and len(cfg.host.checks) == 1
    assert (cfg.placement.preempt, cfg.placement.preempt_delay) == (False, 7.0)
    assert cfg.hooks.command("owner") == ("/bin/true",) and cfg.hooks.timeout == 3
    u = cfg.units[0]
    assert (u.prefer, u.avoid, len(u.checks)) == (("h2",), ("h3",), 1)


@pytest.mark.parametrize("data,vips,key", [
    ({"host": {"weight": -1}}, None, "host.weight"),
    ({"host": {"wieght": 1}}, None, "host.wieght"),
    ({"placement": {"preempt_delay": 0}}, None, "placement.preempt_delay"),
    ({"hooks": {"promoted": ["/bin/true"]}}, None, "hooks.promoted"),
    ({"host": {"check": [{"type": "tcp", "host": "127.0.0.1"}]}}, None, "host.check[0].port"),
    ({}, [{"name": "a", "address": "10.0.0.1", "prefer": ["h1"], "avoid": ["h1"]}], "vip[0].avoid"),
    ({}, [{"name": "a", "address": "10.0.0.1", "prefer": ["bad name"]}], "vip[0].prefer[0]"),
    ({}, [{"name": "a", "address": "10.0.0.1", "group": "g", "prefer": ["h1"]},
          {"name": "b", "address": "10.0.0.2", "group": "g"}], "vip[1].prefer"),
])
def test_invalid_health_placement_hooks(data, vips, key):
    with pytest.raises(ConfigError) as ei:
        parse(data, vips=vips)
    assert ei.value.key == key, str(ei.value)


@pytest.mark.parametrize("name", ["kube-apiserver.toml", "haproxy.toml"])
def test_recipes_parse(name):
    cfg = config.load(ROOT / "conf" / name, hostname="cp1")
    assert cfg.vips and all(v.interface for v in cfg.vips)
    assert any(u.checks for u in cfg.units)


def test_bgp_egress_anycast():
    cfg = parse({"bgp": {"source": "198.18.255.1", "peers": ["10.0.0.1"], "snat": True},
                 "egress": [{"name": "web", "vip": "api", "destinations": ["198.51.100.0/24"], "protocol": "tcp",
                             "ports": [80, 443], "sources": ["10.1.0.0/16"], "out_interface": "eth0"}]},
                vips=[{"name": "api", "address": "10.0.0.10/24", "interface": "eth0"},
                      {"name": "rt", "address": "198.18.0.10", "interface": "lo", "mode": "anycast"}])
    assert cfg.bgp.enabled and str(cfg.bgp.source) == "198.18.255.1" and cfg.bgp.snat
    assert cfg.egress[0].ports == (80, 443) and cfg.egress[0].vip == "api"
    assert [u.anycast for u in cfg.units] == [False, True]


@pytest.mark.parametrize("data,vips,key", [
    ({"bgp": {"source": "198.18.255.1"}}, None, "bgp.peers"),
    ({"bgp": {"source": "x", "peers": ["10.0.0.1"]}}, None, "bgp.source"),
    ({"bgp": {"source": "198.18.255.1", "source_pool": "198.18.255.0/28", "peers": ["10.0.0.1"]}}, None,
     "bgp.source_pool"),
    ({"bgp": {"source_pool": "198.18.255.0/28", "peers": ["nope"]}}, None, "bgp.peers[0]"),
    ({"egress": [{"name": "e", "vip": "nosuch"}]}, None, "egress[0].vip"),
    ({"egress": [{"name": "e", "vip": "api", "ports": [80]}]}, None, "egress[0].ports"),
    ({"egress": [{"name": "e", "vip": "api", "protocol": "icmp"}]}, None, "egress[0].protocol"),
    ({"egress": [{"name": "e", "vip": "api", "destinations": ["2001:db8::/32"]}]}, None, "egress[0].destinations[0]"),
    ({"egress": [{"name": "e", "vip": "api", "protocol": "tcp", "ports": [0]}]}, None, "egress[0].ports[0]"),
    ({"egress": [{"name": "e", "vip": "api"}, {"name": "e", "vip": "api"}]}, None, "egress[1].name"),
    ({}, [{"name": "rt", "address": "10.0.0.1", "interface": "eth0", "mode": "anycast"}], "vip[0].mode"),
    ({}, [{"name": "rt", "address": "10.0.0.1", "mode": "both"}], "vip[0].mode"),
])
def test_invalid_bgp_egress(data, vips, key):
    with pytest.raises(ConfigError) as ei:
        parse(data, vips=vips if vips is not None else [{"name": "api", "address": "10.0.0.10/24",
                                                          "interface": "eth0"}])
    assert ei.value.key == key, str(ei.value)

"""DSR pure parts: the flow hash (MurmurHash3 x86_32 vectors), Maglev tables (deterministic from the
set of names, balanced, minimal disruption), and `[[vip.service]]` parsing with its sharing rule."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from collections import Counter

import pytest

from vipd import config
from vipd.dsr import maglev
from vipd.errors import ConfigError


def test_murmur3_matches_the_published_vectors() -> None:
    assert maglev.murmur3_32(b"", 0) == 0
    assert maglev.murmur3_32(b"", 1) == 0x514E28B7
    assert maglev.murmur3_32(b"\0\0\0\0", 0) == 0x2362F9DE
    assert maglev.murmur3_32(b"test", 0) == 0xBA6BD213
    assert maglev.murmur3_32(b"aaaa", 0x9747B28C) == 0x5A97808A
    with pytest.raises(ValueError):
        maglev.murmur3_32(b"abc")


def test_flow_key_layout() -> None:
    a, b = ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("10.0.0.2")
    assert maglev.flow_key(a, b, 0x1234, 80, 6) == bytes([10, 0, 0, 1, 10, 0, 0, 2, 0x12, 0x34, 0, 80, 6, 0, 0, 0])
    assert len(maglev.flow_key(ipaddress.ip_address("::1"), ipaddress.ip_address("::2"), 1, 2, 17)) == 40
    with pytest.raises(ValueError):
        maglev.flow_key(a, ipaddress.ip_address("::2"), 1, 2, 6)


def test_table_depends_only_on_the_set_of_names_and_is_balanced() -> None:
    names = [f"web{i}" for i in range(7)]
    t = maglev.build(names)
    assert t == maglev.build(list(reversed(names))) == maglev.build(names + names[:2])
    counts = Counter(t)
    assert len(t) == maglev.TABLE_SIZE and set(counts) == set(range(7))
    assert max(counts.values()) - min(counts.values()) <= 1  # Maglev fills round-robin: shares differ by one slot
    assert maglev.build([]) == [maglev.EMPTY] * maglev.TABLE_SIZE


@pytest.mark.parametrize("n", [3, 5, 10])
def test_removing_one_backend_moves_only_its_slots_and_at_most_1_percent_of_the_others(n: int) -> None:
    names = [f"h{i}" for i in range(n)]
    before = maglev.build(names)
    gone = names[1]
    rest = [x for x in names if x != gone]
    after = maglev.build(rest)
    b = [names[i] for i in before]
    a = [rest[i] for i in after]
    assert gone not in a
    others = [(x, y) for x, y in zip(b, a) if x != gone]
    moved = sum(x != y for x, y in others)
    assert moved <= 0.01 * len(others)


def test_adding_a_backend_takes_its_share_from_everyone() -> None:
    names = ["a", "b", "c"]
    before = [names[i] for i in maglev.build(names)]
    after_names = sorted(names + ["d"])
    after = [after_names[i] for i in maglev.build(after_names)]
    moved = [(x, y) for x, y in zip(before, after) if x != y]
    assert sum(y != "d" for _, y in moved) <= 0.01 * len(before)  # slots move to the newcomer, hardly elsewhere
    assert abs(after.count("d") - maglev.TABLE_SIZE / 4) <= 1


def test_lookup_is_the_programs_slot_choice() -> None:
    names = ["x", "y"]
    t = maglev.build(names)
    h = maglev.flow_hash(ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("10.0.0.9"), 1000, 80, 6)
    assert maglev.lookup(t, names, h) == names[t[h % maglev.TABLE_SIZE]]
    assert maglev.lookup(maglev.build([]), [], h) is None


def vip(**extra: object) -> dict[str, object]:
    return {"name": "web", "address": "10.0.0.100/24", "interface": "eth0", **extra}


def svc(**extra: object) -> dict[str, object]:
    return {"protocol": "tcp", "port": 80, "backends": [{"node": "h3", "address": "10.0.0.13"},
                                                        {"address": "10.0.0.50"}], **extra}


def parse(*services: dict[str, object], **vip_extra: object) -> config.Config:
    return config.parse({"node": "h1", "vip": [vip(service=list(services), **vip_extra)]})


def test_services_parse_into_frozen_specs() -> None:
    cfg = parse(svc(), svc(protocol="udp", port=80), svc(port=443, check_interval=2, check_timeout=1))
    s = cfg.vips[0].services
    assert [x.label for x in s] == ["tcp/80", "udp/80", "tcp/443"]
    assert [b.name for b in s[0].backends] == ["h3", "10.0.0.50"]
    assert s[0].backends[0].node == "h3" and s[0].backends[1].node is None
    assert (s[2].check_interval, s[2].check_timeout) == (2.0, 1.0)
    assert parse().vips[0].services == ()


def test_sharing_a_vip_needs_distinct_protocol_and_port_and_the_error_names_both() -> None:
    with pytest.raises(ConfigError) as e:
        parse(svc(), svc(port=443), svc(backends=[{"address": "10.0.0.60"}]))
    assert e.value.key == "vip[0].service[2].port"
    assert "tcp/80" in str(e.value) and "vip[0].service[0]" in str(e.value)


@pytest.mark.parametrize("service, vip_extra, key, reason", [
    (svc(protocol="sctp"), {}, "vip[0].service[0].protocol", "tcp or udp"),
    (svc(port=0), {}, "vip[0].service[0].port", "between 1 and 65535"),
    (svc(backends=[]), {}, "vip[0].service[0].backends", "at least one"),
    (svc(backends=[{"node": "h3"}]), {}, "vip[0].service[0].backends[0].address", "required"),
    (svc(backends=[{"address": "fd00::1"}]), {}, "vip[0].service[0].backends[0].address", "family"),
    (svc(backends=[{"address": "10.0.0.100"}]), {}, "vip[0].service[0].backends[0].address", "cannot be a backend"),
    (svc(backends=[{"address": "10.0.0.5"}, {"address": "10.0.0.5"}]), {}, "vip[0].service[0].backends[1]", "duplicate"),
    (svc(backends=[{"node": "a", "address": "10.0.0.5"}, {"node": "a", "address": "10.0.0.6"}]), {},
     "vip[0].service[0].backends[1]", "duplicate backend a"),
    (svc(weight=3), {}, "vip[0].service[0].weight", "unknown key"),
    (svc(backends=[{"address": "10.0.0.5", "port": 1}]), {}, "vip[0].service[0].backends[0].port", "unknown key"),
    (svc(), {"interface": "lo"}, "vip[0].service[0].interface", "name the interface"),
    (svc(interface="lo"), {}, "vip[0].service[0].interface", "Ethernet"),
    (svc(check_timeout=5), {}, "vip[0].service[0].check_timeout", "must not exceed"),
])
def test_bad_services_name_the_key(service: dict[str, object], vip_extra: dict[str, object], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(service, **vip_extra)
    assert e.value.key == key and reason in str(e.value), str(e.value)


def test_vipd_check_rejects_a_sharing_conflict_in_one_line_with_exit_2(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.toml"
    bad.write_text('node = "h1"\n[[vip]]\nname = "web"\naddress = "192.0.2.10/32"\ninterface = "lo"\n'
                   '[[vip.service]]\nprotocol = "tcp"\nport = 80\ninterface = "lo0x"\nbackends = [{ address = "192.0.2.20" }]\n'
                   '[[vip.service]]\nprotocol = "tcp"\nport = 80\ninterface = "lo0x"\nbackends = [{ address = "192.0.2.21" }]\n')
    ko = subprocess.run([sys.executable, "-m", "vipd", "check", "-c", str(bad)], capture_output=True, text=True)
    assert ko.returncode == 2
    lines = ko.stderr.strip().splitlines()
    assert len(lines) == 1 and "vip[0].service[1].port" in lines[0] and "vip[0].service[0]" in lines[0], ko.stderr

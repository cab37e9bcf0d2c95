"""A corpus of bad configs an operator could write: each TOML snippet must be refused by `vipd check`
with the key path it names and a reason, never accepted and never a traceback. The host-independent
rules run in config.load, the host-dependent ones in config.check_host (with files made here).

Every numeric key of every config type is range-checked (nan, inf, negative, huge), and the list
of numeric keys below is compared with the dataclasses, so a new numeric key without a range check
fails here."""

from __future__ import annotations

import dataclasses
import ipaddress
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vipd import config
from vipd.config_host import HostAddress, check_host
from vipd.errors import ConfigError

BASE = """{top}
node = "h1"
state_dir = "{state_dir}"
[etcd]
{etcd}
[metrics]
listen = "127.0.0.1:9654"
[[vip]]
name = "api"
address = "{address}"
interface = "{interface}"
{vip}
{extra}
"""


def toml(tmp: Path, *, top: str = "", etcd: str = "", vip: str = "", extra: str = "", address: str = "10.0.0.10/24",
         interface: str = "lo", state_dir: str = "") -> Path:
    path = tmp / "vipd.toml"
    if "endpoints" not in etcd:
        etcd = 'endpoints = ["http://127.0.0.1:2379"]\n' + etcd
    path.write_text(BASE.format(top=top, etcd=etcd, vip=vip, extra=extra, address=address, interface=interface,
                                state_dir=state_dir or str(tmp / "run")))
    return path


BGP = '[bgp]\nsource = "{}"\npeers = ["192.0.2.1"]\n'
CHECK = '[[vip.check]]\ntype = "http"\nurl = "{}"\n'

# (snippet keywords for toml(), key path expected, a word of the reason)
CORPUS: list[tuple[dict[str, str], str, str]] = [
    # BGP source / pool against the VIPs; peers
    ({"extra": BGP.format("10.0.0.10")}, "bgp.source", "also vip[0]"),
    ({"address": "198.18.0.10/24", "extra": BGP.format("198.18.0.20")}, "bgp.source", "also vip[0]"),
    ({"extra": '[bgp]\nsource_pool = "10.0.0.0/28"\npeers = ["192.0.2.1"]\n'}, "bgp.source_pool", "overlaps vip[0]"),
    ({"extra": '[bgp]\nsource_pool = "0.0.0.0/0"\npeers = ["192.0.2.1"]\n'}, "bgp.source_pool", "/0"),
    ({"extra": BGP.format("127.0.0.2")}, "bgp.source", "loopback"),
    ({"extra": '[bgp]\nsource = "192.0.2.9"\npeers = ["224.0.0.9"]\n'}, "bgp.peers[0]", "multicast"),
    ({"extra": '[bgp]\nsource = "192.0.2.9"\npeers = ["192.0.2.9"]\n'}, "bgp.peers[0]", "own BGP source"),
    ({"extra": '[bgp]\nsource = "192.0.2.9"\npeers = ["192.0.2.1", "192.0.2.1"]\n'}, "bgp.peers[1]", "twice"),
    ({"extra": '[bgp]\nsource = "192.0.2.9"\npeers = ["10.0.0.10"]\n'}, "bgp.peers[0]", "vip[0]"),
    # address families and prefixes
    ({"address": "10.0.0.10/0"}, "vip[0].address", "/0"),
    ({"address": "::ffff:10.0.0.10"}, "vip[0].address", "IPv4-mapped"),
    ({"address": "::10.0.0.10"}, "vip[0].address", "IPv4-compatible"),
    ({"address": "255.255.255.255"}, "vip[0].address", "broadcast"),
    ({"address": "240.0.0.1"}, "vip[0].address", "reserved"),
    ({"address": "0.1.2.3"}, "vip[0].address", "this-network"),
    ({"address": "127.0.0.5"}, "vip[0].address", "loopback"),
    ({"extra": '[[egress]]\nname = "e"\nvip = "api"\ndestinations = ["0.0.0.0/0"]\n'}, "egress[0].destinations[0]",
     "leave destinations empty"),
    # ports
    ({"extra": ""}, "", ""),  # the base itself is valid (guards the corpus against a broken base)
    ({"etcd": 'endpoints = ["http://127.0.0.1:70000"]'}, "etcd.endpoints[0]", "port"),
    ({"etcd": 'endpoints = ["http://127.0.0.1:0"]'}, "etcd.endpoints[0]", "port"),
    ({"vip": CHECK.format("http://127.0.0.1:65536/")}, "vip[0].check[0].url", "port"),
    ({"vip": '[[vip.check]]\ntype = "tcp"\nhost = "127.0.0.1"\nport = 65536\n'}, "vip[0].check[0].port", "65535"),
    ({"extra": '[[egress]]\nname = "e"\nvip = "api"\nprotocol = "tcp"\nports = [70000]\n'}, "egress[0].ports[0]",
     "65535"),
    # URLs
    ({"etcd": 'endpoints = ["http://:2379"]'}, "etcd.endpoints[0]", "no host"),
    ({"etcd": 'endpoints = ["http://127.0.0.1:2379/v3"]'}, "etcd.endpoints[0]", "without a path"),
    ({"etcd": 'endpoints = ["http://a:2379", "http://a:2379"]'}, "etcd.endpoints", "twice"),
    ({"etcd": 'endpoints = ["http://a:2379", "https://b:2379"]'}, "etcd.endpoints", "one scheme"),
    ({"etcd": 'endpoints = ["http://root:s3cret@127.0.0.1:2379"]'}, "etcd.endpoints[0]", "credentials"),
    ({"vip": CHECK.format("http://admin:s3cret@127.0.0.1/health")}, "vip[0].check[0].url", "credentials"),
    ({"etcd": 'ca_file = "/etc/vipd/ca.pem"'}, "etcd.ca_file", "https:// endpoints only"),
    # paths
    ({"state_dir": "run/vipd"}, "state_dir", "absolute"),
    ({"state_dir": "/"}, "state_dir", "not /"),
    ({"etcd": 'endpoints = ["https://a:2379"]\nca_file = "ca.pem"'}, "etcd.ca_file", "absolute"),
    ({"etcd": 'username = "u"\npassword_file = "pw"'}, "etcd.password_file", "absolute"),
    ({"extra": '[hooks]\nowner = ["./hook.sh"]\n'}, "hooks.owner[0]", "absolute path or a bare"),
    ({"vip": '[[vip.check]]\ntype = "command"\ncommand = ["bin/check"]\n'}, "vip[0].check[0].command[0]",
     "absolute path or a bare"),
    ({"vip": CHECK.format("https://127.0.0.1/") + 'ca_file = "ca.pem"\n'}, "vip[0].check[0].ca_file", "absolute"),
    # timing: a request_timeout that does not fit in the lease
    ({"etcd": "lease_ttl = 3\nrequest_timeout = 1.5"}, "etcd.request_timeout", "does not fit"),
    ({"etcd": 'endpoints = ["http://a:1", "http://b:1", "http://c:1"]\nlease_ttl = 3\nrequest_timeout = 0.5'},
     "etcd.request_timeout", "does not fit"),
    # numbers that are not numbers
    ({"top": "", "extra": "[timing]\nfence_margin = nan\n"}, "timing.fence_margin", "finite"),
    ({"extra": "[host]\nweight = inf\n"}, "host.weight", "finite"),
    ({"extra": '[hooks]\ntimeout = nan\nowner = ["true"]\n'}, "hooks.timeout", "finite"),
    ({"vip": '[[vip.check]]\ntype = "carrier"\ninterface = "lo"\ninterval = nan\n'}, "vip[0].check[0].interval",
     "finite"),
    ({"extra": '[metrics]\n'}, "metrics", ""),  # a second [metrics] table: invalid TOML, named as <file>
]


@pytest.mark.parametrize("snippet,key,why", CORPUS, ids=[f"{k or 'valid'}-{i}" for i, (_, k, _w) in enumerate(CORPUS)])
def test_corpus(tmp_path: Path, snippet: dict[str, str], key: str, why: str) -> None:
    path = toml(tmp_path, **snippet)
    if not key:
        config.load(path)
        return
    if key == "metrics":
        with pytest.raises(ConfigError) as ei:
            config.load(path)
        assert ei.value.key == "<file>" and "not valid TOML" in ei.value.reason
        return
    with pytest.raises(ConfigError) as ei:
        config.load(path)
    assert (ei.value.key, why in ei.value.reason) == (key, True), str(ei.value)
    assert "s3cret" not in str(ei.value)  # never echo credentials


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = toml(tmp_path)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert config.load(path).node == "h1"


# ------------------------------------------------------------------------ host-dependent rules

def _garbage(tmp: Path, name: str, text: str = "not a certificate\n") -> str:
    p = tmp / name
    p.write_text(text)
    return str(p)


def _program(tmp: Path, name: str, mode: int) -> str:
    p = tmp / name
    p.write_text("#!/bin/sh\nexit 0\n")
    p.chmod(mode)
    return str(p)


def _link(tmp: Path, name: str) -> str:
    p = tmp / name
    p.symlink_to("/bin/true")  # a safe program, reached through a link anyone could replace
    return str(p)


def _host_cases(tmp: Path) -> list[tuple[dict[str, str], str, str]]:
    wdir = tmp / "shared"
    wdir.mkdir(mode=0o777)
    wdir.chmod(0o1777)
    (tmp / "afile").write_text("")
    return [
        ({"state_dir": str(tmp / "afile")}, "state_dir", "not a directory"),
        ({"state_dir": str(tmp / "afile" / "sub")}, "state_dir", "not a directory"),
        ({"etcd": f'endpoints = ["https://a:2379"]\nca_file = "{_garbage(tmp, "ca.pem")}"'}, "etcd.ca_file",
         "no PEM"),
        ({"etcd": f'endpoints = ["https://a:2379"]\nca_file = "{tmp / "missing.pem"}"'}, "etcd.ca_file",
         "no such file"),
        ({"etcd": f'endpoints = ["https://a:2379"]\ncert_file = "{_garbage(tmp, "c.pem")}"\n'
                  f'key_file = "{_garbage(tmp, "k.pem")}"'}, "etcd.cert_file", "not a PEM certificate"),
        ({"vip": CHECK.format("https://127.0.0.1/") + f'ca_file = "{_garbage(tmp, "hca.pem")}"\n'},
         "vip[0].check[0].ca_file", "no PEM"),
        ({"extra": f'[hooks]\nowner = ["{_program(tmp, "ww.sh", 0o757)}"]\n'}, "hooks.owner[0]", "world-writable"),
        ({"extra": f'[hooks]\nowner = ["{_program(tmp, "gw.sh", 0o775)}"]\n'}, "hooks.owner[0]", "group-writable"),
        ({"extra": f'[hooks]\nbackup = ["{_program(wdir, "h.sh", 0o755)}"]\n'}, "hooks.backup[0]",
         "world-writable directory"),
        ({"vip": f'[[vip.check]]\ntype = "command"\ncommand = ["{_program(tmp, "chk.sh", 0o777)}"]\n'},
         "vip[0].check[0].command[0]", "world-writable"),
        ({"extra": f'[hooks]\nfault = ["{_link(wdir, "true")}"]\n'}, "hooks.fault[0]", "world-writable directory"),
    ]


HOST_KEYS = ["state_dir", "state_dir-sub", "etcd.ca_file", "etcd.ca_file-missing", "etcd.cert_file",
             "vip[0].check[0].ca_file", "hooks.owner[0]-o", "hooks.owner[0]-g", "hooks.backup[0]",
             "vip[0].check[0].command[0]", "hooks.fault[0]-symlink"]


@pytest.mark.parametrize("index", range(len(HOST_KEYS)), ids=HOST_KEYS)
def test_host_corpus(tmp_path: Path, index: int) -> None:
    snippet, key, why = _host_cases(tmp_path)[index]
    cfg = config.load(toml(tmp_path, **snippet))  # host-independent: accepted
    with pytest.raises(ConfigError) as ei:
        check_host(cfg, addresses=[])
    assert (ei.value.key, why in ei.value.reason) == (key, True), str(ei.value)


def _metrics(tmp: Path, listen: str) -> config.Config:
    path = toml(tmp)
    path.write_text(path.read_text().replace('listen = "127.0.0.1:9654"', f'listen = "{listen}"'))
    return config.load(path)


@pytest.mark.parametrize("listen,why", [("203.0.113.77:9654", "not an address of this host"),
                                        ("no-such-host.invalid:9654", "cannot resolve"),
                                        ("127.0.0.1:70000", "65535")])
def test_metrics_address_must_be_local_and_resolvable(tmp_path: Path, listen: str, why: str) -> None:
    with pytest.raises(ConfigError) as ei:
        check_host(_metrics(tmp_path, listen), addresses=[])
    assert ei.value.key == "metrics.listen" and why in ei.value.reason, ei.value


def test_a_vip_that_is_already_a_host_address(tmp_path: Path) -> None:
    cfg = config.load(toml(tmp_path, address="10.0.0.10/24"))
    ip = ipaddress.ip_address("10.0.0.10")
    check_host(cfg, addresses=[HostAddress("lo", ip, True)])  # vipd's own (tagged) copy from an earlier run
    with pytest.raises(ConfigError) as ei:
        check_host(cfg, addresses=[HostAddress("eth0", ip, False)])
    assert ei.value.key == "vip[0].address" and "already an address of this host (on eth0)" in ei.value.reason
    bgp = config.load(toml(tmp_path, extra=BGP.format("192.0.2.9")))
    src = ipaddress.ip_address("192.0.2.9")
    check_host(bgp, addresses=[HostAddress("lo", src, False)])  # the operator put it on lo: fine
    with pytest.raises(ConfigError) as ei:
        check_host(bgp, addresses=[HostAddress("eth0", src, False)])
    assert ei.value.key == "bgp.source"


def test_vipd_check_prints_one_line_for_host_errors(tmp_path: Path) -> None:
    """The CLI: exit 2, one line naming the key, no traceback (a garbage CA used to be a traceback)."""
    path = toml(tmp_path, etcd=f'endpoints = ["https://a:2379"]\nca_file = "{_garbage(tmp_path, "ca.pem")}"')
    r = subprocess.run([sys.executable, "-m", "vipd", "check", "-c", str(path)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2, r
    assert r.stderr.count("\n") == 1 and "etcd.ca_file" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # commands that skip the host checks (status reads etcd) say the same, from the etcd client
    r = subprocess.run([sys.executable, "-m", "vipd", "status", "-c", str(path)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2, r
    assert r.stderr.count("\n") == 1 and "etcd.ca_file" in r.stderr and "Traceback" not in r.stderr, r.stderr


# ------------------------------------------------------------------------ every numeric key

# key path -> (TOML location, kind); kind "int" or "float"
NUMERIC = {
    "etcd.lease_ttl": ("etcd", "int"), "etcd.request_timeout": ("etcd", "float"),
    "timing.fence_margin": ("[timing]", "float"), "timing.keepalives_per_ttl": ("[timing]", "int"),
    "timing.reconcile_interval": ("[timing]", "float"), "timing.release_holdoff": ("[timing]", "float"),
    "vip[0].announce_count": ("vip", "int"), "vip[0].announce_interval": ("vip", "float"),
    "host.weight": ("[host]", "float"), "placement.preempt_delay": ("[placement]", "float"),
    "placement.campaign_stagger": ("[placement]", "float"),
    "placement.join_grace": ("[placement]", "float"), "placement.handover_batch": ("[placement]", "int"),
    "hooks.timeout": ("[hooks]", "float"),
    "vip[0].check[0].interval": ("check", "float"), "vip[0].check[0].timeout": ("check", "float"),
    "vip[0].check[0].rise": ("check", "int"), "vip[0].check[0].fall": ("check", "int"),
    "vip[0].check[0].port": ("check", "int"), "vip[0].check[0].expect_status": ("check", "int"),
    "egress[0].ports[0]": ("egress", "int"),
}
BAD_VALUES = ["-1", "1e12", "nan", "inf", "-inf", "1000000000000", "-1000000000000"]


def _numeric_toml(tmp: Path, key: str, value: str) -> Path:
    where, _ = NUMERIC[key]
    name = key.rsplit(".", 1)[1]
    if where == "etcd":
        return toml(tmp, etcd=f"{name} = {value}")
    if where == "vip":
        return toml(tmp, vip=f"{name} = {value}")
    if where == "check":
        kind = "tcp" if name == "port" else "http" if name == "expect_status" else "carrier"
        body = {"tcp": 'host = "127.0.0.1"\n', "http": 'url = "http://127.0.0.1/"\n', "carrier": 'interface = "lo"\n'}
        extra = "" if name == "port" else "port = 80\n" if kind == "tcp" else ""
        return toml(tmp, vip=f'[[vip.check]]\ntype = "{kind}"\n{body[kind]}{extra}{name} = {value}\n')
    if where == "egress":
        return toml(tmp, extra=f'[[egress]]\nname = "e"\nvip = "api"\nprotocol = "tcp"\nports = [{value}]\n')
    return toml(tmp, extra=f"{where}\n{name} = {value}\n")


@pytest.mark.parametrize("key", sorted(NUMERIC))
def test_every_numeric_key_is_range_checked(tmp_path: Path, key: str) -> None:
    for value in BAD_VALUES:
        if NUMERIC[key][1] == "int" and value in ("1e12",):
            continue  # a float where an integer is expected: covered by "nan"
        with pytest.raises(ConfigError) as ei:
            config.load(_numeric_toml(tmp_path, key, value))
        assert ei.value.key == key, (value, str(ei.value))


def test_the_numeric_key_list_is_complete() -> None:
    """Every int/float field of the config dataclasses has a row in NUMERIC."""
    from vipd.config_routing import EgressConfig
    from vipd.health.spec import HttpCheck, TcpCheck
    from vipd.hooks_config import HooksConfig

    prefixes = {config.EtcdConfig: "etcd.", config.TimingConfig: "timing.", config.VipSpec: "vip[0].",
                config.HostConfig: "host.", config.PlacementConfig: "placement.", HooksConfig: "hooks.",
                TcpCheck: "vip[0].check[0].", HttpCheck: "vip[0].check[0]."}
    missing = []
    for cls, prefix in prefixes.items():
        for f in dataclasses.fields(cls):
            if f.type in ("int", "float", int, float) and prefix + f.name not in NUMERIC:
                missing.append(prefix + f.name)
    assert [f.name for f in dataclasses.fields(EgressConfig) if f.name == "ports"] == ["ports"]
    assert missing == [], f"numeric keys without a range test: {missing}"


"""Man pages and completion come from one source: every subcommand of the parser is documented, and
the key table of vipd.toml(5) matches what the config parser accepts."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from vipd import config
from vipd.cli import parser
from vipd.config_keys import KEYS
from vipd.errors import ConfigError
from vipd.manpage import bash_completion, man5, man8

SUBCOMMANDS = ("run", "check", "status", "release", "state", "doctor", "cleanup", "demo")


def test_man8_and_completion_cover_every_subcommand() -> None:
    page, comp = man8(parser()), bash_completion(parser())
    for name in SUBCOMMANDS:
        assert f".B vipd {name}" in page and f"{name})" in comp
    assert "\\-\\-json" in page and "\\-\\-no\\-host" in page


def _doc(key: str, value: Any) -> dict[str, Any]:
    path = key.split(".")
    if path[0] == "vip[]":
        return {"vip": [{"name": "a", "address": "10.0.0.10/24", "interface": "lo", path[1]: value}]}
    if len(path) == 1:
        return {path[0]: value}
    return {path[0]: {path[1]: value}}


@pytest.mark.parametrize("key", [k for k in KEYS if k.example is not None], ids=lambda k: k.key)
def test_every_documented_key_parses(key: Any) -> None:
    config.parse(_doc(key.key, key.example), hostname="h")


def test_an_undocumented_key_would_be_rejected() -> None:
    with pytest.raises(ConfigError):
        config.parse(_doc("etcd.no_such_key", 1), hostname="h")


@pytest.mark.parametrize("section, cls", [("etcd", config.EtcdConfig), ("timing", config.TimingConfig),
                                          ("placement", config.PlacementConfig), ("host", config.HostConfig),
                                          ("peers", config.PeersConfig)])
def test_every_parsed_field_is_documented(section: str, cls: type) -> None:
    documented = {k.key.split(".", 1)[1] for k in KEYS if k.key.startswith(section + ".")}
    fields = {"checks" if f.name == "checks" else f.name for f in dataclasses.fields(cls)}
    fields = {"check" if f == "checks" else f for f in fields}
    assert fields - documented == set()


def test_vip_fields_are_documented() -> None:
    documented = {k.key.split(".", 1)[1] for k in KEYS if k.key.startswith("vip[].")}
    fields = {"check" if f.name == "checks" else "service" if f.name == "services" else f.name
              for f in dataclasses.fields(config.VipSpec)}
    assert fields - documented == set()
    assert ".SH [[vip]]" in man5()

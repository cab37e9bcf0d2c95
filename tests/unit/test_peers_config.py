"""The [peers] table: defaults, validation with the key named, keys from file or hex."""

from __future__ import annotations

from pathlib import Path

import pytest

from vipd.config import parse
from vipd.errors import ConfigError


def peers(table: dict[str, object]):  # type: ignore[no-untyped-def]
    return parse({"node": "n1", "peers": table}).peers


def test_defaults() -> None:
    p = parse({"node": "n1"}).peers
    assert (p.enabled, p.port, p.interval, p.lease, p.grace, p.key, p.address, p.stall) == (
        True, 9655, 0.010, 0.090, 0.130, None, None, 1.0)


@pytest.mark.parametrize("table,key", [
    ({"grace": 0.1}, "peers.grace"),
    ({"interval": 0.05}, "peers.interval"),
    ({"port": 0}, "peers.port"),
    ({"key": "00" * 15}, "peers.key"),
    ({"key": "zz" * 16}, "peers.key"),
    ({"address": "nope"}, "peers.address"),
    ({"bogus": 1}, "peers.bogus"),
    ({"stall": 0.05}, "peers.stall"),
    ({"stall": 0}, "peers.stall"),
    ({"stall": "1"}, "peers.stall"),
    ({"key": "00" * 16, "key_file": "/x"}, "peers.key"),
    ({"key_file": "/nonexistent/vt"}, "peers.key_file"),
])
def test_bad_values_name_the_key(table: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        peers(table)
    assert e.value.key == key


def test_key_inline_or_from_file(tmp_path: Path) -> None:
    assert peers({"key": "ab" * 16}).key == b"\xab" * 16
    f = tmp_path / "k"
    f.write_text("cd" * 32 + "\n")
    assert peers({"key_file": str(f)}).key == b"\xcd" * 32
    f.write_text("cd" * 8)
    with pytest.raises(ConfigError, match="at least 16 bytes") as e:
        peers({"key_file": str(f)})
    assert e.value.key == "peers.key_file"

"""The shipped unit parses under systemd and keeps the properties the daemon relies on."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "vipd.service"


def _service() -> configparser.SectionProxy:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(UNIT)
    return cp["Service"]


def test_unit_shape():
    s = _service()
    assert s["Type"] == "notify"
    assert s["Restart"] == "on-failure"
    assert "WatchdogSec" in s
    assert set(s["AmbientCapabilities"].split()) == {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert set(s["CapabilityBoundingSet"].split()) == {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert "vipd run -c /etc/vipd/vipd.toml" in s["ExecStart"]
    assert "vipd cleanup -c /etc/vipd/vipd.toml" in s["ExecStopPost"]
    assert "AF_PACKET" in s["RestrictAddressFamilies"] and "AF_NETLINK" in s["RestrictAddressFamilies"]


def test_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing (Debian's systemd package provides it)")
    vipd = shutil.which("vipd") or str(Path(__import__("sys").executable).with_name("vipd"))
    unit = tmp_path / "vipd.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/vipd", vipd))
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "vipd.service" not in r.stderr, r.stderr  # no warnings about our unit

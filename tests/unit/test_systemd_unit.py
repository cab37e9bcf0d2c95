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
    assert set(s["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK", "AF_PACKET"}
    # a config check before every start; reload = SIGHUP to the daemon; config errors do not loop
    assert "vipd check --allow-missing-interfaces -c /etc/vipd/vipd.toml" in s["ExecStartPre"]
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert s["RestartPreventExitStatus"] == "2"
    # the sandbox (tests/lab/test_daemon_ops.py traces the daemon against this filter)
    assert s["SystemCallFilter"] == "@system-service" and s["SystemCallErrorNumber"] == "EPERM"
    assert s["ProtectProc"] == "invisible"


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


def test_systemd_analyze_security_exposure(tmp_path):
    """`systemd-analyze security --offline`: the unit's exposure stays at or below 2.5 (it was 3.7
    before the system call filter and ProtectProc)."""
    import re

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing (Debian's systemd package provides it)")
    unit = tmp_path / "vipd.service"
    unit.write_text(UNIT.read_text())
    r = subprocess.run([analyze, "security", "--offline=yes", str(unit)], capture_output=True, text=True)
    m = re.search(r"Overall exposure level for vipd.service: ([0-9.]+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m[1]) <= 2.5, r.stdout

"""The Debian package: built by the one command (packaging/build-deb.sh, lintian without errors inside
it), installed on this machine with dpkg -i, checked (vipd check on the shipped examples, systemd-analyze
verify of the installed unit, the unit not enabled, man pages and completion present, the venv runs
vipd), and purged: nothing of it is left in /etc, /usr or /lib/systemd.

The build takes about a minute (a virtualenv with vipd's dependencies from PyPI; pip's cache makes
later builds faster), so it runs once per test session (fixture `deb`).
"""

from __future__ import annotations

import gzip
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ("dpkg-buildpackage", "dh_virtualenv", "lintian", "systemd-analyze", "dpkg", "git")
pytestmark = pytest.mark.needs_tools(*TOOLS)


def run(*argv: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def installed() -> bool:
    return run("dpkg-query", "-W", "-f", "${Status}", "vipd", check=False).stdout.strip().endswith(" installed")


@pytest.fixture(scope="session")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    proc = run(str(ROOT / "packaging" / "build-deb.sh"), str(out), timeout=600)
    debs = sorted(out.glob("vipd_*.deb"))
    assert len(debs) == 1, proc.stdout
    lintian = (out / "lintian.log").read_text()
    assert not [line for line in lintian.splitlines() if line.startswith("E:")], lintian
    return debs[0]


@pytest.fixture
def install(deb: Path) -> Iterator[list[str]]:
    """dpkg -i the package; yields the files it installed; always purged afterwards."""
    if installed():
        pytest.fail("a vipd package is already installed on this machine: not touching it")
    try:
        run("dpkg", "-i", str(deb))
        yield run("dpkg", "-L", "vipd").stdout.split()
    finally:
        if run("dpkg-query", "-W", "vipd", check=False).returncode == 0:
            run("dpkg", "--purge", "vipd")


def test_package_installs_checks_and_purges_cleanly(install: list[str]) -> None:
    files = install
    for path in ("/usr/sbin/vipd", "/lib/systemd/system/vipd.service", "/usr/share/man/man8/vipd.8.gz",
                 "/usr/share/man/man5/vipd.toml.5.gz", "/usr/share/bash-completion/completions/vipd",
                 "/usr/share/doc/vipd/examples/vipd.toml", "/usr/share/doc/vipd/examples/vipd-rules.yml",
                 "/usr/share/doc/vipd/examples/vipd-dashboard.json"):
        assert path in files and os.path.exists(path), path

    # the packaged daemon runs from its own environment, not from this checkout's
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    where = subprocess.run(["/usr/sbin/vipd", "--help"], capture_output=True, text=True, env=env)
    assert where.returncode == 0 and "doctor" in where.stdout
    for example in ("vipd.toml", "kube-apiserver.toml", "haproxy.toml"):
        proc = subprocess.run(["/usr/sbin/vipd", "check", "--no-host", "-c", f"/usr/share/doc/vipd/examples/{example}"],
                              capture_output=True, text=True, env=env)
        assert proc.returncode == 0, (example, proc.stderr)

    unit = Path("/lib/systemd/system/vipd.service").read_text()
    assert "ExecStart=/usr/sbin/vipd run -c /etc/vipd/vipd.toml" in unit
    assert "ConditionPathExists=/etc/vipd/vipd.toml" in unit
    verify = run("systemd-analyze", "verify", "/lib/systemd/system/vipd.service", check=False)
    assert verify.returncode == 0, verify.stderr
    # installed disabled: nothing wants it until the operator enables it
    assert not list(Path("/etc/systemd/system").rglob("vipd.service"))

    page = gzip.decompress(Path("/usr/share/man/man8/vipd.8.gz").read_bytes()).decode()
    assert ".TH VIPD 8" in page and "vipd doctor" in page
    assert "doctor" in Path("/usr/share/bash-completion/completions/vipd").read_text()

    run("dpkg", "--purge", "vipd")
    assert not installed()
    left = [f for f in files if os.path.lexists(f) and not os.path.isdir(f)]  # every file it installed
    left += [d for d in ("/usr/lib/vipd", "/usr/share/doc/vipd", "/etc/vipd") if os.path.lexists(d)]
    assert left == []
    assert not os.path.exists("/usr/lib/vipd")  # bytecode compiled by postinst is removed by prerm
    assert not list(Path("/etc/systemd/system").rglob("vipd*"))

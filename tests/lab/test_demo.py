"""`vipd demo`: the whole story as a subprocess (exit 0, every step reported with an outage figure,
nothing left behind), Ctrl-C in the middle (torn down, exit 130), and the precondition check."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vipd.lab import demo, netns

ROOT = Path(__file__).resolve().parents[2]
DEMO = [sys.executable, "-m", "vipd", "demo"]


def our_processes(workdir: str) -> list[str]:
    """Command lines of live processes naming the demo's workdir (its vipd and etcd do: -c, --data-dir)."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{d}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if workdir in cmd and not zombie:
            found.append(f"{d}: {cmd}")
    return found


def lab_of(output: str) -> tuple[str, str]:
    m = re.search(r"lab (vtd[0-9a-f]+): namespaces .* \(workdir (\S+)\)", output)
    assert m, output
    return m.group(1), m.group(2)


def assert_nothing_left(output: str, vtd_before: set[str]) -> None:
    prefix, workdir = lab_of(output)
    assert netns.list_ns(prefix) == [], output
    assert set(netns.list_ns("vtd")) <= vtd_before, f"new vtd* namespaces left: {netns.list_ns('vtd')}"
    assert our_processes(workdir) == [], output
    assert not Path(workdir).exists(), f"workdir {workdir} kept although nothing failed"


def test_demo_runs_the_whole_story_and_leaves_nothing() -> None:
    vtd_before = set(netns.list_ns("vtd"))
    t0 = time.monotonic()
    r = subprocess.run(DEMO, cwd=ROOT, capture_output=True, text=True, timeout=150)
    took = time.monotonic() - t0
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert took < 120, f"the demo took {took:.0f} s"
    for title in demo.Demo.TITLES:
        line = re.search(rf"^\[ *[0-9.]+s\] {re.escape(title)}: (h\d) -> (h\d), client outage (\d+) ms +ok$",
                         out, re.M)
        assert line, f"no result line for {title!r}:\n{out}"
        if title != "etcd stopped and restarted":  # the others move the VIP to another host
            assert line.group(1) != line.group(2), line.group(0)
    assert out.count("dual ownership: never") == len(demo.Demo.TITLES), out
    assert re.search(r"summary: 5 of 5 steps ok; two hosts never held a VIP at once", out), out
    assert re.search(r"owners  api=h\d  api6=h\d", out), "no live owner line"
    assert "teardown complete" in out, out
    assert_nothing_left(out, vtd_before)


def test_ctrl_c_tears_everything_down() -> None:
    vtd_before = set(netns.list_ns("vtd"))
    # SIGINT at its default in the demo, as in a terminal: a shell without job control starts
    # background commands (`.ci/run &`) with SIGINT ignored, the child inherits that, and Python
    # leaves an ignored SIGINT ignored (no KeyboardInterrupt for the Ctrl-C under test)
    proc = subprocess.Popen(DEMO, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "-- step 1/5" in line:
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert started.wait(60), "".join(lines)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    out = "".join(lines)
    assert "interrupted: tearing everything down" in out and "teardown complete" in out, out
    assert_nothing_left(out, vtd_before)


def tool_dir(tmp_path: Path, names: list[str]) -> str:
    """A directory holding only the named binaries (symlinks to the real ones): PATH for preflight."""
    import shutil

    d = tmp_path / "bin"
    d.mkdir()
    for name in names:
        real = shutil.which(name)
        assert real, name
        (d / name).symlink_to(real)
    return str(d)


def test_preflight_names_a_missing_etcd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PATH", tool_dir(tmp_path, ["ip", "bridge"]))
    reason = demo.preflight(euid=0)
    assert reason is not None and "`etcd`" in reason and "etcd-server" in reason, reason
    assert "\n" not in reason
    # the entry point refuses with exit code 2 and that one line, before touching anything
    assert demo.main(None) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "`etcd`" in err, err


def test_preflight_needs_root_and_passes_when_all_is_there(tmp_path: Path) -> None:
    reason = demo.preflight(euid=1000)
    assert reason is not None and "root" in reason
    assert demo.preflight(path=tool_dir(tmp_path, ["ip", "bridge", "etcd"]), euid=0) is None

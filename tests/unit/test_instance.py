"""One daemon per state_dir (flock held by a real second process), the metrics port checked free,
and the CLI's surface: --version, help on every argument, exit codes."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vipd import __version__, instance
from vipd.cli import parser


def _holder(state_dir: Path) -> subprocess.Popen[str]:
    code = textwrap.dedent(f"""
        import sys, time
        from vipd import instance
        instance.acquire({str(state_dir)!r})
        print("locked", flush=True)
        sys.stdin.read()
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "locked"
    return p


def test_second_instance_is_refused_naming_the_holder(tmp_path: Path) -> None:
    state = tmp_path / "run"
    p = _holder(state)
    try:
        with pytest.raises(instance.InstanceConflict, match=f"another vipd \\(pid {p.pid}\\) is running"):
            instance.acquire(str(state))
    finally:
        p.communicate("", timeout=10)
    fd = instance.acquire(str(state))  # the holder exited: the kernel released its lock
    assert (state / "vipd.lock").read_text().strip() == str(os.getpid())
    os.close(fd)


def test_metrics_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(instance.InstanceConflict, match=f"metrics.listen: 127.0.0.1:{port} is in use"):
            instance.check_port_free(f"127.0.0.1:{port}")
    instance.check_port_free(f"127.0.0.1:{port}")  # free again


def test_version() -> None:
    r = subprocess.run([sys.executable, "-m", "vipd", "--version"], capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout.strip()) == (0, f"vipd {__version__}")


def _actions(p: argparse.ArgumentParser, path: str = "vipd") -> list[tuple[str, argparse.Action]]:
    out = []
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                out += _actions(sp, f"{path} {name}")
            out += [(f"{path} {c.dest}", c) for c in a._choices_actions]
        else:
            out.append((path, a))
    return out


def test_every_argument_and_command_has_help() -> None:
    missing = [f"{path}: {a.option_strings or a.dest}" for path, a in _actions(parser()) if not a.help]
    assert missing == []
    assert "exit codes" in (parser().epilog or "")


def test_metrics_endpoint_taken_after_the_check_is_a_typed_error() -> None:
    """If the port is taken between the check and the daemon's bind: a VipdError (one line from the
    CLI), not an OSError traceback."""
    import trio

    from vipd.errors import VipdError
    from vipd.metrics import Metrics, serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)

        async def main() -> None:
            async with trio.open_nursery() as n:
                await n.start(serve, Metrics("x"), f"127.0.0.1:{s.getsockname()[1]}")

        with pytest.raises(BaseException) as ei:
            trio.run(main)
        errors = ei.value.exceptions if isinstance(ei.value, BaseExceptionGroup) else [ei.value]
        assert any(isinstance(e, VipdError) and "metrics.listen: cannot listen" in str(e) for e in errors), errors

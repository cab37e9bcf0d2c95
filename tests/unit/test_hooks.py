"""Hooks with real subprocesses: the environment, fire() never waits, per-VIP order, a hanging hook's
whole process group killed at its timeout, config parsing."""

from __future__ import annotations

import ipaddress
import os
import signal
from pathlib import Path

import pytest
import trio

from vipd.errors import ConfigError
from vipd.hooks import HookResult, HookRunner, hook_env
from vipd.hooks_config import EVENTS, HooksConfig, check_hooks_host, parse_hooks
from vipd.procs import run_command

SH = "/bin/sh"


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def wait_for(predicate, timeout: float = 3.0) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def test_hook_gets_the_environment(tmp_path: Path) -> None:
    out = tmp_path / "env"
    results: list[HookResult] = []
    runner = HookRunner({"owner": [SH, "-c", f'env > "{out}"']}, timeout=5, node="cp1", on_result=results.append)
    async with trio.open_nursery() as nursery:
        await nursery.start(runner.run)
        assert runner.fire("owner", vip="api", address=ipaddress.ip_interface("192.0.2.10/24"), interface="eth0",
                           reason="campaign won", epoch=42)
        with trio.fail_after(5):
            await runner.wait_idle()
        nursery.cancel_scope.cancel()
    env = dict(line.split("=", 1) for line in out.read_text().splitlines() if line.startswith("VIPD_"))
    env = {k: v for k, v in env.items() if k not in os.environ}  # the daemon's own environment passes through
    assert env == {"VIPD_EVENT": "owner", "VIPD_VIP": "api", "VIPD_ADDRESS": "192.0.2.10", "VIPD_PREFIXLEN": "24",
                   "VIPD_INTERFACE": "eth0", "VIPD_REASON": "campaign won", "VIPD_NODE": "cp1", "VIPD_EPOCH": "42"}
    assert results[0].result is not None and results[0].result.returncode == 0


def test_hook_env_address_forms() -> None:
    base = {"PATH": "/bin"}
    e = hook_env("fault", vip="v6", address="2001:db8::1", interface="lo", reason="a\0b", node="n", epoch=0, base=base)
    assert (e["VIPD_ADDRESS"], e["VIPD_PREFIXLEN"], e["VIPD_REASON"], e["PATH"]) == ("2001:db8::1", "", "ab", "/bin")
    e = hook_env("fault", vip="v", address="10.0.0.1/32", interface="lo", reason="", node="n", epoch=0, base=base)
    assert (e["VIPD_ADDRESS"], e["VIPD_PREFIXLEN"]) == ("10.0.0.1", "32")


async def test_fire_returns_at_once_and_hanging_hook_is_killed_with_its_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    # the hook and a child of it (same process group) both hang
    script = f'sleep 30 & echo $$ $! > "{pids}"; wait'
    results: list[HookResult] = []
    runner = HookRunner({"fenced": [SH, "-c", script]}, timeout=0.5, on_result=results.append)
    async with trio.open_nursery() as nursery:
        await nursery.start(runner.run)
        t0 = trio.current_time()
        assert runner.fire("fenced", vip="api", address="192.0.2.10", interface="eth0", reason="lease lost")
        assert trio.current_time() - t0 < 0.01  # fire() only queues
        assert runner.pending() == 1
        await wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 2)
        shell, child = map(int, pids.read_text().split())
        assert alive(shell) and alive(child)
        with trio.fail_after(3):
            await runner.wait_idle()
        elapsed = trio.current_time() - t0
        nursery.cancel_scope.cancel()
    assert 0.5 <= elapsed < 1.5
    res = results[0].result
    assert res is not None and res.timed_out and res.returncode is None
    await wait_for(lambda: not alive(shell) and not alive(child))
    assert runner.pending() == 0


async def test_hooks_of_one_vip_run_in_order_others_concurrently(tmp_path: Path) -> None:
    log = tmp_path / "log"
    runner = HookRunner({"owner": [SH, "-c", f'sleep 0.3; echo "owner $VIPD_VIP" >> "{log}"'],
                         "backup": [SH, "-c", f'echo "backup $VIPD_VIP" >> "{log}"']}, timeout=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(runner.run)
        t0 = trio.current_time()
        runner.fire("owner", vip="a")
        runner.fire("backup", vip="a")  # must wait for a's owner hook
        runner.fire("owner", vip="b")  # runs beside a's
        assert runner.fire("fault", vip="a") is False  # not configured
        with trio.fail_after(5):
            await runner.wait_idle()
        elapsed = trio.current_time() - t0
        nursery.cancel_scope.cancel()
    lines = log.read_text().splitlines()
    assert lines.index("owner a") < lines.index("backup a")
    assert sorted(lines) == ["backup a", "owner a", "owner b"]
    assert elapsed < 0.55  # a's two hooks and b's in about one hook's time


async def test_missing_program_is_reported_and_runner_continues(tmp_path: Path) -> None:
    results: list[HookResult] = []
    runner = HookRunner({"fault": [str(tmp_path / "nope")], "owner": [SH, "-c", "exit 3"]}, timeout=5,
                        on_result=results.append)
    async with trio.open_nursery() as nursery:
        await nursery.start(runner.run)
        runner.fire("fault", vip="a", reason="x")
        runner.fire("owner", vip="a")
        with trio.fail_after(5):
            await runner.wait_idle()
        nursery.cancel_scope.cancel()
    assert results[0].result is None and results[0].error
    assert results[1].result is not None and results[1].result.returncode == 3


async def test_cancelling_the_runner_kills_running_hooks(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    runner = HookRunner({"owner": [SH, "-c", f'echo $$ > "{pidfile}"; exec sleep 30']}, timeout=60)
    async with trio.open_nursery() as nursery:
        await nursery.start(runner.run)
        runner.fire("owner", vip="a")
        await wait_for(lambda: pidfile.exists() and pidfile.read_text().strip() != "")
        pid = int(pidfile.read_text())
        nursery.cancel_scope.cancel()
    assert not alive(pid)


async def test_fire_without_running_runner_drops() -> None:
    runner = HookRunner({"owner": ["true"]})
    assert runner.fire("owner", vip="a") is False
    with pytest.raises(ValueError):
        runner.fire("became-owner", vip="a")
    with pytest.raises(ValueError):
        HookRunner({"up": ["true"]})


async def test_run_command_output_and_background_child() -> None:
    res = await run_command([SH, "-c", "echo out; echo err >&2; exit 2"], timeout=5)
    assert (res.returncode, res.timed_out) == (2, False) and res.output.split() == ["out", "err"]
    res = await run_command([SH, "-c", "printf x%.0s $(seq 5000)"], timeout=5, keep=100)
    assert res.output == "x" * 100
    # a background child keeping the pipe open does not hold the result back
    t0 = trio.current_time()
    res = await run_command([SH, "-c", "sleep 5 & echo $!"], timeout=5)
    assert res.returncode == 0 and trio.current_time() - t0 < 1.0
    os.kill(int(res.output), signal.SIGKILL)
    with pytest.raises(OSError):
        await run_command(["/nonexistent/program"], timeout=1)


def test_parse_hooks() -> None:
    cfg = parse_hooks({"timeout": 3, "owner": ["/bin/true", "up"], "fault": ["logger", "vipd fault"]})
    assert cfg == HooksConfig((("owner", ("/bin/true", "up")), ("fault", ("logger", "vipd fault"))), 3.0)
    assert cfg.command("owner") == ("/bin/true", "up") and cfg.command("backup") is None
    assert parse_hooks({}) == HooksConfig()
    assert set(EVENTS) == {"owner", "backup", "fenced", "fault"}
    runner = HookRunner.from_config(cfg, node="n")
    assert runner.commands == {"owner": ("/bin/true", "up"), "fault": ("logger", "vipd fault")}


@pytest.mark.parametrize("table, key", [
    ({"up": ["/bin/true"]}, "hooks.up"),
    ({"timeout": 0}, "hooks.timeout"),
    ({"timeout": True}, "hooks.timeout"),
    ({"timeout": "5"}, "hooks.timeout"),
    ({"owner": []}, "hooks.owner"),
    ({"owner": "/bin/true"}, "hooks.owner"),
    ({"owner": ["/bin/true", 1]}, "hooks.owner[1]"),
    ({"owner": [""]}, "hooks.owner[0]"),
])
def test_parse_hooks_errors(table: dict, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_hooks(table)
    assert e.value.key == key


def test_check_hooks_host(tmp_path: Path) -> None:
    check_hooks_host(parse_hooks({"owner": ["/bin/true"], "backup": ["true"]}))
    with pytest.raises(ConfigError) as e:
        check_hooks_host(parse_hooks({"fenced": [str(tmp_path / "missing")]}))
    assert e.value.key == "hooks.fenced[0]"

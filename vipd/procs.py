"""Running a program with a deadline: its own session, its whole process group killed at the
timeout or on cancellation, only the tail of its output kept. Shared by command health checks
(:mod:`vipd.health`) and transition hooks (:mod:`vipd.hooks`)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from typing import Mapping, Sequence

import trio

OUTPUT_TAIL = 2048  # bytes of a program's output kept
_DRAIN_AFTER_EXIT = 0.1  # s to read output still buffered after the process exited


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int | None  # None when it was killed at its timeout (or cancelled)
    timed_out: bool
    duration: float
    output: str  # the last ``keep`` bytes of stdout + stderr, decoded leniently


def is_executable(program: str) -> bool:
    """``program`` (a path, or a bare name looked up in PATH) is an executable file."""
    found = program if os.sep in program else shutil.which(program)
    return found is not None and os.path.isfile(found) and os.access(found, os.X_OK)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the whole group is gone already


async def run_command(argv: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None,
                      keep: int = OUTPUT_TAIL) -> CommandResult:
    """Run ``argv`` in its own session; at ``timeout`` (or when cancelled) SIGKILL its whole
    process group. Never raises for the command's own failure: OSError only when it cannot be
    started (no such file, not executable), trio.Cancelled when the caller is cancelled (the
    group is killed first).

    The process's output is read as it comes, keeping only the tail. Once the process has exited,
    output still buffered is read for a moment; a background child that keeps the pipe open does
    not hold the result back (it is left running, but its output pipe is closed: a hook that
    starts something long-lived should redirect that one's output). Only a timeout or a
    cancellation kills the group.
    """
    argv = tuple(argv)
    started = trio.current_time()
    proc = await trio.lowlevel.open_process(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            env=dict(env) if env is not None else None)
    tail = bytearray()
    stdout = proc.stdout
    assert stdout is not None

    reader_done = trio.Event()

    async def read() -> None:
        try:
            async for chunk in stdout:
                tail.extend(chunk)
                del tail[:-keep]
        finally:
            reader_done.set()

    exited = False
    try:
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                await proc.wait()
                exited = True
                with trio.move_on_after(_DRAIN_AFTER_EXIT):
                    await reader_done.wait()  # EOF, unless a background child holds the pipe
                nursery.cancel_scope.cancel()
    finally:
        if not exited:
            _kill_group(proc.pid)  # the group id is the leader's pid (new session)
            with trio.CancelScope(shield=True):
                await proc.wait()
        with trio.CancelScope(shield=True):
            await stdout.aclose()
    return CommandResult(argv, proc.returncode if exited else None, not exited, trio.current_time() - started,
                         tail.decode("utf-8", "replace"))

"""Helpers shared by the benches: clocks, log parsing, /proc sampling, statistics, tables, environment.

Nothing here knows about a particular daemon or fault.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

ROOT = Path(__file__).resolve().parents[1]  # the repository: holds the vipd package
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

T = TypeVar("T")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- time

class Clock:
    """Converts between wall-clock time (what daemons write in their logs) and time.monotonic()
    (what the probe, the address monitor and the bench use). Measured once at start: the bench is
    short, so wall-clock steps during it are the only source of error (and unlikely)."""

    def __init__(self) -> None:
        a = time.monotonic()
        w = time.time()
        b = time.monotonic()
        self.offset = w - (a + b) / 2  # wall = mono + offset

    def to_mono(self, wall: float) -> float:
        return wall - self.offset

    def to_wall(self, mono: float) -> float:
        return mono + self.offset


def wait_until(pred: Callable[[], T], timeout: float, interval: float = 0.02) -> T | None:
    """Poll pred() until it returns something truthy (returned) or `timeout` seconds pass (None)."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


# --------------------------------------------------------------------------- key=value logs

_LINE_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z (\w+) (.*)$")
_FIELD_RE = re.compile(r'([A-Za-z_][\w.-]*)=("(?:[^"\\]|\\.)*"|\S*)')


@dataclass(frozen=True)
class LogLine:
    t: float  # time.monotonic() equivalent of the line's timestamp (ms resolution)
    level: str
    event: str
    fields: dict[str, str]
    raw: str


@dataclass
class KeyValueLog:
    """Incremental reader of a `TIMESTAMPZ level key=value ...` log (vipd's format). Lines that do
    not match (tracebacks, other tools) are kept with event "" so nothing is hidden."""

    path: Path
    clock: Clock
    lines: list[LogLine] = field(default_factory=list)
    _pos: int = 0
    _partial: str = ""

    def refresh(self) -> list[LogLine]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._pos)
                data = f.read()
                self._pos = f.tell()
        except FileNotFoundError:
            return self.lines
        text = self._partial + data.decode(errors="replace")
        *complete, self._partial = text.split("\n")
        last_t = self.lines[-1].t if self.lines else 0.0
        for raw in complete:
            m = _LINE_RE.match(raw)
            if not m:
                if raw.strip():
                    self.lines.append(LogLine(last_t, "", "", {}, raw))
                continue
            wall = _dt.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%f").replace(
                tzinfo=_dt.timezone.utc).timestamp()
            kv = {k: (v[1:-1].replace('\\"', '"').replace("\\\\", "\\") if v.startswith('"') else v)
                  for k, v in _FIELD_RE.findall(m.group(3))}
            last_t = self.clock.to_mono(wall)
            self.lines.append(LogLine(last_t, m.group(2), kv.get("event", ""), kv, raw))
        return self.lines

    def select(self, events: Iterable[str] | None = None, since: float | None = None,
               until: float | None = None) -> list[LogLine]:
        """Lines (optionally only these events) with since <= t <= until. Log timestamps have
        1 ms resolution, so `since` is widened by 2 ms."""
        self.refresh()
        want = None if events is None else set(events)
        lo = -1e18 if since is None else since - 0.002
        hi = 1e18 if until is None else until
        return [ln for ln in self.lines if lo <= ln.t <= hi and (want is None or ln.event in want)]


# --------------------------------------------------------------------------- /proc

def main_pid(pid: int) -> int:
    """The process doing the work: `ip netns exec` execs its command (same pid); if some wrapper
    forked instead, follow its only child."""
    for _ in range(5):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return pid
        if cmd and os.path.basename(cmd[0].decode(errors="replace")) != "ip":
            return pid
        try:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return pid
        if len(kids) != 1:
            return pid
        pid = int(kids[0])
    return pid


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (kB) and Threads from /proc/PID/status."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
            out[key] = int(value.split()[0])
    return out


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def proc_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


# --------------------------------------------------------------------------- numbers and tables

def describe(values: Sequence[float]) -> dict[str, float | int | None]:
    vals = [float(v) for v in values]
    if not vals:
        return {"n": 0, "min": None, "median": None, "max": None, "mean": None}
    return {"n": len(vals), "min": min(vals), "median": statistics.median(vals), "max": max(vals),
            "mean": statistics.fmean(vals)}


def fmt_ms(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Iterable[int] = ()) -> str:
    """A plain-text table; columns listed in `right` are right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    ralign = set(right)

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in ralign else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


# --------------------------------------------------------------------------- environment

def environment() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            cp = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return cp.stdout.strip() if cp.returncode == 0 else None

    status = git("status", "--porcelain")
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "git_dirty_files": status.splitlines()[:50] if status else [],
        "vipd_source_digest": source_digest(),
        "vipd_source_files": source_files(),
    }


def source_files(root: Path = ROOT / "vipd") -> dict[str, str]:
    """sha256 (16 hex digits) of every .py under root, by relative path."""
    import hashlib

    out = {}
    for path in sorted(root.rglob("*.py")):
        try:
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        except OSError:
            pass
    return out


def source_digest(files: dict[str, str] | None = None) -> str:
    """One digest of the daemon's sources: shows whether its code changed while the bench ran (a
    daemon restarted later would load the new code)."""
    import hashlib

    files = source_files() if files is None else files
    return hashlib.sha256("".join(f"{k}\0{v}\n" for k, v in sorted(files.items())).encode()).hexdigest()[:16]


def changed_files(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def tool_version(argv: Sequence[str]) -> str | None:
    try:
        cp = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (cp.stdout or cp.stderr).strip().splitlines()[0] if (cp.stdout or cp.stderr).strip() else None


class Interrupted(KeyboardInterrupt):
    """SIGTERM / SIGHUP turned into an exception, so every `finally` (teardown) runs."""


def install_signal_handlers() -> None:
    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)

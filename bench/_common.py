"""Helpers shared by the benches: clocks, log parsing, /proc sampling, statistics, tables, environment.

Nothing here knows about a particular daemon or fault.
"""

from __future__ import annotations

import datetime as _dt
import json
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
# VIPD_BENCH_SRC: a snapshot of the vipd package (see snapshot_vipd) that the bench and every daemon it
# starts import instead of the working tree, so edits made while a bench runs change nothing.
SRC = Path(os.environ["VIPD_BENCH_SRC"]) if os.environ.get("VIPD_BENCH_SRC") else ROOT
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

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


class CpuToExit:
    """A process's CPU seconds from now until it exits: read every 20 ms on a thread of its own
    until the process is a zombie (its figures are final then; whoever reaps it does so later)."""

    def __init__(self, pid: int, timeout: float = 30.0) -> None:
        import threading

        self.pid = pid
        self.start_s = proc_cpu_seconds(pid)
        self.last_s = self.start_s
        self.exited = False
        self._thread = threading.Thread(target=self._run, args=(timeout,), daemon=True)
        self._thread.start()

    def _run(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                stat = Path(f"/proc/{self.pid}/stat").read_text()
            except OSError:  # reaped already: the last read stands
                return
            self.last_s = proc_cpu_seconds(self.pid) if ") Z " not in stat else self._final(stat)
            if self.exited:
                return
            time.sleep(0.02)

    def _final(self, stat: str) -> float:
        self.exited = True
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def result(self) -> float | None:
        """CPU seconds used until the exit (None if it was not seen exiting)."""
        self._thread.join()
        return round(self.last_s - self.start_s, 2) if self.exited else None


def proc_wakeups(pid: int) -> int:
    """Voluntary context switches of the process's main thread (vipd's trio loop): each is a sleep
    that ended in a wake-up, which this machine charges heavily (bench/machine.py)."""
    for line in Path(f"/proc/{pid}/task/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    return 0


def proc_cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of the whole process, seconds: Python and the kernel work it asked for."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


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
    from machine import wakeup_cost_us  # (bench/machine.py: what a wake-up costs here, today)
    return {
        "wakeup_cpu_us_time_sleep_10ms": wakeup_cost_us(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "git_dirty_files": status.splitlines()[:50] if status else [],
        "vipd_src": str(SRC / "vipd"),
        "vipd_src_commit": (SRC / "COMMIT").read_text().strip() if (SRC / "COMMIT").exists() else None,
        "vipd_src_is_snapshot": SRC != ROOT,
        "vipd_source_digest": source_digest(),
        "vipd_source_files": source_files(),
    }


def write_json(name: str, payload: dict[str, Any]) -> Path:
    """bench/out/<name>-<timestamp>.json with `payload` and the environment; prints and returns it."""
    path = ROOT / "bench" / "out" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=1))
    print(f"JSON: {path}")
    return path


def source_files(root: Path = SRC / "vipd") -> dict[str, str]:
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
    """One digest of the daemon's sources (the snapshot the bench runs, or the working tree): shows
    whether its code changed while the bench ran (a daemon restarted later would load the new code)."""
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


# --------------------------------------------------------------------------- the vipd under test

def snapshot_vipd(rev: str) -> Path:
    """`git archive REV vipd` unpacked under bench/out/src-<commit>/ (reused when present); returns
    the directory to put first on sys.path / PYTHONPATH. The bench then runs exactly that commit's
    vipd, whatever happens to the working tree meanwhile."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                            capture_output=True, text=True, timeout=10)
    if commit.returncode != 0:
        raise SystemExit(f"--vipd-src {rev}: not a commit: {commit.stderr.strip()}")
    sha = commit.stdout.strip()
    dest = ROOT / "bench" / "out" / f"src-{sha[:12]}"
    if not (dest / "vipd" / "__init__.py").exists():
        tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", sha, "vipd"], capture_output=True,
                                 timeout=60, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True, timeout=60)
        (tmp / "COMMIT").write_text(sha + "\n")
        if dest.exists():
            subprocess.run(["rm", "-rf", str(dest)], check=True)
        tmp.rename(dest)
    return dest


# --------------------------------------------------------------------------- daemons' own logs

class PipeLogger:
    """Reads a process's stdout pipe (stderr merged into it) line by line and appends each line to
    `path` in vipd's log format, stamped on arrival with millisecond UTC time:
    `2026-11-23T18:40:01.123Z info event=EVENT msg="the line"`. `classify(line)` names the event
    ("" -> "log"). Daemons that stamp their own logs only to the second (keepalived, vip-manager)
    become readable by KeyValueLog. The thread drains the pipe until EOF, so the daemon never blocks
    on a full pipe."""

    def __init__(self, stream: Any, path: Path, classify: Callable[[str], str], src: str = "") -> None:
        import threading

        self.path = path
        self.classify = classify
        self.src = src
        self._stream = stream
        self._thread = threading.Thread(target=self._run, name=f"pipelog-{path.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with open(self.path, "a", buffering=1) as out:
            for raw in iter(self._stream.readline, b""):
                t = time.time()
                line = raw.decode(errors="replace").rstrip("\n")
                ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"
                msg = line.replace("\\", "\\\\").replace('"', '\\"')
                src = f" src={self.src}" if self.src else ""
                out.write(f'{ts} info event={self.classify(line) or "log"}{src} msg="{msg}"\n')
        try:
            self._stream.close()
        except OSError:
            pass

    def join(self, timeout: float = 2.0) -> None:
        self._thread.join(timeout)


# --------------------------------------------------------------------------- process groups

def group_pids(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(d.name))
    return sorted(out)


def proc_pss_kib(pid: int) -> int | None:
    """Proportional set size (kB) from /proc/PID/smaps_rollup: pages shared between the processes
    of one daemon are counted once in the sum."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reexec_with_snapshot(vipd_src: str, seed: int, script: str) -> None:
    """Run the whole bench (and every vipd it starts) on a `git archive` snapshot of `vipd_src`:
    re-executes `script` with the snapshot first on PYTHONPATH and the seed fixed. No-op for
    'worktree' or when already running on a snapshot."""
    if vipd_src == "worktree" or os.environ.get("VIPD_BENCH_SRC"):
        return
    src = snapshot_vipd(vipd_src)
    env = dict(os.environ, VIPD_BENCH_SRC=str(src),
               PYTHONPATH=os.pathsep.join([str(src), *filter(None, [os.environ.get("PYTHONPATH")])]))
    argv = sys.argv[1:] + ([] if "--seed" in sys.argv[1:] else ["--seed", str(seed)])
    os.execve(sys.executable, [sys.executable, str(Path(script).resolve()), *argv], env)

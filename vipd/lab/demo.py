"""`vipd demo` (`make demo`): a live failover story in network namespaces, for an operator to watch.

It builds a throw-away lab (vipd.lab): a real etcd in its own namespace, three hosts h1..h3 and a
client on one bridge. Every host runs `vipd run -c FILE`, the command line of systemd/vipd.service,
with the Cluster defaults (lease_ttl 3 s, fence_margin 1.5 s). The client probes every VIP every 10 ms
and names the host that answered (vipd.lab.probe); an AddressMonitor records which hosts hold each VIP,
and every change of owner is printed as it happens (one plain line per change: fine in a CI log).

The story, one function per step: planned handover (`vipd release`), planned stop (SIGTERM), crash
(SIGKILL), link cut (and restore), etcd stopped and restarted. After each step: what the client saw
(outage in ms, the host answering before and after) and whether two hosts ever held a VIP at once.

Exit codes: 0 every step behaved, 1 a step failed (named) or the demo broke, 2 not runnable here
(not root, a binary missing), 130 interrupted. Everything is torn down on every exit path; the working
directory (configs, logs) is deleted unless a step failed.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

from vipd.lab import netns
from vipd.lab.cluster import Cluster, VipDef, vipd_argv
from vipd.lab.etcd import EtcdServer
from vipd.lab.monitor import AddressMonitor
from vipd.lab.probe import Probe
from vipd.lab.topology import Lab

PREFIX = "vtd"  # namespaces: vtd<2 hex>br, ...e, ...c, ...h1..h3
NEEDED_BINARIES = {"ip": "iproute2", "bridge": "iproute2", "etcd": "etcd-server"}
STORY_BUDGET = 90.0  # seconds from start after which remaining steps are skipped (the demo must end < 2 min)
HARD_STOP = 100.0  # seconds from start past which no wait of the story extends (teardown takes < 15 s)
PROBE_INTERVAL = 0.01
CLIENT_WAIT = 3.0  # seconds for the client to get an answer from a new owner
WATCH_AFTER_RESTORE = 2.0  # seconds the cut host is watched after it is back
INDENT = " " * 10  # continuation lines start under the message, past "[ 12.34s] "


class StepFailed(Exception):
    """A step did not behave; the message says how."""


# ---------------------------------------------------------------------------- preconditions

def preflight(path: str | None = None, euid: int | None = None) -> str | None:
    """Why the demo cannot run here (one line), or None. `path` defaults to $PATH."""
    if (os.geteuid() if euid is None else euid) != 0:
        return "needs root (it creates network namespaces): run it as root, e.g. `sudo make demo`"
    path = os.environ.get("PATH", os.defpath) if path is None else path
    missing = [b for b in NEEDED_BINARIES if shutil.which(b, path=path) is None]
    if missing:
        pkgs = " ".join(dict.fromkeys(NEEDED_BINARIES[b] for b in missing))
        names = ", ".join(f"`{b}`" for b in missing)
        return f"needs {names} on PATH (Debian: apt-get install {pkgs}; `make demo` installs it)"
    return None


# ---------------------------------------------------------------------------- output

class Console:
    """Timestamped lines (seconds since start), one lock for every writer. A hook runs before each
    line so the owner board prints the changes that happened before it first."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.t0 = time.monotonic()
        self.lock = threading.RLock()
        self.before_line: Callable[[], None] | None = None
        self.broken = False  # stdout went away (e.g. `| head`): keep going silently, still tear down

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, msg: str, t: float | None = None, *, sync: bool = True) -> None:
        with self.lock:
            if sync and self.before_line is not None:
                self.before_line()
            stamp = (time.monotonic() if t is None else t) - self.t0
            self._write(f"[{stamp:6.2f}s] {msg}")

    def more(self, msg: str) -> None:
        """A continuation line of the previous message."""
        with self.lock:
            self._write(INDENT + msg)

    def _write(self, line: str) -> None:
        if self.broken:
            return
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (BrokenPipeError, ValueError, OSError):
            self.broken = True


def _who(holders: frozenset[str] | set[str] | list[str]) -> str:
    if not holders:
        return "-"
    return "+".join(sorted(holders)) + ("  (!! two holders)" if len(holders) > 1 else "")


class OwnerBoard:
    """Prints one status line (`owners  api=h2  api6=h1`) at each change of any VIP's holders, stamped
    with the AddressMonitor's own time of the change.

    The monitor offers no "wait for any change", so a thread looks at its timeline every 50 ms; the
    printed times are the monitor's, exact whatever the lag, and every other line first prints the
    changes that precede it (Console.before_line)."""

    PERIOD = 0.05

    def __init__(self, console: Console, monitor: Any, vips: list[tuple[str, Any]]) -> None:
        self.console = console
        self.monitor = monitor
        self.vips = vips  # [(name, ip)]
        self._seen = {ip: 0 for _, ip in vips}
        self._state: dict[Any, frozenset[str]] = {ip: frozenset() for _, ip in vips}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "OwnerBoard":
        self.console.before_line = self.catch_up
        self._thread = threading.Thread(target=self._run, name="vipd-demo-board", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        self.console.before_line = None

    def _run(self) -> None:
        while not self._stop.wait(self.PERIOD):
            self.catch_up()

    def line(self) -> str:
        return "owners  " + "  ".join(f"{name}={_who(self._state[ip])}" for name, ip in self.vips)

    def catch_up(self) -> None:
        with self.console.lock:  # the console's lock orders the board's lines among everyone's
            timeline = self.monitor.holders_timeline()
            changes: dict[float, list[tuple[Any, frozenset[str]]]] = {}
            for _, ip in self.vips:
                line = timeline[ip]
                for t, holders in line[self._seen[ip]:]:
                    changes.setdefault(t, []).append((ip, holders))
                self._seen[ip] = len(line)
            for t in sorted(changes):
                for ip, holders in changes[t]:
                    self._state[ip] = holders
                self.console.say("  " + self.line(), t, sync=False)


# ---------------------------------------------------------------------------- what the client saw

@dataclass
class Seen:
    """One VIP over one step, from the client's probes and the address monitor."""

    name: str
    owner_before: str | None
    owner_after: str | None
    answered_before: str | None
    answered_after: str | None
    outage_ms: float = 0.0
    lost: int = 0
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        lost = f" ({self.lost} probe{'s' if self.lost != 1 else ''} lost)" if self.lost else ""
        return (f"{self.name:<5} {self.answered_before or '-'} -> {self.answered_after or '-'}   "
                f"client outage {self.outage_ms:6.0f} ms{lost}")


@dataclass
class StepResult:
    name: str
    ok: bool
    headline: str
    problems: list[str] = field(default_factory=list)


def _responder_at(probe: Any, t: float) -> str | None:
    """The host that answered the client's probes at time t (the last change of responder before t)."""
    before = [host for ts, host in probe.responders() if ts <= t]
    return before[-1] if before else None


# ---------------------------------------------------------------------------- the demo

class Demo:
    def __init__(self, console: Console) -> None:
        self.out = console
        self.workdir = Path(tempfile.mkdtemp(prefix="vipd-demo-"))
        # Set by build(), None until then: teardown() copes with any partial build. (Any: the steps
        # run only after a complete build, and Optional would put an assert in every one of them.)
        self.lab: Any = None  # Lab
        self.etcd: Any = None  # EtcdServer
        self.cluster: Any = None  # Cluster
        self.monitor: Any = None  # AddressMonitor
        self.board: OwnerBoard | None = None
        self.probes: dict[str, Probe] = {}
        self.vips: list[VipDef] = []
        self.results: list[StepResult] = []

    # ------------------------------------------------------------------ setup

    def build(self) -> None:
        self.lab = self._new_lab()
        lab = self.lab
        self.out.say(f"lab {lab.prefix}: namespaces {' '.join(lab.namespaces)} (workdir {self.workdir})")
        self.etcd = EtcdServer(self.workdir / "etcd", host=str(lab.etcd_ip), client_port=2379, peer_port=2380,
                               netns=lab.etcd_ns)
        self.etcd.start()
        self.out.say(f"etcd {self.etcd.endpoint} up in {lab.etcd_ns}")
        self.vips = [VipDef("api", str(lab.vip4(0))), VipDef("api6", str(lab.vip6(0)))]
        self.cluster = Cluster(lab, self.workdir / "hosts", self.vips, endpoints=[self.etcd.endpoint])
        self.monitor = AddressMonitor(lab, [self.ip(v) for v in self.vips]).start()
        self.board = OwnerBoard(self.out, self.monitor, [(v.name, self.ip(v)) for v in self.vips]).start()
        for v in self.vips:
            self.probes[v.name] = Probe(lab, self.ip(v), interval=PROBE_INTERVAL, max_duration=300,
                                        log=self.workdir / f"probe-{v.name}.log").start()
        self.out.say(f"client {lab.client.ns} probes {', '.join(v.address for v in self.vips)} every "
                     f"{PROBE_INTERVAL * 1000:.0f} ms")
        self.cluster.start_all()
        cmd = ' '.join(Path(a).name if i == 0 else a for i, a in
                       enumerate([*vipd_argv(), "run", "-c", "hosts/hN/vipd.toml"]))
        self.out.say(f"vipd started on {' '.join(h.name for h in lab.hosts)} ({cmd}), lease_ttl "
                     f"{self.cluster.lease_ttl} s, fence_margin {self.cluster.timing['fence_margin']} s")
        for v in self.vips:
            owner = self.cluster.wait_owner(self.ip(v), timeout=15)
            if not self.probes[v.name].wait_responder(owner, timeout=5):
                raise RuntimeError(f"the client gets no answer from {v.name} on {owner}")
        self.out.say("ready: " + "  ".join(f"{v.name} on {self.owner(v)}" for v in self.vips)
                     + ", the client gets answers")

    @staticmethod
    def _new_lab() -> Lab:
        for _ in range(20):  # a free name: never touch another run's namespaces
            lab = Lab(PREFIX + secrets.token_hex(1), n_hosts=3)
            try:
                return lab.up()
            except FileExistsError:
                continue
        raise RuntimeError(f"no free {PREFIX}XX namespace name (earlier demos left behind? see `ip netns`)")

    # ------------------------------------------------------------------ small helpers

    @staticmethod
    def ip(v: Any) -> Any:
        return ipaddress.ip_interface(v.address).ip

    def vip(self, name: str) -> Any:
        return next(v for v in self.vips if v.name == name)

    def owner(self, v: Any) -> str | None:
        holders = self.lab.holders(self.ip(v))
        return holders[0] if len(holders) == 1 else None

    def left(self, timeout: float) -> float:
        """`timeout`, shortened so that no wait runs past HARD_STOP."""
        return max(0.1, min(timeout, HARD_STOP - self.out.elapsed()))

    def require_owner(self, v: Any) -> str:
        try:
            return self.cluster.wait_owner(self.ip(v), timeout=self.left(10))
        except AssertionError:
            raise StepFailed(f"{v.name} has no single owner to start from "
                             f"(holders {self.lab.holders(self.ip(v))})") from None

    def begin(self, n: int, title: str, action: str) -> float:
        self.out.say(f"-- step {n}/5  {title}: {action}")
        return time.monotonic()

    def change_time(self, v: Any, since: float, host: str, *, gained: bool) -> float | None:
        """Monitor time at which `host` started (gained) or stopped holding v, after `since`."""
        for t, before, after in self.monitor.owner_changes(self.ip(v)):
            if t >= since and (host in after) == gained and (host in before) != gained:
                return t
        return None

    def duals_since(self, since: float) -> list[str]:
        return [f"{ip} held by {' and '.join(sorted(holders))} at once for {(end - start) * 1e3:.1f} ms"
                for ip, start, end, holders in self.monitor.dual_windows() if end >= since]

    # ------------------------------------------------------------------ measuring a step

    def settle(self, t0: float, leaving: dict[str, str | None], timeout: float) -> list[Seen]:
        """Wait for every VIP to have one owner again (for a VIP in `leaving`: another host than the
        one it must leave; None: any host) and for the client to get answers from it; then what the
        client saw since t0."""
        seen = []
        for v in self.vips:
            probe = self.probes[v.name]
            s = Seen(v.name, owner_before=self._owner_at(v, t0), owner_after=None,
                     answered_before=_responder_at(probe, t0), answered_after=None)
            must_leave = leaving.get(v.name)
            wait = self.left(timeout if v.name in leaving else 5)
            try:
                s.owner_after = self.cluster.wait_owner(self.ip(v), exclude=[must_leave] if must_leave else [],
                                                        timeout=wait)
            except AssertionError:
                holders = self.lab.holders(self.ip(v))
                what = "new owner" if v.name in leaving else "owner"
                s.problems.append(f"{v.name}: no single {what} after {wait:.1f} s (holders: {_who(holders)})")
            if s.owner_after and not probe.wait_responder(s.owner_after, timeout=self.left(CLIENT_WAIT)):
                s.problems.append(f"{v.name}: the client gets no answer from {s.owner_after}")
            outages = [o for o in probe.outages(since=t0) if not o.ongoing]
            s.outage_ms = sum(o.ms for o in outages)
            s.lost = sum(o.lost for o in outages)
            s.answered_after = probe.last_responder()
            if s.owner_after and s.answered_after != s.owner_after:
                s.problems.append(f"{v.name}: owner {s.owner_after} but the client hears {s.answered_after}")
            if v.name not in leaving and s.owner_after and s.owner_after != s.owner_before:
                s.problems.append(f"{v.name} moved from {s.owner_before or '-'} to {s.owner_after} "
                                  "although this step left it alone")
            seen.append(s)
        return seen

    def _owner_at(self, v: Any, t: float) -> str | None:
        """The single holder of v at time t according to the monitor (None: none or several)."""
        holders: frozenset[str] = frozenset()
        for ts, hs in self.monitor.holders_timeline(self.ip(v)):
            if ts > t:
                break
            holders = hs
        return next(iter(holders)) if len(holders) == 1 else None

    def report(self, name: str, t0: float, seen: list[Seen], main: str, notes: list[str],
               problems: list[str]) -> StepResult:
        problems = [p for s in seen for p in s.problems] + problems
        duals = self.duals_since(t0)
        problems += duals
        m = next(s for s in seen if s.name == main)
        headline = (f"{name}: {m.answered_before or '-'} -> {m.answered_after or '-'}, "
                    f"client outage {m.outage_ms:.0f} ms")
        ok = not problems
        self.out.say(f"{headline}{'':<4}{'ok' if ok else 'FAILED'}")
        for s in seen:
            self.out.more(s.line())
        for note in notes:
            self.out.more(note)
        self.out.more("dual ownership: " + ("never" if not duals else "; ".join(duals)))
        for p in problems:
            if p not in duals:
                self.out.more(f"!! {p}")
        return StepResult(name, ok, headline, problems)

    # ------------------------------------------------------------------ the story: one step each

    def step_release(self) -> StepResult:
        v = self.vip("api")
        old = self.require_owner(v)
        t0 = self.begin(1, "planned handover", f"`vipd release {v.name}` on {old}")
        r = self.cluster.run_cli(self.cluster.host(old), "release", v.name)
        if r.returncode != 0:
            raise StepFailed(f"`vipd release {v.name}` on {old} failed: {(r.stderr or r.stdout).strip()}")
        seen = self.settle(t0, {v.name: old}, timeout=5)
        new = seen[0].owner_after
        notes = [f"{old} answered `{r.stdout.strip()}`; {new} took {v.name} "
                 f"{self._after(v, t0, new, gained=True)} after the command"]
        return self.report("planned handover", t0, seen, v.name, notes, [])

    def step_sigterm(self) -> StepResult:
        v = self.vip("api")
        old = self.require_owner(v)
        host = self.cluster.host(old)
        held = [x.name for x in self.vips if self.owner(x) == old]
        t0 = self.begin(2, "planned stop", f"SIGTERM to vipd on {old} (systemctl stop; it holds {', '.join(held)})")
        log = self.cluster.log_path(host)
        log_offset = log.stat().st_size if log.exists() else 0
        rc = self.cluster.term(host)
        took = time.monotonic() - t0
        seen = self.settle(t0, {name: old for name in held}, timeout=5)
        problems = [] if rc == 0 else [f"vipd on {old} exited with {rc} after SIGTERM"]
        with open(log, "rb") as f:
            f.seek(log_offset)
            revoked = b"event=lease_revoked" in f.read()
        notes = [f"vipd on {old} exited {rc} after {took:.2f} s"
                 + (", revoking its lease on the way out" if revoked else " (no lease_revoked in its log)")]
        self.cluster.start(host)
        notes.append(f"vipd on {old} started again: it joins as a backup")
        return self.report("planned stop", t0, seen, v.name, notes, problems)

    def step_crash(self) -> StepResult:
        v = self.vip("api")
        old = self.require_owner(v)
        host = self.cluster.host(old)
        held = [x.name for x in self.vips if self.owner(x) == old]
        t0 = self.begin(3, "owner crash", f"SIGKILL to vipd on {old} (no code runs on {old} after this)")
        self.cluster.kill(host)
        seen = self.settle(t0, {name: old for name in held}, timeout=self.cluster.lease_ttl + 5)
        new = seen[0].owner_after
        notes = [f"the kernel removed {v.name} from {old} {self._after(v, t0, old, gained=False)} after the kill "
                 f"(address lifetime); {new} took it {self._after(v, t0, new, gained=True)} after"]
        problems = self._order_problem(v, t0, old, new)
        self.cluster.start(host)
        notes.append(f"vipd on {old} started again (as systemd's Restart=on-failure would)")
        return self.report("owner crash", t0, seen, v.name, notes, problems)

    def step_link_cut(self) -> StepResult:
        v = self.vip("api")
        old = self.require_owner(v)
        host = self.cluster.host(old)
        held = [x.name for x in self.vips if self.owner(x) == old]
        t0 = self.begin(4, "link cut", f"{old}'s switch port goes down ({old} loses etcd and the clients)")
        self.lab.cut(host)
        try:
            seen = self.settle(t0, {name: old for name in held}, timeout=self.cluster.lease_ttl + 5)
        finally:
            t_back = time.monotonic()
            self.lab.restore(host)
        new = seen[0].owner_after
        notes = [f"{old} dropped {v.name} by itself {self._after(v, t0, old, gained=False)} after the cut "
                 f"(its lease could no longer be proven); {new} took it {self._after(v, t0, new, gained=True)} after"]
        problems = self._order_problem(v, t0, old, new)
        # A deliberate observation window: nothing should happen, so there is nothing to wait for.
        time.sleep(self.left(WATCH_AFTER_RESTORE))
        retaken = [x.name for x in self.vips if self.change_time(x, t_back, old, gained=True) is not None]
        if retaken:
            problems.append(f"{old} took {', '.join(retaken)} again after its link came back")
        notes.append(f"{old}'s link restored: {WATCH_AFTER_RESTORE:.0f} s later it holds "
                     f"{', '.join(retaken) or 'nothing'}; " + ", ".join(f"{x.name} on {self.owner(x) or '-'}"
                                                                     for x in self.vips))
        return self.report("link cut", t0, seen, v.name, notes, problems)

    def step_etcd_restart(self) -> StepResult:
        v = self.vip("api")
        self.require_owner(v)
        ttl = self.cluster.lease_ttl
        t0 = self.begin(5, "etcd stopped and restarted", "SIGTERM to etcd; started again once no host holds a VIP")
        self.etcd.stop()
        problems, notes = [], []
        for x in self.vips:
            if not self.monitor.wait_holders(self.ip(x), [], timeout=self.left(ttl + 1.5)):
                problems.append(f"{x.name} still held by {_who(self.monitor.holders_now(self.ip(x)))} "
                                f"{ttl + 1.5:.1f} s after etcd stopped")
        t_gone = time.monotonic() - t0
        notes.append(f"every host dropped its VIPs within {t_gone:.2f} s of etcd stopping (lease_ttl {ttl} s): "
                     "no lease, no VIP")
        t_start = time.monotonic()
        try:
            self.etcd.start(timeout=self.left(10))
        except RuntimeError as e:
            raise StepFailed(f"etcd did not come back: {str(e).splitlines()[0]}") from None
        healthy = time.monotonic() - t_start
        seen = self.settle(t0, {x.name: None for x in self.vips}, timeout=15)
        back = ", ".join(f"{s.name} on {s.owner_after or '-'} after "
                         f"{self._after(self.vip(s.name), t_start, s.owner_after, gained=True)}" for s in seen)
        notes.append(f"etcd restarted (healthy after {healthy:.2f} s); VIPs back: {back}")
        return self.report("etcd stopped and restarted", t0, seen, v.name, notes, problems)

    def _after(self, v: Any, t0: float, host: str | None, *, gained: bool) -> str:
        t = self.change_time(v, t0, host, gained=gained) if host else None
        return "?" if t is None else f"{t - t0:.2f} s"

    def _order_problem(self, v: Any, t0: float, old: str, new: str | None) -> list[str]:
        """The old owner's copy must be gone before the new owner's appears."""
        lost = self.change_time(v, t0, old, gained=False)
        won = self.change_time(v, t0, new, gained=True) if new else None
        if lost is not None and won is not None and won < lost:
            return [f"{new} added {v.name} {(lost - won) * 1e3:.0f} ms before {old} removed it"]
        return []

    STEPS = ("step_release", "step_sigterm", "step_crash", "step_link_cut", "step_etcd_restart")
    TITLES = ("planned handover", "planned stop", "owner crash", "link cut", "etcd stopped and restarted")

    def story(self) -> None:
        for n, (method, title) in enumerate(zip(self.STEPS, self.TITLES), 1):
            if self.out.elapsed() > STORY_BUDGET:
                self.out.say(f"{title}: skipped, out of time    FAILED")
                self.results.append(StepResult(title, False, title, ["skipped: out of time"]))
                continue
            try:
                self.results.append(getattr(self, method)())
            except Exception as e:  # StepFailed, or the harness gave up: this step failed, go on
                why = str(e) if isinstance(e, StepFailed) else f"{type(e).__name__}: {e}"
                why = why.splitlines()[0] if why else type(e).__name__
                self.out.say(f"{title}: {why}    FAILED")
                self.results.append(StepResult(title, False, title, [why]))

    # ------------------------------------------------------------------ end

    def verdict(self) -> bool:
        failed = [r for r in self.results if not r.ok]
        duals = self.duals_since(0.0)
        m = self.monitor
        watch = (f"AddressMonitor: {m.samples} samples, max gap {m.max_gap * 1e3:.0f} ms" if m else "no monitor")
        self.out.say(f"summary: {len(self.results) - len(failed)} of {len(self.results)} steps ok; "
                     + ("two hosts never held a VIP at once" if not duals else "DUAL OWNERSHIP seen")
                     + f" ({watch})")
        for r in failed:
            self.out.more(f"FAILED: {r.name}: {'; '.join(r.problems)}")
        for d in duals:
            self.out.more(f"FAILED: {d}")
        return not failed and not duals and len(self.results) == len(self.STEPS)

    def teardown(self) -> list[str]:
        """Stop everything and remove the lab; returns what could not be removed (normally nothing)."""
        problems: list[str] = []

        def attempt(what: str, fn: Callable[[], Any]) -> None:
            try:
                fn()
            except Exception as e:  # keep tearing down
                problems.append(f"{what}: {e}")

        if self.board is not None:
            attempt("owner board", self.board.stop)
        if self.cluster is not None:  # vipd first, while etcd is up: a clean stop revokes its lease
            attempt("vipd", self.cluster.stop_all)
        for p in self.probes.values():
            attempt("probe", p.stop)
        if self.monitor is not None:
            attempt("monitor", lambda: self.monitor.stop(raise_error=False))
        if self.etcd is not None:
            attempt("etcd", self.etcd.stop)
        if self.lab is not None:
            attempt("lab", self.lab.down)
            problems += self._leftovers()
        return problems

    def _leftovers(self) -> list[str]:
        left = []
        if netns.list_ns(self.lab.prefix):
            left.append(f"namespaces left: {' '.join(netns.list_ns(self.lab.prefix))}")
        procs = self.cluster.procs.values() if self.cluster else []  # lab.down() checked the namespaces
        alive = [p.pid for p in procs if p.poll() is None]
        if self.etcd is not None and self.etcd.pid is not None:
            alive.append(self.etcd.pid)
        if alive:
            left.append(f"processes left: {alive}")
        return left


# ---------------------------------------------------------------------------- entry point

def main(args: Any = None) -> int:
    reason = preflight()
    if reason:
        print(f"vipd demo: {reason}", file=sys.stderr)
        return 2
    out = Console()
    with _signals_as_interrupts():
        demo = Demo(out)
        keep, code = False, 1
        try:
            out.say("vipd demo: 3 hosts, etcd and a client in network namespaces; Ctrl-C tears it all down")
            demo.build()
            demo.story()
            ok = demo.verdict()
            keep, code = not ok, 0 if ok else 1
        except KeyboardInterrupt:
            out.say("interrupted: tearing everything down")
            code = 130
        except Exception as e:  # the demo itself broke: say what, keep the logs
            out.say(f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            for line in str(e).splitlines()[1:12]:
                out.more(line)
            keep, code = True, 1
        finally:
            with _signals_ignored():  # a second Ctrl-C must not leave half a lab behind
                code = _finish(demo, out, keep, code)
    return code


def _finish(demo: Demo, out: Console, keep: bool, code: int) -> int:
    out.say("teardown: stopping vipd, probes, etcd; deleting the namespaces")
    problems = demo.teardown()
    if problems:
        out.say("teardown incomplete: " + "; ".join(problems))
        keep, code = True, code or 1
    elif demo.lab is not None:
        out.say(f"teardown complete: no {demo.lab.prefix}* namespace, link, address or process left")
    if keep:
        out.say(f"logs kept in {demo.workdir} (hosts/h*/vipd.log, etcd/etcd.log, probe-*.log)")
    else:
        shutil.rmtree(demo.workdir, ignore_errors=True)
    return code


class _signals_as_interrupts:
    """SIGTERM and SIGHUP end the demo like Ctrl-C (KeyboardInterrupt), so it always tears down."""

    SIGNALS = (signal.SIGTERM, signal.SIGHUP)

    def __enter__(self) -> None:
        self.saved = {s: signal.signal(s, self._raise) for s in self.SIGNALS}

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    def __exit__(self, *exc: object) -> None:
        for s, h in self.saved.items():
            signal.signal(s, h)


class _signals_ignored:
    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __enter__(self) -> None:
        self.saved = {s: signal.signal(s, signal.SIG_IGN) for s in self.SIGNALS}

    def __exit__(self, *exc: object) -> None:
        for s, h in self.saved.items():
            signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())

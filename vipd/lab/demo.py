"""`vipd demo` (`make demo`): a live failover story in network namespaces, for an operator to watch.

It builds a throw-away lab (vipd.lab): a real etcd in its own namespace, three hosts h1..h3 and a
client on one bridge. Every host runs `vipd run -c FILE`, the command line of systemd/vipd.service,
with the Cluster defaults (lease_ttl 3 s, fence_margin 1.5 s). The client probes every VIP every 10 ms
and names the host that answered (vipd.lab.probe); an AddressMonitor records which hosts hold each VIP,
and every change of owner is printed as it happens (one plain line per change: fine in a CI log).

The story, one function per step (vipd.lab.demo_steps): planned handover (`vipd release`), planned
stop (SIGTERM), crash (SIGKILL), link cut (and restore), etcd stopped and restarted. After each step:
what the client saw (outage in ms, the host answering before and after) and whether two hosts ever
held a VIP at once (printed by vipd.lab.demo_report).

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
import time
from pathlib import Path
from typing import Any, Callable

from vipd.lab import netns
from vipd.lab.cluster import Cluster, VipDef, vipd_argv
from vipd.lab.demo_report import Console, OwnerBoard, Seen, StepResult, responder_at, who
from vipd.lab.demo_steps import STORY, StepFailed
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
                     answered_before=responder_at(probe, t0), answered_after=None)
            must_leave = leaving.get(v.name)
            wait = self.left(timeout if v.name in leaving else 5)
            try:
                s.owner_after = self.cluster.wait_owner(self.ip(v), exclude=[must_leave] if must_leave else [],
                                                        timeout=wait)
            except AssertionError:
                holders = self.lab.holders(self.ip(v))
                what = "new owner" if v.name in leaving else "owner"
                s.problems.append(f"{v.name}: no single {what} after {wait:.1f} s (holders: {who(holders)})")
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

    # ------------------------------------------------------------------ the story (vipd.lab.demo_steps)

    TITLES = tuple(title for title, _ in STORY)

    def story(self) -> None:
        for title, step in STORY:
            if self.out.elapsed() > STORY_BUDGET:
                self.out.say(f"{title}: skipped, out of time    FAILED")
                self.results.append(StepResult(title, False, title, ["skipped: out of time"]))
                continue
            try:
                self.results.append(step(self))
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
        return not failed and not duals and len(self.results) == len(STORY)

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
    if keep or os.environ.get("VIPD_DEMO_KEEP"):
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

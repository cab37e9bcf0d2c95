#!/usr/bin/env python3
"""Failover bench: how long a client loses a VIP when its owner fails, and whether two hosts ever
hold it at once. Runs on demand as root, never as a test:

    .venv/bin/python bench/failover.py [--runs 5] [--faults sigterm,sigkill,sigstop,linkcut,etcd-restart]
                                       [--json PATH] [--seed N]

A namespace lab (prefix `vtf`: bridge, etcd, hosts h1..h3, client), one daemon per host driven by a
DaemonDriver (vipd today; keepalived / vip-manager drivers plug in beside it), a client probe every
10 ms that names the answering host by its MAC, and an address monitor sampling every host's
addresses every 10 ms. For each fault and run: wait for one owner answering steadily, sleep a
uniform random 0..TTL (so the fault hits every keepalive phase), inject the fault on the owner,
measure, recover (restart / SIGCONT / link up), wait until the faulted host is back in the
cluster. Before the faults, a footprint: one daemon alone owning 10 VIPs, idle RSS and CPU. See
bench/README.md.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (also puts the repository on sys.path)

from vipd.lab import topology  # noqa: E402
from vipd.lab.cluster import Cluster, VipDef  # noqa: E402
from vipd.lab.etcd import EtcdServer  # noqa: E402
from vipd.lab.monitor import AddressMonitor  # noqa: E402
from vipd.lab.probe import Probe  # noqa: E402
from vipd.lab.topology import Host, Lab  # noqa: E402

PREFIX = "vtf"  # every namespace, link and etcd key prefix the bench creates starts with this
ALL_FAULTS = ("sigterm", "sigkill", "sigstop", "linkcut", "etcd-restart")
STEADY_WINDOW = 0.3  # s of uninterrupted answers from one host that count as "serving"
POST_OBSERVE = 1.0  # s watched after the faulted host rejoined (flaps, the old host taking the VIP back)
LONG_OUTAGE_SLACK = 1.0  # an outage longer than TTL + this is flagged


class RunError(RuntimeError):
    """A run could not complete (a wait timed out); recorded, then the cluster is reset."""


# =========================================================================== daemon drivers

class DaemonDriver:
    """How the bench runs one failover daemon on the lab hosts: one small subclass per daemon.

    A driver starts and stops the daemon on a host, names its pid and log, says when a restarted or
    reconnected daemon is part of the cluster again, and reports its settings. Faults are injected
    generically (signals to pid(), link cuts, etcd restarts); a driver can override a hook when its
    daemon needs something else (e.g. a different stop signal)."""

    name = "?"
    uses_etcd = True  # False: the etcd-restart fault does not apply

    def __init__(self, lab: Lab, workdir: Path, vips: list[VipDef], *, ttl: int, etcd: EtcdServer | None,
                 clock: C.Clock) -> None:
        self.lab, self.workdir, self.vips, self.ttl, self.clock = lab, workdir, vips, ttl, clock
        self.etcd = etcd

    # life cycle
    def preflight(self) -> None:
        """Raise RunError when the daemon would refuse its configuration (before starting anything)."""

    def start(self, host: Host) -> None: raise NotImplementedError
    def running(self, host: Host) -> bool: raise NotImplementedError
    def pid(self, host: Host) -> int | None: raise NotImplementedError
    def stop_all(self) -> None: raise NotImplementedError

    def start_all(self) -> None:
        for h in self.lab.hosts:
            self.start(h)

    def send_signal(self, host: Host, sig: signal.Signals) -> None:
        pid = self.pid(host)
        if pid is not None:
            os.kill(pid, sig)

    def wait_exit(self, host: Host, timeout: float) -> int | None:
        """The exit code once the daemon on host has exited, None if it still runs after timeout."""
        raise NotImplementedError

    # fault hooks (override when a daemon needs something else)
    def planned_stop(self, host: Host) -> None:
        self.send_signal(host, signal.SIGTERM)

    def crash(self, host: Host) -> None:
        self.send_signal(host, signal.SIGKILL)

    def hang(self, host: Host) -> None:
        self.send_signal(host, signal.SIGSTOP)

    def unhang(self, host: Host) -> None:
        self.send_signal(host, signal.SIGCONT)

    # observation
    def rejoined(self, host: Host, since: float) -> bool:
        """True once the daemon on host, (re)started or reconnected at `since` (monotonic), is a
        working member of the cluster again (e.g. holds a lease)."""
        raise NotImplementedError

    def members(self) -> set[str]:
        """Hosts whose daemon is a live member of the cluster right now (default: running)."""
        return {h.name for h in self.lab.hosts if self.running(h)}

    def log_path(self, host: Host) -> Path: raise NotImplementedError

    def log_excerpt(self, host: Host, t0: float, t1: float, limit: int = 80) -> list[str]:
        return []

    def settings(self) -> dict[str, Any]:
        return {}


class VipdDriver(DaemonDriver):
    """vipd through vipd.lab.cluster.Cluster: `vipd run -c FILE` in each host namespace, as systemd
    runs it (no ExecStopPost: a SIGKILL leaves only the kernel lifetimes to fence)."""

    name = "vipd"
    REJOIN_EVENTS = ("ready", "lease_granted", "etcd_restored")
    EXCERPT_EVENTS = None  # every line

    def __init__(self, lab: Lab, workdir: Path, vips: list[VipDef], *, ttl: int, etcd: EtcdServer | None,
                 clock: C.Clock, key_prefix: str = f"/vipd/{PREFIX}/", timing: dict[str, Any] | None = None) -> None:
        super().__init__(lab, workdir, vips, ttl=ttl, etcd=etcd, clock=clock)
        assert etcd is not None
        self.cluster = Cluster(lab, workdir, vips, endpoints=[etcd.endpoint], lease_ttl=ttl, prefix=key_prefix,
                               timing=timing)
        self.logs = {h.name: C.KeyValueLog(self.cluster.log_path(h), clock) for h in lab.hosts}

    def preflight(self) -> None:
        from vipd import config
        from vipd.errors import ConfigError

        path = self.cluster.write_config(self.lab.hosts[0])
        try:
            config.load(path)
        except ConfigError as e:
            raise RunError(f"vipd rejects the bench configuration ({path}): {e}") from None

    def start(self, host: Host) -> None:
        self.cluster.start(host)

    def running(self, host: Host) -> bool:
        p = self.cluster.procs.get(host.name)
        return p is not None and p.poll() is None

    def pid(self, host: Host) -> int | None:
        p = self.cluster.procs.get(host.name)
        return p.pid if p is not None and p.poll() is None else None

    def wait_exit(self, host: Host, timeout: float) -> int | None:
        p = self.cluster.procs.get(host.name)
        if p is None:
            return None
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop_all(self) -> None:
        self.cluster.stop_all()

    def rejoined(self, host: Host, since: float) -> bool:
        return self.running(host) and bool(self.logs[host.name].select(self.REJOIN_EVENTS, since=since))

    def members(self) -> set[str]:
        """Hosts whose presence key (`<prefix>hosts/<node>`, attached to the host lease) is in etcd:
        their lease is alive. Empty when etcd does not answer."""
        assert self.etcd is not None
        key = self.cluster.prefix + "hosts/"
        end = key[:-1] + chr(ord(key[-1]) + 1)
        b64 = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
        try:
            data = self.etcd.request("/v3/kv/range", {"key": b64(key), "range_end": b64(end)})
        except (OSError, RuntimeError):
            return set()
        names = {base64.b64decode(kv["key"]).decode()[len(key):] for kv in data.get("kvs", [])}
        return {h.name for h in self.lab.hosts if h.name in names and self.running(h)}

    def log_path(self, host: Host) -> Path:
        return self.cluster.log_path(host)

    def log_excerpt(self, host: Host, t0: float, t1: float, limit: int = 80) -> list[str]:
        lines = [ln.raw for ln in self.logs[host.name].select(self.EXCERPT_EVENTS, since=t0, until=t1)]
        return lines if len(lines) <= limit else lines[:limit // 2] + ["..."] + lines[-limit // 2:]

    def granted_ttl(self) -> dict[str, list[int]]:
        """TTLs etcd granted, per host, from `event=lease_granted ... ttl=N` log lines."""
        out: dict[str, list[int]] = {}
        for h in self.lab.hosts:
            for ln in self.logs[h.name].select(["lease_granted"]):
                if ln.fields.get("ttl", "").isdigit():
                    out.setdefault(h.name, []).append(int(ln.fields["ttl"]))
        return out

    def settings(self) -> dict[str, Any]:
        from vipd import __version__, config

        h = self.lab.hosts[0]
        path = self.cluster.config_path(h)
        if not path.exists():
            self.cluster.write_config(h)
        cfg = config.load(path)
        granted = sorted({t for ts in self.granted_ttl().values() for t in ts})
        return {
            "daemon": "vipd", "version": __version__,
            "lease_ttl_asked": cfg.etcd.lease_ttl, "lease_ttl_granted": granted,
            "request_timeout": cfg.etcd.request_timeout,
            "fence_margin": cfg.timing.fence_margin, "keepalives_per_ttl": cfg.timing.keepalives_per_ttl,
            "reconcile_interval": cfg.timing.reconcile_interval, "release_holdoff": cfg.timing.release_holdoff,
            "announce_count": cfg.vips[0].announce_count, "announce_interval": cfg.vips[0].announce_interval,
            "config_example": path.read_text(),
        }


DRIVERS: dict[str, type[DaemonDriver]] = {"vipd": VipdDriver}


# =========================================================================== faults

class Fault:
    """One kind of failure. inject() starts it on `host` (the current owner, or None for faults of the
    infrastructure); recover() undoes it; both may add fields to the run record."""

    name = "?"
    on_owner = True  # injected on the VIP's owner (False: on etcd)
    expect_move = True  # the VIP must end up on another host
    needs_etcd = False

    def inject(self, b: "Bench", host: Host, rec: dict[str, Any]) -> None: raise NotImplementedError
    def recover(self, b: "Bench", host: Host, rec: dict[str, Any]) -> None: raise NotImplementedError


class SigTerm(Fault):
    name = "sigterm"  # planned handover: the daemon releases the VIP and exits

    def inject(self, b, host, rec):  # type: ignore[no-untyped-def]
        b.driver.planned_stop(host)

    def recover(self, b, host, rec):  # type: ignore[no-untyped-def]
        rec["exit_code"] = b.driver.wait_exit(host, 10.0)
        if rec["exit_code"] is None:
            raise RunError(f"{host.name}: daemon still running 10 s after SIGTERM")
        b.driver.start(host)


class SigKill(Fault):
    name = "sigkill"  # crash with no cleanup at all: only the kernel address lifetime fences

    def inject(self, b, host, rec):  # type: ignore[no-untyped-def]
        b.driver.crash(host)

    def recover(self, b, host, rec):  # type: ignore[no-untyped-def]
        rec["exit_code"] = b.driver.wait_exit(host, 5.0)
        b.driver.start(host)


class SigStop(Fault):
    name = "sigstop"  # hung daemon: its sockets stay open, it runs no code; SIGCONT after the move

    def inject(self, b, host, rec):  # type: ignore[no-untyped-def]
        b.driver.hang(host)

    def recover(self, b, host, rec):  # type: ignore[no-untyped-def]
        b.driver.unhang(host)


class LinkCut(Fault):
    name = "linkcut"  # the owner's bridge port goes down (it sees no carrier), restored after the move

    def inject(self, b, host, rec):  # type: ignore[no-untyped-def]
        b.lab.cut(host)

    def recover(self, b, host, rec):  # type: ignore[no-untyped-def]
        b.lab.restore(host)


class EtcdRestart(Fault):
    name = "etcd-restart"  # SIGKILL etcd, (optionally wait), start it again on the same data
    on_owner = False
    expect_move = False
    needs_etcd = True

    def inject(self, b, host, rec):  # type: ignore[no-untyped-def]
        t0 = time.monotonic()
        b.etcd.kill()
        rec["etcd_killed_ms"] = (time.monotonic() - t0) * 1e3
        if b.args.etcd_down > 0:
            time.sleep(b.args.etcd_down)
        b.etcd.start(timeout=15.0)
        rec["etcd_unavailable_ms"] = (time.monotonic() - t0) * 1e3  # kill .. /health answers again

    def recover(self, b, host, rec):  # type: ignore[no-untyped-def]
        pass


FAULTS: dict[str, type[Fault]] = {f.name: f for f in (SigTerm, SigKill, SigStop, LinkCut, EtcdRestart)}


# =========================================================================== the bench

def steady(probe: Probe, host: str, window: float = STEADY_WINDOW) -> bool:
    """Every probe of the last `window` seconds answered in time, the last ones by `host`."""
    now = time.monotonic()
    if probe.outages(since=now - window, min_gap=max(0.05, 3 * probe.interval)):
        return False
    r = probe.responders()
    return bool(r) and r[-1][1] == host and r[-1][0] <= now - window


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, clock: C.Clock) -> None:
        self.args = args
        self.workdir = workdir
        self.clock = clock
        self.rng = random.Random(args.seed)
        self.lab: Lab = None  # type: ignore[assignment]
        self.etcd: EtcdServer = None  # type: ignore[assignment]
        self.driver: DaemonDriver = None  # type: ignore[assignment]
        self.monitor: AddressMonitor = None  # type: ignore[assignment]
        self.vip: ipaddress.IPv4Address | ipaddress.IPv6Address = None  # type: ignore[assignment]
        self.anomalies: list[str] = []
        self.ttl_granted: float = float(args.ttl)
        self.timing: dict[str, Any] = {}  # vipd [timing] overrides (empty: the lab Cluster's)

    # ------------------------------------------------------------------ helpers

    def note(self, msg: str) -> None:
        self.anomalies.append(msg)
        print(f"  !! {msg}", flush=True)

    def holders(self) -> frozenset[str]:
        return self.monitor.holders_now(self.vip)

    def wait_single_owner(self, timeout: float, exclude: set[str] = frozenset()) -> str:  # type: ignore[assignment]
        def one() -> str | None:
            hs = self.holders()
            if len(hs) == 1:
                h = next(iter(hs))
                return h if h not in exclude else None
            return None

        got = C.wait_until(one, timeout)
        if got is None:
            raise RunError(f"no single owner (excluding {sorted(exclude)}) within {timeout:.0f} s: "
                           f"holders {sorted(self.holders())}")
        return got

    def wait_rejoined(self, hosts: list[Host], since: float, timeout: float) -> dict[str, float | None]:
        """ms from `since` until each host's daemon rejoined (None: not within timeout)."""
        out: dict[str, float | None] = {}
        deadline = time.monotonic() + timeout
        for h in hosts:
            ok = C.wait_until(lambda: self.driver.rejoined(h, since), max(0.0, deadline - time.monotonic()), 0.05)
            out[h.name] = (time.monotonic() - since) * 1e3 if ok else None
        return out

    def full_reset(self) -> str:
        """After a failed run: etcd up, every link up, every daemon running and continued; one owner."""
        print("  resetting the cluster", flush=True)
        if self.etcd.pid is None:
            self.etcd.start(timeout=15.0)
        for h in self.lab.hosts:
            self.lab.restore(h)
            if self.driver.running(h):
                self.driver.unhang(h)
            else:
                self.driver.start(h)
        everyone = {h.name for h in self.lab.hosts}
        if C.wait_until(lambda: self.driver.members() == everyone, 20.0, 0.1) is None:
            raise RunError(f"reset: members {sorted(self.driver.members())} after 20 s")
        return self.wait_single_owner(20.0)

    # ------------------------------------------------------------------ one run

    def run_once(self, fault: Fault, index: int) -> dict[str, Any]:
        """One fault, measured. A RunError (a wait that timed out) is recorded in rec["error"] with
        whatever was measured up to then; the caller then resets the cluster."""
        lab = self.lab
        rec: dict[str, Any] = {"fault": fault.name, "run": index}
        for h in lab.hosts:  # every daemon must be up before a run starts
            if not self.driver.running(h):
                rec["error"] = f"{h.name}: daemon not running before the run"
                return rec
        try:
            old_name = self.wait_single_owner(15.0)
        except RunError as e:
            rec["error"] = str(e)
            return rec
        rec["old_owner"] = old_name
        probe = Probe(lab, self.vip, self.args.interval,
                      log=self.workdir / "probe" / f"{fault.name}-{index}.log", max_duration=120.0)
        marks: dict[str, float] = {"start": time.monotonic()}
        probe.start()
        try:
            self._drive(fault, index, lab.host(old_name), probe, rec, marks)
        except RunError as e:
            rec["error"] = str(e)
        finally:
            probe.stop()
            marks.setdefault("end", time.monotonic())
            rec["probe"] = {"sent": probe.sent(), "answered": probe.answered(), "late": probe.late,
                            "max_send_gap_ms": round(probe.max_send_gap * 1e3, 2)}
            if "fault" in marks:
                self._measure(rec, probe, old_name, marks["start"], marks["fault"], marks.get("recovered"),
                              marks["end"])
                rec["logs"] = {h.name: self.driver.log_excerpt(h, marks["fault"] - 0.5, marks["end"])
                               for h in lab.hosts}
        return rec

    def _drive(self, fault: Fault, index: int, old: Host, probe: Probe, rec: dict[str, Any],
               marks: dict[str, float]) -> None:
        lab, ttl, old_name = self.lab, self.ttl_granted, old.name
        if not C.wait_until(lambda: steady(probe, old_name), 10.0):
            raise RunError(f"probe not answered steadily by {old_name} within 10 s: {probe.summary()}")
        if self.holders() != {old_name}:
            raise RunError(f"owner changed before the fault: {sorted(self.holders())}")
        delay = self.rng.uniform(0.0, ttl)  # hit a random phase of the keepalive cycle
        rec["delay_s"] = round(delay, 4)
        time.sleep(delay)
        t_fault = marks["fault"] = time.monotonic()
        fault.inject(self, old, rec)
        rec["inject_ms"] = round((time.monotonic() - t_fault) * 1e3, 2)

        if not fault.on_owner:
            # Service counts as resumed only once every daemon provably kept (or re-made) its lease
            # past one TTL after etcd's return: a daemon that failed to reconnect would have lost its
            # lease by then (etcd extends every lease by its TTL when it comes back).
            time.sleep(ttl + 1.0)
            everyone = {h.name for h in lab.hosts}
            got = C.wait_until(lambda: self.driver.members() == everyone, 10.0, 0.1)
            rec["members_ms"] = round((time.monotonic() - t_fault) * 1e3, 1)
            if isinstance(self.driver, VipdDriver):
                rec["noticed_etcd_loss"] = {h.name: [ln.event for ln in self.driver.logs[h.name].select(
                    ("keepalive_failed", "watch_failed", "lease_deadline_passed", "lease_lost", "lease_granted",
                     "etcd_restored"), since=t_fault)] for h in lab.hosts}
            if got is None:
                raise RunError(f"members {sorted(self.driver.members())} (not all hosts) "
                               f"{ttl + 11:.0f} s after etcd came back")

        exclude = {old_name} if fault.expect_move else set()
        deadline = time.monotonic() + 3 * ttl + 10.0

        def serving() -> str | None:
            hs = self.holders()
            if len(hs) == 1:
                h = next(iter(hs))
                if h not in exclude and steady(probe, h):
                    return h
            return None

        new_name = C.wait_until(serving, max(0.0, deadline - time.monotonic()))
        if new_name is None:
            raise RunError(f"no host serving steadily {deadline - t_fault:.0f} s after the fault: "
                           f"holders {sorted(self.holders())}, {probe.summary()}")
        marks["recovered"] = time.monotonic()
        rec["new_owner"] = new_name
        if fault.on_owner:  # the faulted host's copy must go away by itself (bounded wait)
            C.wait_until(lambda: old_name not in self.holders(), max(0.0, t_fault + ttl + 3.0 - time.monotonic()))
        rec["old_holds_at_recovery"] = old_name in self.holders()

        t_recover = marks["recover"] = time.monotonic()
        fault.recover(self, old, rec)
        rec["recover_ms"] = round((time.monotonic() - t_recover) * 1e3, 1)
        rec["recover_at_ms"] = round((t_recover - t_fault) * 1e3, 1)
        if fault.on_owner:
            rej = self.wait_rejoined([old], t_recover, 15.0)
            rec["old_rejoined_ms"] = None if rej[old_name] is None else round(rej[old_name], 1)
            if rej[old_name] is None:
                self.note(f"{fault.name}#{index}: {old_name} did not rejoin within 15 s after recovery")
        time.sleep(POST_OBSERVE)
        marks["end"] = time.monotonic()

    def _measure(self, rec: dict[str, Any], probe: Probe, old: str, t_start: float, t_fault: float,
                 t_recovered: float | None, t_end: float) -> None:
        rel = lambda t: round((t - t_fault) * 1e3, 1)  # noqa: E731  ms after the fault
        horizon = t_recovered if t_recovered is not None else t_end
        # min_gap 1.5 intervals: a single lost probe counts (as ~one interval), unlike outages()' default
        outs = [o for o in probe.outages(min_gap=1.5 * probe.interval) if o.end > t_fault and o.start < t_end]
        main = [o for o in outs if o.start < horizon]
        later = [o for o in outs if o.start >= horizon]
        rec["outage_ms"] = round(sum(o.ms for o in main), 1)
        rec["outages"] = [{"start_ms": rel(o.start), "end_ms": rel(o.end), "ms": round(o.ms, 1), "lost": o.lost,
                           "before": o.before_host, "after": o.after_host} for o in main]
        rec["later_outages"] = [{"start_ms": rel(o.start), "ms": round(o.ms, 1), "before": o.before_host,
                                 "after": o.after_host} for o in later]
        rec["recovered_ms"] = rel(t_recovered) if t_recovered is not None else None
        rec["responders"] = [(rel(t), h) for t, h in probe.responders() if t >= t_fault - 0.05]

        dual = 0.0
        windows = []
        for ip, s, e, hs in self.monitor.dual_windows():
            lo, hi = max(s, t_start), min(e, t_end)
            if hi > lo:
                dual += hi - lo
                windows.append({"start_ms": rel(lo), "ms": round((hi - lo) * 1e3, 3), "holders": sorted(hs)})
        rec["dual_ms"] = round(dual * 1e3, 3)
        rec["dual_windows"] = windows

        line = self.monitor.holders_timeline(self.vip)
        assert isinstance(line, list)
        at_fault = frozenset()
        for t, hs in line:
            if t <= t_fault:
                at_fault = hs
        rec["holders_timeline"] = [(rel(t), sorted(hs)) for t, hs in line if t_fault < t <= t_end]
        gone = acquired = None
        if old in at_fault:
            gone = next((t for t, hs in line if t > t_fault and old not in hs), None)
        acquired = next((t for t, hs in line if t > t_fault and hs - {old}), None)
        rec["old_gone_ms"] = rel(gone) if gone is not None else None
        rec["new_acquired_ms"] = rel(acquired) if acquired is not None else None
        final = self.monitor.holders_now(self.vip)
        rec["holders_at_end"] = sorted(final)
        rec["old_held_after"] = (old in final) if rec.get("new_owner") not in (None, old) else None
        rec["t_fault_wall"] = round(self.clock.to_wall(t_fault), 3)

    # ------------------------------------------------------------------ the checks every run gets

    def judge(self, fault: Fault, rec: dict[str, Any]) -> None:
        tag = f"{fault.name}#{rec['run']}"
        limit = (self.ttl_granted + LONG_OUTAGE_SLACK) * 1e3
        if rec.get("dual_ms"):
            self.note(f"{tag}: DUAL OWNERSHIP {rec['dual_ms']} ms: {rec['dual_windows']}")
        if rec.get("outage_ms", 0) > limit:
            self.note(f"{tag}: outage {rec['outage_ms']:.0f} ms > TTL + {LONG_OUTAGE_SLACK:.0f} s")
        if rec.get("old_held_after"):
            self.note(f"{tag}: old owner {rec['old_owner']} still holds the VIP at the end")
        if rec.get("later_outages"):
            self.note(f"{tag}: outage after recovery: {rec['later_outages']}")
        if fault.name == "sigterm" and rec.get("exit_code") not in (0, None):
            self.note(f"{tag}: exit code {rec['exit_code']} after SIGTERM")
        if fault.on_owner and rec.get("old_gone_ms") is None and "error" not in rec:
            self.note(f"{tag}: the old owner's address never went away")
        if fault.name in ("sigkill", "sigstop", "linkcut") and rec.get("old_gone_ms") is not None \
                and rec["old_gone_ms"] > self.ttl_granted * 1e3:
            self.note(f"{tag}: the old owner kept the VIP {rec['old_gone_ms']:.0f} ms after the fault (> TTL)")
        if len(rec.get("holders_at_end", [1])) != 1:
            self.note(f"{tag}: {len(rec['holders_at_end'])} holders at the end: {rec['holders_at_end']}")


# =========================================================================== footprint

def footprint(b: Bench, n_vips: int, settle: float, seconds: float) -> dict[str, Any]:
    """One daemon alone (owner of n_vips IPv4 VIPs) after it settled: RSS and CPU over `seconds`."""
    lab = b.lab
    vips = [VipDef(f"fp{i}", str(lab.vip4(50 + i))) for i in range(n_vips)]
    drv = DRIVERS[b.args.daemon](lab, b.workdir / f"footprint-{n_vips}", vips, ttl=b.args.ttl,
                                 etcd=b.etcd, clock=b.clock,
                                 **({"key_prefix": f"/vipd/{PREFIX}-footprint-{n_vips}/", "timing": b.timing}
                                    if b.args.daemon == "vipd" else {}))
    host = lab.hosts[0]
    drv.preflight()
    try:
        t0 = time.monotonic()
        drv.start(host)
        ips = [ipaddress.ip_interface(v.address).ip for v in vips]
        ok = C.wait_until(lambda: all(lab.holders(ip, [host]) for ip in ips), 30.0, 0.1)
        if not ok:
            raise RunError(f"footprint: {host.name} did not take all {n_vips} VIPs within 30 s")
        owned_after = time.monotonic() - t0
        time.sleep(settle)
        pid = drv.pid(host)
        if pid is None:
            raise RunError("footprint: daemon exited")
        pid = C.main_pid(pid)
        c0, w0 = C.proc_cpu_seconds(pid), time.monotonic()
        time.sleep(seconds)
        c1, w1 = C.proc_cpu_seconds(pid), time.monotonic()
        status = C.proc_status(pid)
        still = all(lab.holders(ip, [host]) for ip in ips)
        return {"daemon": drv.name, "vips": n_vips, "host": host.name, "pid": pid, "cmdline": C.proc_cmdline(pid),
                "all_owned_after_s": round(owned_after, 3), "settle_s": settle, "measured_s": round(w1 - w0, 3),
                "cpu_seconds": round(c1 - c0, 4), "cpu_percent": round((c1 - c0) / (w1 - w0) * 100, 3),
                "clk_tck": C.CLK_TCK, "vmrss_kib": status.get("VmRSS"), "vmhwm_kib": status.get("VmHWM"),
                "rss_anon_kib": status.get("RssAnon"), "rss_file_kib": status.get("RssFile"),
                "threads": status.get("Threads"), "still_owner_of_all": still}
    finally:
        drv.stop_all()


# =========================================================================== main

def summarise(fault: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    outage = C.describe([r["outage_ms"] for r in ok if "outage_ms" in r])
    gone = C.describe([r["old_gone_ms"] for r in ok if r.get("old_gone_ms") is not None and r.get("old_owner")
                       and fault != "etcd-restart"])
    return {
        "runs": len(runs), "ok": len(ok), "errors": [r["error"] for r in runs if "error" in r],
        "outage_ms": outage, "dual_ms_total": round(sum(r.get("dual_ms", 0.0) for r in runs), 3),
        "old_held_after": sum(1 for r in runs if r.get("old_held_after")),
        "old_gone_ms": gone,
        "later_outages": sum(len(r.get("later_outages", [])) for r in runs),
        "etcd_unavailable_ms": C.describe([r["etcd_unavailable_ms"] for r in runs if "etcd_unavailable_ms" in r]),
        "vip_dropped": sum(1 for r in ok if r.get("outage_ms", 0) > 0) if fault == "etcd-restart" else None,
        # etcd-restart: when the owner's address lapsed (kernel lifetime ran out while etcd was away)
        "owner_vip_lapsed_ms": C.describe([r["old_gone_ms"] for r in ok if r.get("old_gone_ms") is not None])
        if fault == "etcd-restart" else None,
    }


def print_report(b: Bench, results: dict[str, Any]) -> None:
    rows = []
    for fault, s in results["faults"].items():
        o = s["summary"]["outage_ms"]
        g = s["summary"]["old_gone_ms"]
        rows.append([fault, s["summary"]["runs"], s["summary"]["ok"],
                     f"{C.fmt_ms(o['min'])} / {C.fmt_ms(o['median'])} / {C.fmt_ms(o['max'])}",
                     C.fmt_ms(s["summary"]["dual_ms_total"], 1),
                     f"{s['summary']['old_held_after']}/{s['summary']['runs']}" if fault != "etcd-restart" else "n/a",
                     C.fmt_ms(g["median"]) if g["n"] else "-"])
    st = results["settings"]
    print()
    print(f"{results['daemon']} failover, lease TTL asked {st.get('lease_ttl_asked')} s, granted "
          f"{st.get('lease_ttl_granted')} s, fence_margin {st.get('fence_margin')} s, "
          f"keepalives_per_ttl {st.get('keepalives_per_ttl')}, probe every {results['probe_interval_ms']:g} ms")
    print(C.table(["fault", "runs", "ok", "outage ms min/med/max", "dual ms", "old held after",
                   "old gone ms (med)"], rows, right=(1, 2, 4, 6)))
    et = results["faults"].get("etcd-restart", {}).get("summary")
    if et and et["etcd_unavailable_ms"]["n"]:
        u = et["etcd_unavailable_ms"]
        lapsed = et["owner_vip_lapsed_ms"]
        print(f"etcd-restart: etcd unavailable {C.fmt_ms(u['min'])}/{C.fmt_ms(u['median'])}/{C.fmt_ms(u['max'])} ms "
              f"(kill .. healthy); VIP dropped in {et['vip_dropped']}/{et['ok']} runs"
              + (f", the owner's address lapsed {C.fmt_ms(lapsed['min'])}..{C.fmt_ms(lapsed['max'])} ms after the kill"
                 if lapsed and lapsed["n"] else ""))
    for fp in results.get("footprint", []):
        if "error" not in fp:
            print(f"footprint: one {fp['daemon']} owning {fp['vips']} VIPs, idle: VmRSS {fp['vmrss_kib'] / 1024:.1f} MiB, "
                  f"CPU {fp['cpu_percent']:.2f} % of one core over {fp['measured_s']:.0f} s, {fp['threads']} threads")
        else:
            print(f"footprint: failed: {fp['error']}")
    print(f"dual ownership over the whole bench: {results['dual_ms_total']:.1f} ms "
          f"(monitor: {results['monitor'].get('samples')} samples, max gap {results['monitor'].get('max_gap', 0) * 1e3:.1f} ms)")
    if b.anomalies:
        print(f"anomalies ({len(b.anomalies)}):")
        for a in b.anomalies:
            print(f"  - {a}")
    else:
        print("anomalies: none")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="runs per fault (default 5)")
    p.add_argument("--faults", default=",".join(ALL_FAULTS), help=f"comma-separated, from {', '.join(ALL_FAULTS)}")
    p.add_argument("--json", type=Path, help="where to write the results (default bench/out/failover-<timestamp>.json)")
    p.add_argument("--daemon", default="vipd", choices=sorted(DRIVERS))
    p.add_argument("--ttl", type=int, default=3,
                   help="lease TTL asked of etcd, seconds (default 3: the smallest vipd accepts with its "
                        "minimum fence_margin of 1.25 s)")
    p.add_argument("--timing", choices=("defaults", "lab"), default="defaults",
                   help="vipd [timing]: the shipped defaults, or the lab tests' (fence_margin 0.5, reconcile 0.5)")
    p.add_argument("--interval", type=float, default=0.01, help="probe interval, seconds (default 0.01)")
    p.add_argument("--family", type=int, choices=(4, 6), default=4, help="probe an IPv4 or an IPv6 VIP")
    p.add_argument("--etcd-down", type=float, default=0.0, help="etcd-restart: seconds between kill and start")
    p.add_argument("--seed", type=int, help="random seed for the fault moments (default: random, recorded)")
    p.add_argument("--no-footprint", action="store_true", help="skip the RSS/CPU measurement")
    p.add_argument("--footprint-vips", default="10",
                   help="VIPs the lone daemon owns; a comma-separated list measures each (e.g. 1,10)")
    p.add_argument("--footprint-seconds", type=float, default=10.0)
    a = p.parse_args(argv)
    faults = [f.strip() for f in a.faults.split(",") if f.strip()]
    bad = [f for f in faults if f not in FAULTS]
    if bad or not faults:
        p.error(f"unknown fault(s) {bad}; choose from {', '.join(ALL_FAULTS)}")
    if a.runs < 1 or a.runs > 100:
        p.error("--runs must be 1..100")
    if a.ttl < 1:
        p.error("--ttl must be at least 1")
    a.fault_list = faults
    try:
        a.footprint_counts = [int(x) for x in a.footprint_vips.split(",") if x.strip()]
    except ValueError:
        p.error("--footprint-vips: comma-separated integers")
    if not all(1 <= n <= 50 for n in a.footprint_counts):
        p.error("--footprint-vips: 1..50 each")
    if a.seed is None:
        a.seed = secrets.randbits(32)
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/failover.py needs root (network namespaces)", file=sys.stderr)
        return 2
    C.install_signal_handlers()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = C.ROOT / "bench" / "out"
    workdir = out_dir / f"failover-{stamp}"
    json_path = args.json or out_dir / f"failover-{stamp}.json"
    workdir.mkdir(parents=True, exist_ok=True)
    clock = C.Clock()
    b = Bench(args, workdir, clock)
    if args.timing == "defaults":
        from vipd.config import TimingConfig
        b.timing = asdict(TimingConfig())
    results: dict[str, Any] = {
        "bench": "failover", "daemon": args.daemon, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "completed": False, "argv": sys.argv, "seed": args.seed, "workdir": str(workdir),
        "environment": C.environment(), "probe_interval_ms": args.interval * 1e3, "faults": {},
    }
    t_begin = time.monotonic()
    rc = 1
    left = topology.purge(PREFIX)  # namespaces an earlier, killed bench left behind (only our names)
    if left:
        print(f"removed leftovers of an earlier bench: {left}")
    try:
        with Lab(PREFIX, n_hosts=3) as lab:
            b.lab = lab
            b.etcd = EtcdServer(workdir / "etcd", host=str(lab.etcd_ip), client_port=2379, peer_port=2380,
                                netns=lab.etcd_ns, name=f"{PREFIX}etcd")
            b.etcd.start(timeout=15.0)
            try:
                results["etcd"] = {"flags": b.etcd.args(), "version": C.tool_version(["etcd", "--version"]),
                                   "endpoint": b.etcd.endpoint, "netns": lab.etcd_ns}
                results["footprint"] = []
                for n in ([] if args.no_footprint else args.footprint_counts):
                    print(f"footprint: one {args.daemon} owning {n} VIPs ...", flush=True)
                    try:
                        results["footprint"].append(footprint(b, n, 3.0, args.footprint_seconds))
                    except RunError as e:
                        results["footprint"].append({"vips": n, "error": str(e)})
                        b.note(str(e))
                rc = run_faults(b, results)
            finally:
                b.etcd.stop()
    except KeyboardInterrupt as e:
        print(f"\ninterrupted ({e or 'Ctrl-C'}): tearing down", file=sys.stderr)
        results["interrupted"] = str(e) or "SIGINT"
        rc = 130
    except Exception:
        traceback.print_exc()
        results["error"] = traceback.format_exc()
        rc = 1
    finally:
        results["duration_s"] = round(time.monotonic() - t_begin, 1)
        changed = C.changed_files(results["environment"]["vipd_source_files"], C.source_files())
        results["vipd_sources_changed_during_bench"] = changed
        if changed:
            b.note(f"vipd sources changed while the bench ran (daemons restarted later loaded them): "
                   f"{', '.join(changed)}")
        results["anomalies"] = b.anomalies
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
        if results.get("faults") and "settings" in results:
            print_report(b, results)
        print(f"\nJSON: {json_path}\nlogs: {workdir}")
        leftovers = [n for n in topology.netns.list_ns(PREFIX)]
        if leftovers:
            print(f"WARNING: namespaces left behind: {leftovers}", file=sys.stderr)
    return rc


def run_faults(b: Bench, results: dict[str, Any]) -> int:
    args, lab = b.args, b.lab
    vip_if = lab.vip4(0) if args.family == 4 else lab.vip6(0)
    b.vip = vip_if.ip
    b.driver = DRIVERS[args.daemon](lab, b.workdir / "hosts", [VipDef("bench", str(vip_if))], ttl=args.ttl,
                                    etcd=b.etcd, clock=b.clock,
                                    **({"key_prefix": f"/vipd/{PREFIX}/", "timing": b.timing}
                                       if args.daemon == "vipd" else {}))
    faults = [FAULTS[f]() for f in args.fault_list]
    b.driver.preflight()
    b.monitor = AddressMonitor(lab, [b.vip])
    b.monitor.start()
    try:
        t0 = time.monotonic()
        b.driver.start_all()
        b.wait_rejoined(lab.hosts, t0 - 1.0, 20.0)
        first = b.wait_single_owner(20.0)
        print(f"cluster up: {first} owns {b.vip} after {time.monotonic() - t0:.2f} s", flush=True)
        if isinstance(b.driver, VipdDriver):
            granted = sorted({t for ts in b.driver.granted_ttl().values() for t in ts})
            if granted:
                b.ttl_granted = float(max(granted))
        results["settings"] = {**b.driver.settings(), "probe_interval_ms": args.interval * 1e3,
                               "steady_window_s": STEADY_WINDOW, "post_observe_s": POST_OBSERVE,
                               "fault_delay": f"uniform 0..{b.ttl_granted:g} s", "vip": str(vip_if),
                               "hosts": [h.name for h in lab.hosts], "etcd_down_s": args.etcd_down}
        for fault in faults:
            if fault.needs_etcd and not b.driver.uses_etcd:
                continue
            runs: list[dict[str, Any]] = []
            results["faults"][fault.name] = {"runs": runs}
            for i in range(1, args.runs + 1):
                t_run = time.monotonic()
                rec = b.run_once(fault, i)
                rec["run_s"] = round(time.monotonic() - t_run, 2)
                runs.append(rec)
                b.judge(fault, rec)
                if "error" in rec:
                    b.note(f"{fault.name}#{i}: {rec['error']}")
                    b.full_reset()
                    continue
                print(f"{fault.name:>12} #{i}: {rec['old_owner']} -> {rec.get('new_owner')}  "
                      f"delay {rec['delay_s']:.2f} s  outage {rec['outage_ms']:.0f} ms  dual {rec['dual_ms']:.1f} ms  "
                      f"old gone {C.fmt_ms(rec.get('old_gone_ms'))} ms"
                      + (f"  etcd down {rec['etcd_unavailable_ms']:.0f} ms" if "etcd_unavailable_ms" in rec else ""),
                      flush=True)
            results["faults"][fault.name]["summary"] = summarise(fault.name, runs)
        # granted TTLs again: every (re)start granted one
        results["settings"]["lease_ttl_granted"] = b.driver.settings().get("lease_ttl_granted")
        results["completed"] = True
        return 0
    finally:
        for name, f in results["faults"].items():
            f.setdefault("summary", summarise(name, f["runs"]))
        b.driver.stop_all()
        b.monitor.stop(raise_error=False)
        dual = b.monitor.dual_windows()
        results["dual_ms_total"] = round(sum(e - s for _, s, e, _ in dual) * 1e3, 3)
        results["dual_windows"] = [{"ip": str(ip), "t_wall": round(b.clock.to_wall(s), 3), "ms": round((e - s) * 1e3, 3),
                                    "holders": sorted(hs)} for ip, s, e, hs in dual]
        results["monitor"] = b.monitor.stats()


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Failover bench: vipd against keepalived (defaults and tuned) and vip-manager. For each daemon and
fault: how long a client loses the VIP, how long two hosts hold it at once, and whether the old host
still holds it afterwards; per daemon the idle footprint with 10 VIPs; for vipd the time to claim
and announce 1, 100 and 1,000 VIPs. Runs on demand as root, never as a test:

    .venv/bin/python bench/failover.py [--daemons vipd,vipd-tuned,keepalived,keepalived-tuned,vip-manager]
                                       [--faults sigterm,sigkill,sigstop,linkcut,etcd-restart]
                                       [--runs 5] [--json PATH] [--seed N]

Per daemon a fresh namespace lab (prefix `vtf`: bridge, etcd, hosts h1..h3, client), the daemon on
every host (bench/_drivers.py), a client probe every 10 ms that names the answering host by its MAC,
and an address monitor sampling every host's addresses every 10 ms. Each run: wait for one owner
answering steadily, sleep a uniform random 0..3 s (so the fault hits every phase of the daemons'
timers: vipd's keepalives and TTL, VRRP adverts, vip-manager's poll), inject the fault on the owner,
measure, undo the fault, wait until the faulted host is back. Output: a table on stdout, the JSON,
and a PNG chart (bench/_chart.py). See bench/README.md.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (also puts the vipd under test on sys.path)
from _drivers import (DAEMONS, ETCD_ARGS, LEASE_TTL, USES_ETCD, DaemonDriver,  # noqa: E402
                      RunError, VipdDriver, make_driver)

from vipd.lab import topology  # noqa: E402
from vipd.lab.cluster import VipDef  # noqa: E402
from vipd.lab.etcd import EtcdServer  # noqa: E402
from vipd.lab.monitor import AddressMonitor  # noqa: E402
from vipd.lab.probe import Probe  # noqa: E402
from vipd.lab.topology import Host, Lab  # noqa: E402

PREFIX = "vtf"  # every namespace, link and etcd key prefix the bench creates starts with this
ALL_FAULTS = ("sigterm", "sigkill", "sigstop", "linkcut", "etcd-restart")
STEADY_WINDOW = 0.3  # s of uninterrupted answers from one host that count as "serving"
POST_OBSERVE = 1.0  # s watched after the faulted host rejoined (flaps, the old host taking the VIP back)
PHASE_WINDOW = float(LEASE_TTL)  # faults land uniformly in 0..3 s after steady service: every timer's phase
LEFTOVER_WAIT = LEASE_TTL + 3.0  # s after the fault the old owner's copy gets to go away by itself


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
        rec["exit_codes"] = b.driver.exit_codes(host)
        if rec["exit_code"] is None:
            raise RunError(f"{host.name}: daemon still running 10 s after SIGTERM")
        b.driver.start(host)


class SigKill(Fault):
    name = "sigkill"  # crash with no cleanup at all

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


# =========================================================================== one daemon's bench

def steady(probe: Probe, host: str, window: float = STEADY_WINDOW) -> bool:
    """Every probe of the last `window` seconds answered in time, the last ones by `host`."""
    now = time.monotonic()
    if probe.outages(since=now - window, min_gap=max(0.05, 3 * probe.interval)):
        return False
    r = probe.responders()
    return bool(r) and r[-1][1] == host and r[-1][0] <= now - window


class Bench:
    def __init__(self, args: argparse.Namespace, daemon: str, lab: Lab, etcd: EtcdServer | None, workdir: Path,
                 clock: C.Clock) -> None:
        self.args = args
        self.daemon = daemon
        self.lab = lab
        self.etcd = etcd
        self.workdir = workdir
        self.clock = clock
        self.rng = random.Random(f"{args.seed}-{daemon}")  # a subset of daemons replays the same moments
        self.driver: DaemonDriver = None  # type: ignore[assignment]
        self.monitor: AddressMonitor = None  # type: ignore[assignment]
        self.vip: ipaddress.IPv4Address | ipaddress.IPv6Address = None  # type: ignore[assignment]
        self.anomalies: list[str] = []
        self.timing: dict[str, Any] = {}
        if args.timing == "defaults":
            from vipd.config import TimingConfig
            self.timing = asdict(TimingConfig())

    def new_driver(self, workdir: Path, vips: list[VipDef], tag: str = "", layout: str = "per-vip") -> DaemonDriver:
        return make_driver(self.daemon, self.lab, workdir, vips, etcd=self.etcd, clock=self.clock, tag=tag,
                           timing=self.timing, layout=layout)

    # ------------------------------------------------------------------ helpers

    def note(self, msg: str) -> None:
        self.anomalies.append(msg)
        print(f"  !! {self.daemon}: {msg}", flush=True)

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
        if self.etcd is not None and self.etcd.pid is None:
            self.etcd.start(timeout=15.0)
        for h in self.lab.hosts:
            self.lab.restore(h)
            if self.driver.running(h):
                self.driver.unhang(h)
            else:  # some process of the daemon died: kill the rest, start it all again
                for p in self.driver.host_procs(h):
                    if p.alive:
                        os.killpg(p.popen.pid, signal.SIGKILL)
                self.driver.wait_exit(h, 5.0)
                self.driver.start(h)
        everyone = {h.name for h in self.lab.hosts}
        if C.wait_until(lambda: self.driver.members() == everyone, 20.0, 0.1) is None:
            raise RunError(f"reset: members {sorted(self.driver.members())} after 20 s")
        return self.wait_single_owner(20.0)

    # ------------------------------------------------------------------ the failover runs

    def run_faults(self, res: dict[str, Any]) -> None:
        args, lab = self.args, self.lab
        vip_if = lab.vip4(0) if args.family == 4 else lab.vip6(0)
        self.vip = vip_if.ip
        self.driver = self.new_driver(self.workdir / "hosts", [VipDef("bench", str(vip_if))])
        faults = [FAULTS[f]() for f in args.fault_list]
        self.driver.preflight()
        self.monitor = AddressMonitor(lab, [self.vip])
        self.monitor.start()
        try:
            t0 = time.monotonic()
            self.driver.start_all()
            self.wait_rejoined(lab.hosts, t0 - 1.0, 20.0)
            first = self.wait_single_owner(20.0)
            print(f"[{self.daemon}] cluster up: {first} owns {self.vip} after {time.monotonic() - t0:.2f} s", flush=True)
            res["settings"] = {**self.driver.settings(), "probe_interval_ms": args.interval * 1e3,
                               "steady_window_s": STEADY_WINDOW, "post_observe_s": POST_OBSERVE,
                               "fault_delay": f"uniform 0..{PHASE_WINDOW:g} s", "leftover_wait_s": LEFTOVER_WAIT,
                               "vip": str(vip_if), "hosts": [h.name for h in lab.hosts],
                               "etcd_down_s": args.etcd_down}
            for fault in faults:
                if fault.needs_etcd and not USES_ETCD[self.daemon]:
                    continue
                runs: list[dict[str, Any]] = []
                res["faults"][fault.name] = {"runs": runs}
                for i in range(1, args.runs + 1):
                    t_run = time.monotonic()
                    rec = self.run_once(fault, i)
                    rec["run_s"] = round(time.monotonic() - t_run, 2)
                    runs.append(rec)
                    self.judge(fault, rec)
                    if "error" in rec:
                        self.note(f"{fault.name}#{i}: {rec['error']}")
                        self.full_reset()
                        continue
                    print(f"[{self.daemon}] {fault.name:>12} #{i}: {rec['old_owner']} -> {rec.get('new_owner')}  "
                          f"delay {rec['delay_s']:.2f} s  outage {rec['outage_ms']:.0f} ms  dual {rec['dual_ms']:.0f} ms"
                          f"{' (open at undo)' if rec.get('dual_open_at_undo') else ''}  "
                          f"old gone {C.fmt_ms(rec.get('old_gone_ms'))} ms"
                          + (f"  etcd down {rec['etcd_unavailable_ms']:.0f} ms" if "etcd_unavailable_ms" in rec else ""),
                          flush=True)
                res["faults"][fault.name]["summary"] = summarise(fault.name, runs)
            if isinstance(self.driver, VipdDriver):
                res["settings"]["lease_ttl_granted"] = self.driver.granted_ttl()
            res["completed"] = True
        finally:
            for name, f in res["faults"].items():
                f.setdefault("summary", summarise(name, f["runs"]))
            self.driver.stop_all()
            self.monitor.stop(raise_error=False)
            dual = self.monitor.dual_windows()
            res["dual_ms_total"] = round(sum(e - s for _, s, e, _ in dual) * 1e3, 3)
            res["dual_windows"] = [{"ip": str(ip), "t_wall": round(self.clock.to_wall(s), 3),
                                    "ms": round((e - s) * 1e3, 3), "holders": sorted(hs)} for ip, s, e, hs in dual]
            res["monitor"] = self.monitor.stats()

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
                self._measure(rec, probe, old_name, marks)
                rec["logs"] = {h.name: self.driver.log_excerpt(h, marks["fault"] - 0.5, marks["end"])
                               for h in lab.hosts}
        return rec

    def _drive(self, fault: Fault, index: int, old: Host, probe: Probe, rec: dict[str, Any],
               marks: dict[str, float]) -> None:
        lab, old_name = self.lab, old.name
        if not C.wait_until(lambda: steady(probe, old_name), 10.0):
            raise RunError(f"probe not answered steadily by {old_name} within 10 s: {probe.summary()}")
        if self.holders() != {old_name}:
            raise RunError(f"owner changed before the fault: {sorted(self.holders())}")
        delay = self.rng.uniform(0.0, PHASE_WINDOW)  # hit a random phase of the daemons' timers
        rec["delay_s"] = round(delay, 4)
        time.sleep(delay)
        t_fault = marks["fault"] = time.monotonic()
        fault.inject(self, old, rec)
        rec["inject_ms"] = round((time.monotonic() - t_fault) * 1e3, 2)

        if not fault.on_owner:
            # Service counts as resumed only once every daemon provably kept (or re-made) its lease /
            # key past one TTL after etcd's return: one that failed to reconnect would have lost it.
            time.sleep(LEASE_TTL + 1.0)
            everyone = {h.name for h in lab.hosts}
            got = C.wait_until(lambda: self.driver.members() == everyone, 10.0, 0.1)
            rec["members_ms"] = round((time.monotonic() - t_fault) * 1e3, 1)
            if got is None:
                raise RunError(f"members {sorted(self.driver.members())} (not all hosts) "
                               f"{LEASE_TTL + 11:.0f} s after etcd came back")

        exclude = {old_name} if fault.expect_move else set()
        deadline = t_fault + 3 * LEASE_TTL + 10.0

        def serving() -> str | None:
            # another host holds the VIP and answers steadily (the old one may still hold a copy)
            cand = self.holders() - exclude
            if len(cand) == 1:
                h = next(iter(cand))
                if steady(probe, h):
                    return h
            return None

        new_name = C.wait_until(serving, max(0.0, deadline - time.monotonic()))
        if new_name is None:
            raise RunError(f"no host serving steadily {deadline - t_fault:.0f} s after the fault: "
                           f"holders {sorted(self.holders())}, {probe.summary()}")
        marks["recovered"] = time.monotonic()
        rec["new_owner"] = new_name
        if fault.on_owner:  # the faulted host's copy gets to go away by itself (bounded wait)
            C.wait_until(lambda: old_name not in self.holders(),
                         max(0.0, t_fault + LEFTOVER_WAIT - time.monotonic()))
        rec["old_held_at_undo"] = old_name in self.holders() if fault.on_owner else None

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

    def _measure(self, rec: dict[str, Any], probe: Probe, old: str, marks: dict[str, float]) -> None:
        t_start, t_fault, t_end = marks["start"], marks["fault"], marks["end"]
        t_recovered, t_recover = marks.get("recovered"), marks.get("recover")
        rel = lambda t: round((t - t_fault) * 1e3, 1)  # noqa: E731  ms after the fault
        horizon = t_recovered if t_recovered is not None else t_end
        # min_gap 1.5 intervals: a single lost probe counts (as ~one interval), unlike outages()' default
        outs = [o for o in probe.outages(min_gap=1.5 * probe.interval) if o.end > t_fault and o.start < t_end]
        # probes sent within a reply timeout of the end cannot have been answered yet: not an outage
        outs = [o for o in outs if not (o.ongoing and o.start >= t_end - probe.timeout - 2 * probe.interval)]
        main = [o for o in outs if o.start < horizon]
        later = [o for o in outs if o.start >= horizon]
        rec["outage_ms"] = round(sum(o.ms for o in main), 1)
        rec["outages"] = [{"start_ms": rel(o.start), "end_ms": rel(o.end), "ms": round(o.ms, 1), "lost": o.lost,
                           "before": o.before_host, "after": o.after_host} for o in main]
        rec["later_outages"] = [{"start_ms": rel(o.start), "ms": round(o.ms, 1), "before": o.before_host,
                                 "after": o.after_host} for o in later]
        rec["recovered_ms"] = rel(t_recovered) if t_recovered is not None else None
        responders = [(rel(t), h) for t, h in probe.responders() if t >= t_fault - 0.05]
        # compress: one entry per change of the answering host
        rec["responders"] = [r for i, r in enumerate(responders) if i == 0 or r[1] != responders[i - 1][1]]

        dual = 0.0
        windows = []
        open_at_undo = False
        for ip, s, e, hs in self.monitor.dual_windows():
            lo, hi = max(s, t_start), min(e, t_end)
            if hi > lo:
                dual += hi - lo
                windows.append({"start_ms": rel(lo), "end_ms": rel(hi), "ms": round((hi - lo) * 1e3, 3),
                                "holders": sorted(hs)})
                if t_recover is not None and lo <= t_recover <= hi:
                    open_at_undo = True
        rec["dual_ms"] = round(dual * 1e3, 3)
        rec["dual_windows"] = windows
        rec["dual_open_at_undo"] = open_at_undo  # the overlap lasted until the bench undid the fault

        line = self.monitor.holders_timeline(self.vip)
        assert isinstance(line, list)
        at_fault: frozenset[str] = frozenset()
        for t, hs in line:
            if t <= t_fault:
                at_fault = hs
        rec["holders_timeline"] = [(rel(t), sorted(hs)) for t, hs in line if t_fault < t <= t_end]
        gone = None
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
        bound = self.driver.failover_bound()
        if rec.get("dual_ms"):
            w = rec["dual_windows"]
            self.note(f"{tag}: dual ownership {rec['dual_ms']:.0f} ms"
                      f"{' (still open when the bench undid the fault)' if rec.get('dual_open_at_undo') else ''}: "
                      f"{[(x['start_ms'], x['ms'], x['holders']) for x in w][:4]}")
        if rec.get("outage_ms", 0) > bound * 1e3:
            self.note(f"{tag}: outage {rec['outage_ms']:.0f} ms > {bound:g} s")
        if rec.get("old_held_after"):
            self.note(f"{tag}: old owner {rec['old_owner']} holds the VIP at the end "
                      f"(holders {rec['holders_at_end']})")
        if rec.get("later_outages"):
            self.note(f"{tag}: outage after recovery: {rec['later_outages']}")
        if fault.name == "sigterm" and rec.get("exit_code") not in (0, None):
            self.note(f"{tag}: exit code {rec['exit_code']} after SIGTERM ({rec.get('exit_codes')})")
        if fault.on_owner and rec.get("old_gone_ms") is None and "error" not in rec:
            self.note(f"{tag}: the old owner's address never went away by itself")
        elif fault.name in ("sigkill", "sigstop", "linkcut") and rec.get("old_gone_ms") is not None \
                and rec["old_gone_ms"] > bound * 1e3:
            self.note(f"{tag}: the old owner kept the VIP {rec['old_gone_ms']:.0f} ms after the fault (> {bound:g} s)")
        if len(rec.get("holders_at_end", [1])) != 1:
            self.note(f"{tag}: {len(rec['holders_at_end'])} holders at the end: {rec['holders_at_end']}")

    # ------------------------------------------------------------------ footprint

    def footprint(self, n_vips: int, layout: str, settle: float, seconds: float) -> dict[str, Any]:
        """One daemon alone on h1 owning n_vips IPv4 VIPs, after it took them all and settled: RSS, PSS
        and CPU of its processes over `seconds`."""
        lab = self.lab
        vips = [VipDef(f"fp{i}", str(lab.vip4(50 + i))) for i in range(n_vips)]
        drv = self.new_driver(self.workdir / f"footprint-{n_vips}-{layout}", vips, tag=f"fp{n_vips}{layout[0]}",
                              layout=layout)
        host = lab.hosts[0]
        drv.preflight()
        try:
            t0 = time.monotonic()
            drv.start(host)
            ips = [ipaddress.ip_interface(v.address).ip for v in vips]
            if not C.wait_until(lambda: all(lab.holders(ip, [host]) for ip in ips), 30.0, 0.1):
                raise RunError(f"footprint: {host.name} did not take all {n_vips} VIPs within 30 s")
            owned_after = time.monotonic() - t0
            time.sleep(settle)
            roles = drv.footprint_pids(host)
            if not roles or not drv.running(host):
                raise RunError("footprint: daemon exited")
            pids = {r: [C.main_pid(p) for p in ps] for r, ps in roles.items()}
            c0 = {p: C.proc_cpu_seconds(p) for ps in pids.values() for p in ps}
            w0 = time.monotonic()
            time.sleep(seconds)
            c1 = {p: C.proc_cpu_seconds(p) for ps in pids.values() for p in ps}
            w1 = time.monotonic()
            per_role = {}
            for role, ps in pids.items():
                st = [C.proc_status(p) for p in ps]
                cpu = sum(c1[p] - c0[p] for p in ps)
                per_role[role] = {
                    "processes": len(ps), "pids": ps, "cmdline": C.proc_cmdline(ps[0]),
                    "vmrss_kib": sum(s.get("VmRSS", 0) for s in st), "pss_kib": sum(C.proc_pss_kib(p) or 0 for p in ps),
                    "vmhwm_kib": sum(s.get("VmHWM", 0) for s in st), "threads": sum(s.get("Threads", 0) for s in st),
                    "cpu_seconds": round(cpu, 4), "cpu_percent": round(cpu / (w1 - w0) * 100, 3)}
            main_roles = [r for r in per_role if r != "leader-loop"]
            agg = {k: sum(per_role[r][k] for r in main_roles) for k in ("processes", "vmrss_kib", "pss_kib", "threads",
                                                                          "cpu_seconds", "cpu_percent")}
            return {"daemon": self.daemon, "vips": n_vips, "layout": layout, "host": host.name,
                    "all_owned_after_s": round(owned_after, 3), "settle_s": settle, "measured_s": round(w1 - w0, 3),
                    "clk_tck": C.CLK_TCK, "roles": per_role, "daemon_total": agg,
                    "helpers_excluded": [r for r in per_role if r == "leader-loop"],
                    "still_owner_of_all": all(lab.holders(ip, [host]) for ip in ips)}
        finally:
            drv.stop_all()


# =========================================================================== summaries

def summarise(fault: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    gone = C.describe([r["old_gone_ms"] for r in ok if r.get("old_gone_ms") is not None and r.get("old_owner")
                       and fault != "etcd-restart"])
    return {
        "runs": len(runs), "ok": len(ok), "errors": [r["error"] for r in runs if "error" in r],
        "outage_ms": C.describe([r["outage_ms"] for r in ok if "outage_ms" in r]),
        "dual_ms": C.describe([r.get("dual_ms", 0.0) for r in ok]),
        "dual_ms_total": round(sum(r.get("dual_ms", 0.0) for r in runs), 3),
        "dual_runs": sum(1 for r in ok if r.get("dual_ms")),
        "dual_open_at_undo": sum(1 for r in ok if r.get("dual_open_at_undo")),
        "old_held_at_undo": sum(1 for r in ok if r.get("old_held_at_undo")),
        "old_held_after": sum(1 for r in ok if r.get("old_held_after")),
        "old_gone_ms": gone,
        "new_acquired_ms": C.describe([r["new_acquired_ms"] for r in ok if r.get("new_acquired_ms") is not None
                                       and fault != "etcd-restart"]),
        "later_outages": sum(len(r.get("later_outages", [])) for r in runs),
        "later_outage_ms_max": max((o["ms"] for r in runs for o in r.get("later_outages", [])), default=0.0),
        "etcd_unavailable_ms": C.describe([r["etcd_unavailable_ms"] for r in runs if "etcd_unavailable_ms" in r]),
        "vip_dropped": sum(1 for r in ok if r.get("outage_ms", 0) > 0) if fault == "etcd-restart" else None,
        # etcd-restart: when the owner's address lapsed (dropped while etcd was away)
        "owner_vip_lapsed_ms": C.describe([r["old_gone_ms"] for r in ok if r.get("old_gone_ms") is not None])
        if fault == "etcd-restart" else None,
    }


def fault_rows(results: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for daemon, res in results["daemons"].items():
        for fault in ALL_FAULTS:
            f = res.get("faults", {}).get(fault)
            if f is None:
                if (fault == "etcd-restart" and not USES_ETCD.get(daemon, True) and res.get("faults")
                        and fault in results.get("faults_requested", ALL_FAULTS)):
                    rows.append([daemon, fault, "n/a", "-", "-", "-", "-", "-"])
                continue
            s = f["summary"]
            o, d = s["outage_ms"], s["dual_ms"]
            if s["ok"] == 0:
                dual = "-"
            elif d["max"]:
                ge = "≥" if s["dual_open_at_undo"] else ""
                dual = f"{s['dual_runs']}/{s['ok']}: {ge}{C.fmt_ms(d['median'])} / {ge}{C.fmt_ms(d['max'])}"
            else:
                dual = "0"
            on_owner = fault != "etcd-restart"
            later = (f"{s['later_outages']} (max {s['later_outage_ms_max']:.0f} ms)" if s["later_outages"] else "0")
            rows.append([daemon, fault, f"{s['ok']}/{s['runs']}",
                         f"{C.fmt_ms(o['min'])} / {C.fmt_ms(o['median'])} / {C.fmt_ms(o['max'])}",
                         dual,
                         f"{s['old_held_at_undo']}/{s['ok']}" if on_owner else "n/a",
                         f"{s['old_held_after']}/{s['ok']}" if on_owner else "n/a",
                         later])
    return rows


FAULT_HEADERS = ["daemon", "fault", "ok", "outage ms min/med/max", "dual ms: runs, med/max",
                 "old held at undo", "old held at end", "later outages"]


def print_report(results: dict[str, Any]) -> None:
    print()
    print(f"failover: {results.get('runs_per_fault')} runs per fault, fault moment uniform 0..{PHASE_WINDOW:g} s "
          f"after steady service, probe every {results['probe_interval_ms']:g} ms; the faulted host is undone "
          f"(restart / SIGCONT / link up) {LEFTOVER_WAIT:g} s after the fault at the earliest")
    rows = fault_rows(results)
    if rows:
        print(C.table(FAULT_HEADERS, rows, right=(2, 3, 4, 5, 6)))
    print("  ≥: two hosts still held the VIP when the bench undid the fault (restart / SIGCONT / link up), "
          "which ended the overlap; left alone it lasts longer")
    for daemon, res in results["daemons"].items():
        et = res.get("faults", {}).get("etcd-restart", {}).get("summary")
        if et and et["etcd_unavailable_ms"]["n"]:
            u = et["etcd_unavailable_ms"]
            lapsed = et["owner_vip_lapsed_ms"]
            print(f"  {daemon} etcd-restart: etcd unavailable {C.fmt_ms(u['min'])}/{C.fmt_ms(u['median'])}/"
                  f"{C.fmt_ms(u['max'])} ms (kill .. healthy); VIP dropped in {et['vip_dropped']}/{et['ok']} runs"
                  + (f", the owner's address went {C.fmt_ms(lapsed['min'])}..{C.fmt_ms(lapsed['max'])} ms after the kill"
                     if lapsed and lapsed["n"] else ""))
    print("\nsettings:")
    for daemon, res in results["daemons"].items():
        st = res.get("settings", {})
        print(f"  {daemon}: {st.get('summary', '-')}")
        if st.get("command"):
            print(f"      {st['command']}")
        if st.get("leader_loop"):
            print(f"      {st['leader_loop']}")
    fps = [fp for res in results["daemons"].values() for fp in res.get("footprint", [])]
    if fps:
        measured = next((fp["measured_s"] for fp in fps if "measured_s" in fp), 0)
        print("\nidle footprint: one instance alone owning N VIPs, settled 3 s, measured over "
              f"{measured:.0f} s (RSS / PSS summed over the daemon's processes)")
        rows = []
        for fp in fps:
            if "error" in fp:
                rows.append([fp.get("daemon"), fp.get("vips"), fp.get("layout", ""), "error", "", "", "", fp["error"][:70]])
                continue
            t = fp["daemon_total"]
            helpers = "; ".join(f"+ {r}: {fp['roles'][r]['vmrss_kib'] / 1024:.1f} MiB RSS, "
                                f"{fp['roles'][r]['cpu_percent']:.2f} % CPU" for r in fp["helpers_excluded"])
            rows.append([fp["daemon"], fp["vips"], fp["layout"], t["processes"], f"{t['vmrss_kib'] / 1024:.1f}",
                         f"{t['pss_kib'] / 1024:.1f}", f"{t['cpu_percent']:.2f}", helpers])
        print(C.table(["daemon", "VIPs", "layout", "procs", "RSS MiB", "PSS MiB", "CPU % of a core", "not counted"],
                      rows, right=(1, 3, 4, 5, 6)))
    claim = results.get("claim")
    if claim:
        print(f"\nvipd: time to claim and announce N VIPs on one host (one etcd; announce_count 1; from `vipd run` "
              f"start; 'announced' = the Nth `event=announced` log line)")
        rows = []
        for c in claim.get("runs", []):
            rows.append([c["vips"], c.get("lease_ttl", "-"), C.fmt_ms(c.get("ready_ms")),
                         C.fmt_ms(c.get("first_address_ms")), C.fmt_ms(c.get("all_addresses_ms")),
                         C.fmt_ms(c.get("all_announced_ms")), C.fmt_ms(c.get("released_ms")),
                         c.get("error", "")])
        print(C.table(["VIPs", "TTL s", "ready ms", "first address ms", "all addresses ms", "all announced ms",
                       "SIGTERM -> all removed ms", "problem"], rows, right=(0, 1, 2, 3, 4, 5, 6)))
    for daemon, res in results["daemons"].items():
        mon = res.get("monitor", {})
        print(f"\n{daemon}: dual ownership over the whole bench {res.get('dual_ms_total', 0):.0f} ms (monitor: "
              f"{mon.get('samples')} samples, max gap {mon.get('max_gap', 0) * 1e3:.1f} ms); "
              f"{len(res.get('anomalies', []))} anomalies" + (":" if res.get("anomalies") else ""))
        for a in res.get("anomalies", [])[:40]:
            print(f"  - {a}")
        if len(res.get("anomalies", [])) > 40:
            print(f"  ... {len(res['anomalies']) - 40} more in the JSON")


# =========================================================================== main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--daemons", default=",".join(DAEMONS), help=f"comma-separated, from {', '.join(DAEMONS)}")
    p.add_argument("--runs", type=int, default=5, help="runs per fault (default 5)")
    p.add_argument("--faults", default=",".join(ALL_FAULTS), help=f"comma-separated, from {', '.join(ALL_FAULTS)}")
    p.add_argument("--json", type=Path, help="where to write the results (default bench/out/failover-<timestamp>.json)")
    p.add_argument("--png", type=Path, help="the chart (default: next to the JSON, .png)")
    p.add_argument("--publish", action="store_true",
                   help="also copy the chart to bench/failover.png (the one result file the repository keeps)")
    p.add_argument("--vipd-src", default="HEAD",
                   help="run the vipd of this commit (a `git archive` snapshot under bench/out/src-<sha>/), or "
                        "'worktree' for the working tree as it is (default HEAD)")
    p.add_argument("--timing", choices=("defaults", "lab"), default="defaults",
                   help="vipd [timing]: the shipped defaults, or the lab tests' (fence_margin 1.5, reconcile 0.5)")
    p.add_argument("--interval", type=float, default=0.01, help="probe interval, seconds (default 0.01)")
    p.add_argument("--family", type=int, choices=(4, 6), default=4, help="probe an IPv4 or an IPv6 VIP")
    p.add_argument("--etcd-down", type=float, default=0.0, help="etcd-restart: seconds between kill and start")
    p.add_argument("--seed", type=int, help="random seed for the fault moments (default: random, recorded)")
    p.add_argument("--no-footprint", action="store_true", help="skip the RSS/CPU measurement")
    p.add_argument("--footprint-vips", type=int, default=10, help="VIPs the lone daemon owns (default 10)")
    p.add_argument("--footprint-seconds", type=float, default=10.0)
    p.add_argument("--claim", default="1,100,1000",
                   help="vipd: VIP counts for the claim-and-announce timing ('' skips it; default 1,100,1000)")
    p.add_argument("--claim-ttl", default=str(LEASE_TTL),
                   help=f"vipd lease TTL(s) for the claim timing, comma-separated (default {LEASE_TTL})")
    p.add_argument("--no-chart", action="store_true", help="no PNG (matplotlib not needed)")
    a = p.parse_args(argv)
    a.daemon_list = [d.strip() for d in a.daemons.split(",") if d.strip()]
    if not a.daemon_list or any(d not in DAEMONS for d in a.daemon_list):
        p.error(f"--daemons: choose from {', '.join(DAEMONS)}")
    faults = [f.strip() for f in a.faults.split(",") if f.strip()]
    bad = [f for f in faults if f not in FAULTS]
    if bad:
        p.error(f"unknown fault(s) {bad}; choose from {', '.join(ALL_FAULTS)}")
    a.fault_list = faults  # may be empty: footprint / claim only
    if a.runs < 1 or a.runs > 100:
        p.error("--runs must be 1..100")
    if not 1 <= a.footprint_vips <= 50:
        p.error("--footprint-vips: 1..50")
    try:
        a.claim_counts = [int(x) for x in a.claim.split(",") if x.strip()]
    except ValueError:
        p.error("--claim: comma-separated integers")
    try:
        a.claim_ttls = [int(x) for x in a.claim_ttl.split(",") if x.strip()]
    except ValueError:
        p.error("--claim-ttl: comma-separated integers")
    if not all(1 <= n <= 4000 for n in a.claim_counts):
        p.error("--claim: 1..4000 each")
    if a.seed is None:
        a.seed = secrets.randbits(32)
    return a



def run_daemon(args: argparse.Namespace, daemon: str, workdir: Path, clock: C.Clock, res: dict[str, Any]) -> None:
    """Everything for one daemon, in a fresh lab; fills `res` as it goes (kept on errors/interrupts)."""
    t0 = time.monotonic()
    res.update({"daemon": daemon, "completed": False, "faults": {}, "footprint": [], "anomalies": [],
                "loadavg_start": os.getloadavg()})
    left = topology.purge(PREFIX)  # namespaces an earlier, killed bench left behind (only our names)
    if left:
        print(f"removed leftovers of an earlier bench: {left}")
    try:
        with Lab(PREFIX, n_hosts=3) as lab:
            etcd = None
            if USES_ETCD[daemon]:
                etcd = EtcdServer(workdir / "etcd", host=str(lab.etcd_ip), client_port=2379, peer_port=2380,
                                  netns=lab.etcd_ns, name=f"{PREFIX}etcd", extra_args=ETCD_ARGS.get(daemon, ()))
                etcd.start(timeout=15.0)
                res["etcd"] = {"flags": etcd.args(), "version": C.tool_version(["etcd", "--version"]),
                               "endpoint": etcd.endpoint, "netns": lab.etcd_ns}
            b = Bench(args, daemon, lab, etcd, workdir, clock)
            res["anomalies"] = b.anomalies
            try:
                if not args.no_footprint:
                    layouts = ["per-vip", "one"] if daemon.startswith("keepalived") else ["per-vip"]
                    for layout in layouts:
                        print(f"[{daemon}] footprint: one instance owning {args.footprint_vips} VIPs ({layout}) ...",
                              flush=True)
                        try:
                            res["footprint"].append(b.footprint(args.footprint_vips, layout, 3.0,
                                                                args.footprint_seconds))
                        except RunError as e:
                            res["footprint"].append({"daemon": daemon, "vips": args.footprint_vips, "layout": layout,
                                                     "error": str(e)})
                            b.note(str(e))
                if args.fault_list:
                    b.run_faults(res)
                else:
                    res["completed"] = True
            finally:
                if etcd is not None:
                    etcd.stop()
    finally:
        res["duration_s"] = round(time.monotonic() - t0, 1)
        res["loadavg_end"] = os.getloadavg()  # other work on the machine shows here (2 CPUs: ~2 is busy)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/failover.py needs root (network namespaces)", file=sys.stderr)
        return 2
    missing = [t for d, t in (("keepalived", "keepalived"), ("keepalived-tuned", "keepalived"),
                              ("vip-manager", "vip-manager")) if d in args.daemon_list and not shutil.which(t)]
    if missing:
        print(f"missing: {sorted(set(missing))} (apt-get install {' '.join(sorted(set(missing)))})", file=sys.stderr)
        return 2
    if not args.no_chart:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("matplotlib is missing: .venv/bin/pip install -r bench/requirements.txt (or --no-chart)",
                  file=sys.stderr)
            return 2
    C.reexec_with_snapshot(args.vipd_src, args.seed, __file__)
    C.install_signal_handlers()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = C.ROOT / "bench" / "out"
    workdir = out_dir / f"failover-{stamp}"
    json_path = args.json or out_dir / f"failover-{stamp}.json"
    png_path = args.png or json_path.with_suffix(".png")
    workdir.mkdir(parents=True, exist_ok=True)
    clock = C.Clock()
    results: dict[str, Any] = {
        "bench": "failover", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "completed": False,
        "argv": sys.argv, "seed": args.seed, "workdir": str(workdir), "environment": C.environment(),
        "runs_per_fault": args.runs, "probe_interval_ms": args.interval * 1e3,
        "fault_delay": f"uniform 0..{PHASE_WINDOW:g} s", "leftover_wait_s": LEFTOVER_WAIT,
        "lease_ttl_s": LEASE_TTL, "faults_requested": args.fault_list, "daemons": {},
    }
    t_begin = time.monotonic()
    rc = 0
    try:
        for daemon in args.daemon_list:
            res: dict[str, Any] = {}
            results["daemons"][daemon] = res
            print(f"\n=== {daemon} ===", flush=True)
            try:
                run_daemon(args, daemon, workdir / daemon, clock, res)
            except RunError as e:
                res["error"] = str(e)
                print(f"[{daemon}] failed: {e}", flush=True)
                rc = 1
            except Exception:
                traceback.print_exc()
                res["error"] = traceback.format_exc()
                rc = 1
        if "vipd" in args.daemon_list and args.claim_counts:
            from _claim import claim_times
            print("\n=== vipd: claim and announce ===", flush=True)
            results["claim"] = {}
            try:
                claim_times(args, workdir / "claim", clock, results["claim"])
            except Exception:
                traceback.print_exc()
                results["claim"]["error"] = traceback.format_exc()
                rc = 1
        results["completed"] = rc == 0
    except KeyboardInterrupt as e:
        print(f"\ninterrupted ({e or 'Ctrl-C'}): tearing down", file=sys.stderr)
        results["interrupted"] = str(e) or "SIGINT"
        rc = 130
    finally:
        results["duration_s"] = round(time.monotonic() - t_begin, 1)
        changed = C.changed_files(results["environment"]["vipd_source_files"], C.source_files())
        results["vipd_sources_changed_during_bench"] = changed
        if changed:
            print(f"WARNING: the vipd sources the bench runs changed meanwhile: {', '.join(changed)}")
        json_path.parent.mkdir(parents=True, exist_ok=True)
        if results["daemons"]:
            print_report(results)
        if not args.no_chart and any(r.get("faults") for r in results["daemons"].values()):
            try:
                from _chart import render
                render(results, png_path)
                results["chart"] = str(png_path)
                print(f"\nchart: {png_path}")
                if args.publish:
                    shutil.copyfile(png_path, C.ROOT / "bench" / "failover.png")
                    print(f"       copied to {C.ROOT / 'bench' / 'failover.png'}")
            except Exception:
                traceback.print_exc()
        json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
        env = results["environment"]
        print(f"JSON: {json_path}\nlogs: {workdir}\nvipd: {env['vipd_src']} (commit "
              f"{(env.get('vipd_src_commit') or 'working tree at ' + str(env.get('git_commit')))[:12]})")
        leftovers = topology.netns.list_ns(PREFIX)
        if leftovers:
            print(f"WARNING: namespaces left behind: {leftovers}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())

"""Chaos soak: random faults against vipd on a namespace lab (3 hosts, etcd, a client), one at a time,
each followed by a bounded wait for recovery; an AddressMonitor (10 ms) watches every host, client
Probes watch some VIPs. Used by bench/chaos.py (long) and tests/lab/test_chaos.py (short).

Faults (KINDS): planned handover (`vipd release` or SIGTERM + restart), SIGKILL + restart, hang
(SIGSTOP 0.5-5 s), link cut + restore, etcd restart, host<->etcd and host<->hosts nftables partitions.
Every fault draws the same random numbers in the same order, so a seed replays the sequence of kinds,
VIPs and durations (the target, "the holder of VIP x", depends on where the VIPs are then).
Recovered = every VIP has one holder, whose daemon says it owns it, and every daemon answers its control
socket and agrees. At the end all daemons get SIGTERM at once: a VIP left on a host, a key left in etcd,
or after teardown a namespace or process left, is a leak. The figures: vipd.lab.chaos_report.
"""

from __future__ import annotations

import base64
import contextlib
import random
import secrets
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from vipd import control
from vipd.lab import chaos_report, netns
from vipd.lab.cluster import Cluster, VipDef
from vipd.lab.etcd import EtcdServer
from vipd.lab.etcd_cluster import FAULTS as ETCD_FAULTS
from vipd.lab.etcd_cluster import EtcdCluster
from vipd.lab.monitor import AddressMonitor
from vipd.lab.probe import Probe
from vipd.lab.topology import Host, Lab, to_ip

KINDS = ("handover", "sigkill", "hang", "link_cut", "etcd_restart", "partition_etcd", "partition_hosts",
         "one_way", "segment_loss", "etcd_member")
SINGLE_ETCD_ONLY = ("etcd_restart",)  # with a 3-member etcd cluster, etcd_member replaces it
CLUSTER_ONLY = ("etcd_member",)


@dataclass
class ChaosConfig:
    prefix: str  # lab prefix ("vtx" for the bench, "vtq..." for the test)
    workdir: Path  # vipd configs and logs (hosts/<h>/), etcd data and log, probe logs
    duration: float = 600.0  # no new fault starts after this many seconds
    seed: int | None = None  # None: a random one (always reported)
    kinds: tuple[str, ...] = KINDS
    n_vips4: int = 3
    n_vips6: int = 2
    probes: int = 2  # client probes: the first IPv4 VIP, then the first IPv6 one, then the others
    lease_ttl: int = 3
    etcd_members: int = 1  # 3: a real 3-member etcd cluster (vipd/lab/etcd_cluster.py) and its member faults
    recovery_timeout: float = 20.0  # after healing, the cluster must have recovered within this
    hold: tuple[float, float] = (0.5, 6.0)  # how long a link cut / partition lasts
    settle: tuple[float, float] = (0.5, 2.5)  # pause between a recovery and the next fault
    echo: Callable[[str], None] | None = print


@dataclass
class Fault:
    n: int
    kind: str
    detail: str
    host: str | None
    vip: str | None
    t_inject: float  # time.monotonic()
    wall: str = ""  # the same instant in UTC, as vipd's logs print it
    t_heal: float | None = None
    t_recovered: float | None = None
    error: str | None = None
    no_holder_ms: dict[str, float] = field(default_factory=dict)  # per VIP, from injection to recovery

    @property
    def recovery_ms(self) -> float | None:
        return None if self.t_recovered is None or self.t_heal is None else (self.t_recovered - self.t_heal) * 1e3


class Chaos:
    def __init__(self, cfg: ChaosConfig) -> None:
        unknown = set(cfg.kinds) - set(KINDS)
        if unknown or not cfg.kinds:
            raise ValueError(f"fault kinds must be among {KINDS}, got {sorted(unknown) or 'none'}")
        self.cfg = cfg
        self.seed = cfg.seed if cfg.seed is not None else secrets.randbits(32)
        self.rng = random.Random(self.seed)
        self.dir = Path(cfg.workdir)
        self.faults: list[Fault] = []
        self.failures: list[str] = []
        self.interrupted = False
        lab = self.lab = Lab(cfg.prefix, n_hosts=3)
        self.vips = ([VipDef(f"v4{chr(97 + i)}", str(lab.vip4(i))) for i in range(cfg.n_vips4)]
                     + [VipDef(f"v6{chr(97 + i)}", str(lab.vip6(cfg.n_vips4 + i))) for i in range(cfg.n_vips6)])
        self.etcd = EtcdServer(self.dir / "etcd", host=str(lab.etcd_ip), client_port=2379, peer_port=2380,
                               netns=lab.etcd_ns)
        self.etcd_cluster: EtcdCluster | None = None  # made once the lab is up (cfg.etcd_members == 3)
        self.cluster = Cluster(lab, self.dir / "hosts", self.vips, endpoints=[self.etcd.endpoint],
                               lease_ttl=cfg.lease_ttl, prefix=f"/vipd/{cfg.prefix}/")
        skip = SINGLE_ETCD_ONLY if cfg.etcd_members > 1 else CLUSTER_ONLY
        self.kinds = tuple(k for k in cfg.kinds if k not in skip)
        self.monitor = AddressMonitor(lab, [to_ip(v.address) for v in self.vips])
        firsts = [next(v for v in self.vips if to_ip(v.address).version == n) for n in (4, 6)
                  if any(to_ip(v.address).version == n for v in self.vips)]
        picks = firsts + [v for v in self.vips if v not in firsts]
        self.probes = {v.name: Probe(lab, to_ip(v.address), max_duration=cfg.duration + 600,
                                     log=self.dir / f"probe-{v.name}.log") for v in picks[:cfg.probes]}

    def say(self, msg: str) -> None:
        if self.cfg.echo:
            self.cfg.echo(msg)

    # ------------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.say(f"chaos: seed {self.seed}, {cfg.duration:.0f} s, lab {cfg.prefix}, logs in {self.dir}")
        end: dict[str, Any] = {}
        before: dict[int, str] = {}
        try:
            self.lab.up()
            if self.cfg.etcd_members > 1:
                self.etcd_cluster = EtcdCluster(self.lab, self.dir / "etcd-cluster", size=self.cfg.etcd_members)
                self.etcd_cluster.start()
                self.cluster.endpoints = self.etcd_cluster.endpoints()
            else:
                self.etcd.start()
            self.monitor.start()
            self.cluster.start_all()
            if not self._wait_recovered(30.0):
                raise RuntimeError(f"no initial ownership: holders {self._holders()}, exit codes "
                                   f"{ {n: p.poll() for n, p in self.cluster.procs.items()} }\n{self.cluster.log_tail()}")
            for p in self.probes.values():
                p.start()
            self.say(f"chaos: {len(self.vips)} VIPs owned: {self._holders()}")
            t0 = time.monotonic()
            try:
                self._soak(t0)
            except KeyboardInterrupt:
                self.interrupted = True
                self.say("chaos: interrupted: stopping cleanly")
            t1 = time.monotonic()
            end["final_holders"] = self._holders()
            end.update(self._clean_stop())
            self.monitor.stop()
            for p in self.probes.values():
                p.stop()
            end["report"] = chaos_report.report(self, t0, t1, KINDS)
        finally:
            with _deferred_signals():  # a Ctrl-C now would leave half a lab behind: take it afterwards
                before = self._our_processes()
                for p in self.probes.values():
                    p.stop()
                self.monitor.stop(raise_error=False)
                self.etcd.stop()
                if self.etcd_cluster is not None:
                    self.etcd_cluster.close()
                self.lab.down()
        leaks = end.setdefault("leaks", {})
        leaks["namespaces"] = [n for n in netns.list_ns(cfg.prefix) if n in self.lab.namespaces]
        leaks["processes"] = [f"{pid} {cmd}" for pid, cmd in before.items() if _cmdline(pid) == cmd]
        return chaos_report.result(self, end)

    def _holders(self) -> dict[str, list[str]]:
        return {v.name: sorted(self.monitor.holders_now(to_ip(v.address))) for v in self.vips}

    def _states(self) -> dict[str, Any]:
        """Each daemon's view (`vipd state` over its control socket), or why it did not answer."""
        out: dict[str, Any] = {}
        for h in self.lab.hosts:
            try:
                sock = self.cluster.config_path(h).parent / "run" / "control.sock"
                out[h.name] = control.request(str(sock), "state", 1.0).get("result") or {}
            except (OSError, ValueError) as e:
                out[h.name] = repr(e)
        return out

    def _converged(self) -> bool:
        holders = self._holders()
        if any(len(h) != 1 for h in holders.values()):
            return False
        for host, st in self._states().items():
            if not isinstance(st, dict):
                return False
            for v in self.vips:
                s, owner = st.get(v.name) or {}, holders[v.name][0]
                if (s.get("state") == "owner") != (owner == host) or s.get("owner") != owner:
                    return False
        return True

    def _wait_recovered(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._converged():
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.cluster.procs.values()):
                return False  # (a daemon that exited is reported by the caller)
            time.sleep(0.1 if all(len(h) == 1 for h in self._holders().values()) else 0.02)
        return True

    # ------------------------------------------------------------------ faults

    def _soak(self, t0: float) -> None:
        while time.monotonic() - t0 < self.cfg.duration:
            d: dict[str, Any] = {"kind": self.rng.choice(self.kinds), "vip": self.rng.randrange(len(self.vips)),
                 "owner": self.rng.random(), "host": self.rng.randrange(3), "variant": self.rng.random(),
                 "hold": self.rng.uniform(*self.cfg.hold), "pause": self.rng.uniform(0.5, 5.0),
                 "down": self.rng.uniform(0.0, 3.0), "settle": self.rng.uniform(*self.cfg.settle)}
            vip = self.vips[d["vip"]]
            holders = sorted(self.monitor.holders_now(to_ip(vip.address)))
            host = self.lab.hosts[d["host"]]
            if holders and (d["owner"] < 0.8 or d["kind"] == "handover"):  # mostly hit an owner
                host = self.cluster.host(holders[0])
            duals = len(self.monitor.dual_windows())
            f = Fault(len(self.faults) + 1, d["kind"], "", host.name, vip.name, time.monotonic(), _wall())
            self.faults.append(f)
            try:
                getattr(self, "_f_" + f.kind)(f, host, vip, d)
            except Exception as e:  # a step failed (a harness command, or vipd refused it): report, go on
                self._fail(f, f"{type(e).__name__}: {e}")
            finally:
                f.t_heal = time.monotonic()
            self._after(f, duals)
            time.sleep(d["settle"])

    def _after(self, f: Fault, duals: int) -> None:
        for name, proc in self.cluster.procs.items():  # every daemon must be running now
            if proc.poll() is not None:
                self._fail(f, f"vipd on {name} exited with {proc.returncode}")
                self.cluster.start(self.cluster.host(name))
        if self._wait_recovered(self.cfg.recovery_timeout):
            f.t_recovered = time.monotonic()
        else:
            exited = {n: p.returncode for n, p in self.cluster.procs.items() if p.poll() is not None}
            self._fail(f, f"not recovered {self.cfg.recovery_timeout:.0f} s after healing: holders {self._holders()}, "
                          f"daemons {self._states()}" + (f", exited {exited}" if exited else ""))
            for name in exited:
                self.cluster.start(self.cluster.host(name))
        hi = f.t_recovered or time.monotonic()
        for v in self.vips:
            line = self.monitor.holders_timeline(to_ip(v.address))
            gaps = chaos_report.windows(line,  # type: ignore[arg-type]
                                        lambda h: not h, f.t_inject, hi)
            f.no_holder_ms[v.name] = sum(e - s for s, e in gaps) * 1e3
        for ip, s, e, hs in self.monitor.dual_windows()[duals:]:
            self._fail(f, f"DUAL OWNERSHIP of {ip} by {sorted(hs)} for {(e - s) * 1e3:.1f} ms")
        self.say(f"  #{f.n:<3} {f.kind:<15} {f.host or '-':<3} {f.detail:<34} "
                 + (f"recovered in {f.recovery_ms:.0f} ms" if f.recovery_ms is not None else "NOT RECOVERED")
                 + f", max no-holder {max(f.no_holder_ms.values(), default=0):.0f} ms"
                 + (f"  ERROR {f.error}" if f.error else ""))

    def _fail(self, f: Fault, what: str) -> None:
        f.error = "; ".join(x for x in (f.error, what) if x)
        self.failures.append(f"fault #{f.n} ({f.kind} on {f.host} at {f.wall}, {f.detail}): {what}; logs: {self.dir}")

    @staticmethod
    def _hold(on: Callable[[], object], off: Callable[[], object], seconds: float) -> None:
        """on(), wait, off() - off() also when on() or the wait fails (or Ctrl-C)."""
        try:
            on()
            time.sleep(seconds)
        finally:
            off()

    def _f_handover(self, f: Fault, h: Host, vip: VipDef, d: dict[str, Any]) -> None:
        if d["variant"] < 0.5:
            r = self.cluster.run_cli(h, "release", vip.name)
            f.detail = f"release {vip.name}: " + (r.stdout.strip().split(": ", 1)[-1] or f"exit {r.returncode}")
            if r.returncode != 0:
                self._fail(f, f"vipd release exited {r.returncode}: {r.stderr.strip()}")
            return
        f.detail = f"SIGTERM, restart after {d['down']:.1f} s"

        def term() -> None:
            if (rc := self.cluster.term(h, timeout=15)) != 0:
                self._fail(f, f"vipd exited {rc} on SIGTERM")
        self._hold(term, lambda: self.cluster.start(h), d["down"])

    def _f_sigkill(self, f: Fault, h: Host, vip: VipDef, d: dict[str, Any]) -> None:
        f.detail = f"restart after {d['down']:.1f} s"
        self._hold(lambda: self.cluster.kill(h), lambda: self.cluster.start(h), d["down"])

    def _f_hang(self, f: Fault, h: Host, vip: VipDef, d: dict[str, Any]) -> None:
        f.detail = f"SIGSTOP for {d['pause']:.1f} s"
        self._hold(lambda: self.cluster.signal(h, signal.SIGSTOP), lambda: self.cluster.signal(h, signal.SIGCONT),
                   d["pause"])

    def _f_link_cut(self, f: Fault, h: Host, vip: VipDef, d: dict[str, Any]) -> None:
        silent = d["variant"] < 0.5
        f.detail = f"{'silent' if silent else 'carrier'} cut for {d['hold']:.1f} s"
        self._hold(lambda: self.lab.cut(h, silent=silent), lambda: self.lab.restore(h), d["hold"])

    def _f_etcd_restart(self, f: Fault, h: Host, vip: VipDef, d: dict[str, Any]) -> None:
        f.host, kill = None, d["variant"] < 0.5
        f.detail = f"{'SIGKILL' if kill else 'SIGTERM'}, down {d['down']:.1f} s"
        self._hold(self.etcd.kill if kill else self.etcd.stop, self.etcd.start, d["down"])

    def _f_partition_etcd(self, f: Fault, h: Host, vip: VipDef, d: dict[str, Any]) -> None:
        f.detail = f"{d['hold']:.1f} s"
        self._hold(lambda: self.lab.partition(h, [self.lab.etcd]), lambda: self.lab.heal(h), d["hold"])

    def _f_partition_hosts(self, f: Fault, h: Host, vip: VipDef, d: dict[str, Any]) -> None:
        f.detail = f"{d['hold']:.1f} s"
        others = [x for x in self.lab.hosts if x is not h]
        self._hold(lambda: self.lab.partition(h, others), lambda: self.lab.heal(h), d["hold"])

    def _f_one_way(self, f: Fault, h: Host, vip: VipDef, d: dict[str, Any]) -> None:
        other = self.lab.hosts[(self.lab.hosts.index(h) + 1 + int(d["variant"] * 2) % 2) % 3]
        src, dst = (h, other) if d["variant"] < 0.5 else (other, h)
        f.detail = f"{src.name} -> {dst.name} lost for {d['hold']:.1f} s"
        self._hold(lambda: self.lab.one_way([(src, dst)]), self.lab.heal_loss, d["hold"])

    def _f_segment_loss(self, f: Fault, h: Host, vip: VipDef, d: dict[str, Any]) -> None:
        f.host = None
        pct = 5 + int(d["variant"] * 16)  # 5..20 %
        f.detail = f"{pct} % of frames lost for {d['hold']:.1f} s"
        self._hold(lambda: self.lab.segment_loss(pct), self.lab.heal_loss, d["hold"])

    def _f_etcd_member(self, f: Fault, h: Host, vip: VipDef, d: dict[str, Any]) -> None:
        assert self.etcd_cluster is not None
        f.host = None
        fault = ETCD_FAULTS[int(d["variant"] * len(ETCD_FAULTS)) % len(ETCD_FAULTS)]
        hit = self.etcd_cluster.inject(fault, hold=min(d["hold"], 3.0))
        f.detail = f"{fault} ({hit.node.name})"

    # ------------------------------------------------------------------ the end

    def _clean_stop(self) -> dict[str, Any]:
        """SIGTERM every daemon at once; then every VIP still on a host and every key left in etcd is a leak."""
        t = time.monotonic()
        for name, proc in self.cluster.procs.items():
            if proc.poll() is None:
                self.cluster.signal(self.cluster.host(name), signal.SIGCONT)
                self.cluster.signal(self.cluster.host(name), signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for name, proc in self.cluster.procs.items():
            try:
                codes[name] = proc.wait(max(0.1, t + 15 - time.monotonic()))
            except Exception:  # noqa: BLE001 - still running: reported as unclean
                codes[name] = None
        stop_s = time.monotonic() - t
        vips = {v.name: self.lab.holders(to_ip(v.address)) for v in self.vips}
        try:
            prefix = self.cluster.prefix.encode()
            store = self.etcd_cluster.members[0] if self.etcd_cluster is not None else self.etcd
            r = store.request("/v3/kv/range", {"key": base64.b64encode(prefix).decode(), "keys_only": True,
                                                   "range_end": base64.b64encode(prefix[:-1] + b"0").decode()})
            keys = [base64.b64decode(kv["key"]).decode() for kv in r.get("kvs", [])]
            # the heartbeat secret (vipd/peers/keyring.py) outlives every daemon on purpose: not a leak
            keys = [k for k in keys if k != self.cluster.prefix + "peerkey"]
        except Exception as e:  # noqa: BLE001
            keys = [f"(etcd not readable: {e})"]
        return {"exit_codes": codes, "stop_seconds": stop_s,
                "leaks": {"vips": {k: v for k, v in vips.items() if v}, "etcd_keys": keys}}

    def _our_processes(self) -> dict[int, str]:
        """Every process the lab started or found in its namespaces, with its command line."""
        pids = {p.pid for h in self.lab.nodes for p in h.procs} | {p.pid for p in self.cluster.procs.values()}
        for srv in [self.etcd, *(self.etcd_cluster.members if self.etcd_cluster else [])]:
            if srv.pid:
                pids.add(srv.pid)
        for ns in self.lab.namespaces if self.lab.is_up else []:
            pids.update(netns.pids_in(ns))
        return {pid: cmd for pid in pids if (cmd := _cmdline(pid))}


def _wall() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


@contextlib.contextmanager
def _deferred_signals() -> Iterator[None]:
    """SIGINT/SIGTERM/SIGHUP during the block are remembered, then raised as KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old = {s: signal.signal(s, lambda n, _f: got.append(n)) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if got:
        raise KeyboardInterrupt(signal.Signals(got[0]).name)


def _cmdline(pid: int) -> str:
    """The command line of a live (not zombie) process, "" otherwise."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return ""
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (OSError, IndexError):
        return ""

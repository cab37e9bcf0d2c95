"""Daemon drivers for bench/failover.py: how the bench runs vipd, keepalived and vip-manager on the
lab hosts. One small class per daemon; the faults are generic (signals, link cuts, etcd restarts)
and call the hooks here.

Every driver starts its daemon(s) in a host namespace through Lab.popen (own process group, killed
at teardown), writes its configuration under the work directory, and turns the daemon's log into
vipd's `TIMESTAMPZ level event=... ` format (keepalived and vip-manager stamp their own lines only
to the second, so the bench stamps each line on arrival, to the millisecond).
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common as C

from vipd.lab.cluster import Cluster, VipDef
from vipd.lab.etcd import EtcdServer
from vipd.lab.topology import Host, Lab

BENCH = Path(__file__).resolve().parent
LEASE_TTL = 3  # s: vipd's lease TTL, and the TTL of vip-manager's leader key (the same, for a fair comparison)


class RunError(RuntimeError):
    """A run could not complete (a wait timed out); recorded, then the cluster is reset."""


@dataclass
class Proc:
    """One process of a daemon on one host."""

    role: str  # "vipd", "keepalived", "vip-manager", "leader-loop"
    popen: subprocess.Popen[bytes]
    log: C.KeyValueLog
    piper: C.PipeLogger | None = None

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None


def process_state(pid: int) -> str:
    """The one-letter state of /proc/PID/stat ("T": stopped, "Z": zombie), "" if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


# =========================================================================== base

class DaemonDriver:
    """How the bench runs one failover daemon on the lab hosts.

    A driver starts and stops the daemon on a host, names its processes and logs, says when a
    restarted or reconnected daemon is part of the cluster again, and reports every setting it uses.
    Faults call the hooks planned_stop / crash / hang / unhang; the defaults signal every process of
    the daemon on that host."""

    name = "?"
    uses_etcd = True  # False: no etcd in the lab, and the etcd-restart fault does not apply
    etcd_args: tuple[str, ...] = ()  # extra etcd flags this daemon needs

    def __init__(self, lab: Lab, workdir: Path, vips: list[VipDef], *, etcd: EtcdServer | None,
                 clock: C.Clock, tag: str = "") -> None:
        self.lab, self.workdir, self.vips, self.etcd, self.clock = lab, workdir, vips, etcd, clock
        self.tag = tag  # distinguishes etcd keys / VRIDs of several driver instances in one lab
        self.procs: dict[str, list[Proc]] = {}

    # ------------------------------------------------------------------ life cycle
    def preflight(self) -> None:
        """Raise RunError when the daemon would refuse its configuration (before starting anything)."""

    def start(self, host: Host) -> None:
        raise NotImplementedError

    def start_all(self) -> None:
        for h in self.lab.hosts:
            self.start(h)

    def host_procs(self, host: Host) -> list[Proc]:
        return self.procs.get(host.name, [])

    def running(self, host: Host) -> bool:
        ps = self.host_procs(host)
        return bool(ps) and all(p.alive for p in ps)

    def stopped(self, host: Host) -> bool:
        """True when a process of the daemon is SIGSTOPped."""
        return any(process_state(p.popen.pid) == "T" for p in self.host_procs(host) if p.alive)

    def pids(self, host: Host) -> list[int]:
        return [p.popen.pid for p in self.host_procs(host) if p.alive]

    def send_signal(self, host: Host, sig: signal.Signals) -> None:
        for p in self.host_procs(host):
            if p.alive:
                os.kill(p.popen.pid, sig)

    def wait_exit(self, host: Host, timeout: float) -> int | None:
        """The exit code of the daemon's main process once every process on host exited; None if one
        still runs after timeout."""
        deadline = time.monotonic() + timeout
        codes = []
        for p in self.host_procs(host):
            try:
                codes.append(p.popen.wait(max(0.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                return None
        for p in self.host_procs(host):
            if p.piper:
                p.piper.join(1.0)
        return codes[0] if codes else None

    def exit_codes(self, host: Host) -> dict[str, int | None]:
        return {p.role: p.popen.poll() for p in self.host_procs(host)}

    def stop_all(self) -> None:
        for ps in self.procs.values():
            for p in ps:
                if p.alive:
                    p.popen.send_signal(signal.SIGCONT)
                    p.popen.terminate()
        for ps in self.procs.values():
            for p in ps:
                try:
                    p.popen.wait(10)
                except subprocess.TimeoutExpired:
                    p.popen.kill()
                    p.popen.wait(5)

    # ------------------------------------------------------------------ fault hooks
    def planned_stop(self, host: Host) -> None:
        self.send_signal(host, signal.SIGTERM)

    def crash(self, host: Host) -> None:
        self.send_signal(host, signal.SIGKILL)

    def hang(self, host: Host) -> None:
        self.send_signal(host, signal.SIGSTOP)

    def unhang(self, host: Host) -> None:
        self.send_signal(host, signal.SIGCONT)

    # ------------------------------------------------------------------ observation
    def rejoined(self, host: Host, since: float) -> bool:
        """True once the daemon on host, (re)started or reconnected at `since` (monotonic), is a
        working member of the cluster again."""
        raise NotImplementedError

    def members(self) -> set[str]:
        """Hosts whose daemon is a live member of the cluster right now."""
        return {h.name for h in self.lab.hosts if self.running(h) and not self.stopped(h)}

    def failover_bound(self) -> float:
        """Seconds within which this daemon, as configured, should have moved the VIP after a crash
        (runs that take longer are listed as anomalies)."""
        return LEASE_TTL + 1.0

    def log_paths(self, host: Host) -> list[Path]:
        return [p.log.path for p in self.host_procs(host)]

    def log_excerpt(self, host: Host, t0: float, t1: float, limit: int = 80) -> list[str]:
        lines = sorted(((ln.t, f"[{p.role}] {ln.raw}") for p in self.host_procs(host)
                        for ln in p.log.select(None, since=t0, until=t1)), key=lambda x: x[0])
        out = [s for _, s in lines]
        return out if len(out) <= limit else out[:limit // 2] + ["..."] + out[-limit // 2:]

    def events_since(self, host: Host, role: str, events: tuple[str, ...], since: float) -> list[C.LogLine]:
        return [ln for p in self.host_procs(host) if p.role == role for ln in p.log.select(events, since=since)]

    def last_event(self, host: Host, role: str, events: tuple[str, ...]) -> str | None:
        last = None
        for p in self.host_procs(host):
            if p.role == role:
                sel = p.log.select(events)
                if sel and (last is None or sel[-1].t >= last.t):
                    last = sel[-1]
        return last.event if last else None

    def footprint_pids(self, host: Host) -> dict[str, list[int]]:
        """The processes whose RSS/CPU make up the daemon's footprint, by role (helpers the bench
        adds, like vip-manager's leader loop, are reported apart)."""
        out: dict[str, list[int]] = {}
        for p in self.host_procs(host):
            if p.alive:
                out.setdefault(p.role, []).extend(C.group_pids(p.popen.pid) or [p.popen.pid])
        return out

    def settings(self) -> dict[str, Any]:
        return {"daemon": self.name}

    # ------------------------------------------------------------------ helpers
    def _spawn(self, host: Host, role: str, argv: list[str], log: Path, classify: Any = None) -> Proc:
        """Start argv in host's namespace. With `classify`, stdout+stderr go through a PipeLogger
        (millisecond stamps, events named by classify); else straight into `log`."""
        log.parent.mkdir(parents=True, exist_ok=True)
        if classify is None:
            popen = self.lab.popen(host.ns, argv, log=log)
            proc = Proc(role, popen, C.KeyValueLog(log, self.clock))
        else:
            popen = self.lab.popen(host.ns, ["sh", "-c", 'exec "$@" 2>&1', "sh", *argv], log=log,
                                   stdout=subprocess.PIPE)
            proc = Proc(role, popen, C.KeyValueLog(log, self.clock),
                        C.PipeLogger(popen.stdout, log, classify))
        return proc


# =========================================================================== vipd

class VipdDriver(DaemonDriver):
    """vipd through vipd.lab.cluster.Cluster: `vipd run -c FILE` in each host namespace, as systemd
    runs it (no ExecStopPost: a SIGKILL leaves only the kernel lifetimes to fence)."""

    name = "vipd"
    PEERS: dict[str, Any] = {}  # [peers] overrides (vipd-tuned)
    REJOIN_EVENTS = ("ready", "lease_granted", "etcd_restored", "transition")  # transition: a thawed owner fenced

    def __init__(self, lab: Lab, workdir: Path, vips: list[VipDef], *, etcd: EtcdServer | None,
                 clock: C.Clock, tag: str = "", timing: dict[str, Any] | None = None,
                 announce: dict[str, Any] | None = None) -> None:
        super().__init__(lab, workdir, vips, etcd=etcd, clock=clock, tag=tag)
        assert etcd is not None
        self.key_prefix = f"/vipd/{lab.prefix}{'-' + tag if tag else ''}/"
        from vipd.config import EtcdConfig
        shipped = timing is not None and "fence_margin" in timing  # --timing defaults: vipd as shipped
        ttl = EtcdConfig().lease_ttl if shipped else LEASE_TTL
        etcd_extra = {"request_timeout": EtcdConfig().request_timeout} if shipped else None
        top = {"peers": dict(self.PEERS)} if self.PEERS else None
        self.cluster = Cluster(lab, workdir, vips, endpoints=[etcd.endpoint], lease_ttl=ttl, etcd_extra=etcd_extra,
                               prefix=self.key_prefix, timing=timing, top_extra=top)
        self.ttl_granted = float(ttl)

    def preflight(self) -> None:
        from vipd import config
        from vipd.errors import ConfigError

        path = self.cluster.write_config(self.lab.hosts[0])
        try:
            config.load(path)
        except ConfigError as e:
            raise RunError(f"vipd rejects the bench configuration ({path}): {e}") from None

    def start(self, host: Host) -> None:
        popen = self.cluster.start(host)
        self.procs[host.name] = [Proc("vipd", popen, C.KeyValueLog(self.cluster.log_path(host), self.clock))]

    def rejoined(self, host: Host, since: float) -> bool:
        return self.running(host) and bool(self.events_since(host, "vipd", self.REJOIN_EVENTS, since))

    def members(self) -> set[str]:
        """Hosts whose presence key (`<prefix>hosts/<node>`, attached to the host lease) is in etcd:
        their lease is alive. Empty when etcd does not answer."""
        assert self.etcd is not None
        key = self.key_prefix + "hosts/"
        end = key[:-1] + chr(ord(key[-1]) + 1)
        b64 = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
        try:
            data = self.etcd.request("/v3/kv/range", {"key": b64(key), "range_end": b64(end)})
        except (OSError, RuntimeError):
            return set()
        names = {base64.b64decode(kv["key"]).decode()[len(key):] for kv in data.get("kvs", [])}
        return {h.name for h in self.lab.hosts if h.name in names and self.running(h)}

    def granted_ttl(self) -> list[int]:
        return sorted({int(ln.fields["ttl"]) for h in self.lab.hosts for p in self.host_procs(h)
                       for ln in p.log.select(["lease_granted"]) if ln.fields.get("ttl", "").isdigit()})

    def failover_bound(self) -> float:
        granted = self.granted_ttl()
        if granted:
            self.ttl_granted = float(max(granted))
        return self.ttl_granted + 1.0

    def settings(self) -> dict[str, Any]:
        from vipd import __version__, config

        h = self.lab.hosts[0]
        path = self.cluster.config_path(h)
        if not path.exists():
            self.cluster.write_config(h)
        cfg = config.load(path)
        return {
            "daemon": "vipd", "version": __version__, "src": str(C.SRC / "vipd"),
            "lease_ttl_asked": cfg.etcd.lease_ttl, "lease_ttl_granted": self.granted_ttl(),
            "request_timeout": cfg.etcd.request_timeout,
            "fence_margin": cfg.timing.fence_margin, "keepalives_per_ttl": cfg.timing.keepalives_per_ttl,
            "reconcile_interval": cfg.timing.reconcile_interval, "release_holdoff": cfg.timing.release_holdoff,
            "announce_count": cfg.vips[0].announce_count, "announce_interval": cfg.vips[0].announce_interval,
            "command": f"vipd run -c {path}",
            "peers": {"enabled": cfg.peers.enabled, "interval": cfg.peers.interval, "lease": cfg.peers.lease,
                      "grace": cfg.peers.grace},
            "summary": (f"peers h {cfg.peers.interval * 1e3:g} / L {cfg.peers.lease * 1e3:g} / G "
                        f"{cfg.peers.grace * 1e3:g} ms, "
                        f"lease TTL {cfg.etcd.lease_ttl} s, {cfg.timing.keepalives_per_ttl} keepalives per TTL, "
                        f"fence_margin {cfg.timing.fence_margin} s, request_timeout {cfg.etcd.request_timeout} s, "
                        f"reconcile {cfg.timing.reconcile_interval} s, {cfg.vips[0].announce_count} GARPs "
                        f"{cfg.vips[0].announce_interval} s apart"),
            "config_example": path.read_text(),
        }


# =========================================================================== keepalived

def keepalived_event(line: str) -> str:
    for needle, event in (("Entering MASTER STATE", "master"), ("Entering BACKUP STATE", "backup"),
                          ("Entering FAULT STATE", "fault"), ("removing VIPs", "vips_removed"),
                          ("setting VIPs", "vips_set"), ("sent 0 priority", "priority0"),
                          ("Receive advertisement timeout", "advert_timeout"),
                          ("received advert from", "higher_prio_advert"), ("Stopped Keepalived", "stopped"),
                          ("Startup complete", "startup_complete"), ("Sending gratuitous ARP", "garp")):
        if needle in line:
            return event
    return ""


class KeepalivedDriver(DaemonDriver):
    """keepalived (the Debian package), VRRP only, one per host, in the foreground:
    `keepalived --dont-fork --log-console --log-detail --use-file CONF --pid P --vrrp_pid P
    --checkers_pid P --bfd_pid P` (separate pid files, so instances in several namespaces coexist).

    Configured as keepalived.conf(5) recommends: every host `state BACKUP` with a different
    priority (h1 150, h2 100, h3 50: "All systems should have different priorities in order to make
    behaviour deterministic") and `nopreempt` ("If you want to stop a higher priority instance
    taking over as master when it starts, configure no_preempt rather than using equal priorities";
    it needs the initial state BACKUP); no authentication (the man page: removed from VRRPv2 by
    RFC 3768, "avoid using if possible"); multicast adverts (the default, 224.0.0.18: the lab bridge
    floods multicast, so unicast_peer, meant for networks without multicast, is not needed).
    Profiles: `keepalived` = VRRPv2, advert_int 1 (the defaults); `keepalived-tuned` = VRRPv3,
    advert_int 0.1 (VRRPv2 counts adverts in whole seconds and rounds sub-second ones up to 1 s).
    Everything else is keepalived's default (garp_master_delay 5, garp_master_repeat 5,
    down timer 3 adverts + skew)."""

    name = "keepalived"
    uses_etcd = False
    PRIORITIES = (150, 100, 50)
    PROFILES: dict[str, dict[str, Any]] = {
        "keepalived": {"vrrp_version": 2, "advert_int": 1},
        "keepalived-tuned": {"vrrp_version": 3, "advert_int": 0.1},
    }

    def __init__(self, lab: Lab, workdir: Path, vips: list[VipDef], *, etcd: EtcdServer | None,
                 clock: C.Clock, tag: str = "", profile: str = "keepalived", layout: str = "per-vip") -> None:
        super().__init__(lab, workdir, vips, etcd=None, clock=clock, tag=tag)
        self.name = profile
        self.profile = dict(self.PROFILES[profile])
        self.layout = layout  # "per-vip": one vrrp_instance per VIP; "one": one instance holding every VIP
        self.first_vrid = 51 if not tag else 101

    def priority(self, host: Host) -> int:
        return self.PRIORITIES[self.lab.hosts.index(host) % len(self.PRIORITIES)]

    def config_text(self, host: Host) -> str:
        p = self.profile
        groups = [[v] for v in self.vips] if self.layout == "per-vip" else [self.vips]
        lines = [f"# keepalived {self.name} for {host.name}: written by bench/_drivers.py. Every setting",
                 "# used is here; anything not named is keepalived's default."]
        if p["vrrp_version"] != 2:
            lines += ["global_defs {", f"    vrrp_version {p['vrrp_version']}", "}"]
        for i, group in enumerate(groups):
            lines += [f"vrrp_instance {self.lab.prefix}_{i} {{",
                      "    state BACKUP",
                      f"    interface {group[0].interface or host.ifname}",
                      f"    virtual_router_id {self.first_vrid + i}",
                      f"    priority {self.priority(host)}",
                      "    nopreempt",
                      f"    advert_int {p['advert_int']:g}",
                      "    virtual_ipaddress {",
                      *(f"        {v.address}" for v in group),
                      "    }", "}"]
        return "\n".join(lines) + "\n"

    def _files(self, host: Host) -> dict[str, Path]:
        d = self.workdir / host.name
        return {"conf": d / "keepalived.conf", "pid": d / "run" / "keepalived.pid",
                "vrrp_pid": d / "run" / "vrrp.pid", "checkers_pid": d / "run" / "checkers.pid",
                "bfd_pid": d / "run" / "bfd.pid", "log": d / "keepalived.log"}

    def argv(self, host: Host) -> list[str]:
        f = self._files(host)
        return ["keepalived", "--dont-fork", "--log-console", "--log-detail", "--use-file", str(f["conf"]),
                "--pid", str(f["pid"]), "--vrrp_pid", str(f["vrrp_pid"]), "--checkers_pid", str(f["checkers_pid"]),
                "--bfd_pid", str(f["bfd_pid"])]

    def preflight(self) -> None:
        h = self.lab.hosts[0]
        f = self._files(h)
        f["conf"].parent.mkdir(parents=True, exist_ok=True)
        f["conf"].write_text(self.config_text(h))
        cp = subprocess.run(["ip", "netns", "exec", h.ns, "keepalived", "--config-test", "--use-file", str(f["conf"])],
                            capture_output=True, text=True, timeout=20)  # in the namespace: it checks the interface
        if cp.returncode != 0:
            raise RunError(f"keepalived rejects {f['conf']}: {(cp.stderr or cp.stdout).strip()}")

    def start(self, host: Host) -> None:
        f = self._files(host)
        f["conf"].parent.mkdir(parents=True, exist_ok=True)
        f["pid"].parent.mkdir(parents=True, exist_ok=True)
        f["conf"].write_text(self.config_text(host))
        # A SIGKILLed keepalived leaves its pid files; its processes are gone (the bench reaped the
        # parent; the orphaned VRRP child may linger as a zombie whose pid keepalived would take for a
        # live daemon), so remove them as a fresh boot's empty /run would.
        for k in ("pid", "vrrp_pid", "checkers_pid", "bfd_pid"):
            f[k].unlink(missing_ok=True)
        self.procs[host.name] = [self._spawn(host, "keepalived", self.argv(host), f["log"], keepalived_event)]

    def crash(self, host: Host) -> None:
        # the parent and its VRRP child at once (one kill(2) on the process group): killing the parent
        # alone would have its child shut down cleanly
        for p in self.host_procs(host):
            if p.alive:
                os.killpg(p.popen.pid, signal.SIGKILL)

    def hang(self, host: Host) -> None:
        for p in self.host_procs(host):
            if p.alive:
                os.killpg(p.popen.pid, signal.SIGSTOP)

    def unhang(self, host: Host) -> None:
        for p in self.host_procs(host):
            if p.alive:
                os.killpg(p.popen.pid, signal.SIGCONT)

    def planned_stop(self, host: Host) -> None:
        self.send_signal(host, signal.SIGTERM)  # the parent: it stops the VRRP child (priority 0 advert)

    def stopped(self, host: Host) -> bool:
        return any(process_state(pid) == "T" for p in self.host_procs(host) if p.alive
                   for pid in (C.group_pids(p.popen.pid) or [p.popen.pid]))

    STATE_EVENTS = ("master", "backup", "fault")

    def rejoined(self, host: Host, since: float) -> bool:
        """A state line (BACKUP / MASTER) after `since`; after SIGCONT keepalived may log nothing (it
        just carries on), so a running, continued daemon counts after 3 adverts + 1 s."""
        if not self.running(host) or self.stopped(host):
            return False
        if self.events_since(host, "keepalived", ("master", "backup"), since):
            return True
        if self.last_event(host, "keepalived", self.STATE_EVENTS) in ("master", "backup"):
            return time.monotonic() - since > 3 * self.profile["advert_int"] + 1.0
        return False

    def members(self) -> set[str]:
        return {h.name for h in self.lab.hosts if self.running(h) and not self.stopped(h)
                and self.last_event(h, "keepalived", self.STATE_EVENTS) in ("master", "backup")}

    def failover_bound(self) -> float:
        a = self.profile["advert_int"]
        return 3 * a + a + 0.5  # master down interval (3 adverts + skew < 1 advert) + slack

    def settings(self) -> dict[str, Any]:
        h = self.lab.hosts[0]
        p = self.profile
        return {
            "daemon": self.name, "version": C.tool_version(["keepalived", "--version"]),
            "vrrp_version": p["vrrp_version"], "advert_int": p["advert_int"],
            "priorities": {x.name: self.priority(x) for x in self.lab.hosts},
            "state": "BACKUP", "nopreempt": True, "transport": "multicast 224.0.0.18 (the default)",
            "authentication": None, "layout": self.layout,
            "command": " ".join(self.argv(h)),
            "summary": (f"VRRPv{p['vrrp_version']}, advert_int {p['advert_int']:g} s, state BACKUP, priorities "
                        f"{'/'.join(str(self.priority(x)) for x in self.lab.hosts)}, nopreempt, multicast, "
                        f"no authentication; defaults otherwise (garp_master_delay 5, garp_master_repeat 5)"),
            "config_example": self.config_text(h),
        }


# =========================================================================== vip-manager

def vip_manager_event(line: str) -> str:
    for needle, event in (("Configuring address", "configure"), ("Removing address", "remove"),
                          ("etcd error", "etcd_error"), ("Received exit signal", "exit_signal"),
                          ("Sent gratuitous ARP", "garp"), (" state is ", "state")):
        if needle in line:
            return event
    return ""


class VipManagerDriver(DaemonDriver):
    """vip-manager 1.0.2 (the Debian package) plus bench/leader_loop.py on every host.

    vip-manager holds the VIP while the etcd (v2 API) key `--trigger-key` equals `--trigger-value`
    (the host's name). It polls the key every `interval` (1000 ms, the default) with a quorum GET
    and a 1 s request timeout; on an etcd error it treats the host as not the leader (drops the VIP).
    It is started with the flags of the packaged unit (vip-manager.service: --ip --interface
    --trigger-key --trigger-value --dcs-type --dcs-endpoints --netmask) and defaults for the rest
    (interval 1000, retry-after 250, retry-num 3, manager-type basic). One vip-manager per VIP (it
    manages exactly one address); all follow the same key.

    The leader loop (Patroni's role, bench/leader_loop.py) campaigns for that key with an etcd v2
    TTL equal to vipd's lease TTL (3 s) and refreshes it every TTL/3; on SIGTERM it deletes the key.
    A "daemon" fault hits both processes of the host (SIGTERM / SIGKILL / SIGSTOP to the leader loop
    and vip-manager): together they do what vipd does alone. etcd runs with --enable-v2=true."""

    name = "vip-manager"
    etcd_args = ("--enable-v2=true",)
    LEADER_EVENTS = ("leader", "follower", "lost", "etcd_ok", "etcd_error")

    def __init__(self, lab: Lab, workdir: Path, vips: list[VipDef], *, etcd: EtcdServer | None,
                 clock: C.Clock, tag: str = "") -> None:
        super().__init__(lab, workdir, vips, etcd=etcd, clock=clock, tag=tag)
        assert etcd is not None
        self.key = f"/service/{lab.prefix}{'-' + tag if tag else ''}/leader"

    def vm_argv(self, host: Host, vip: VipDef) -> list[str]:
        import ipaddress

        iface = ipaddress.ip_interface(vip.address)
        assert self.etcd is not None
        return ["vip-manager", f"--ip={iface.ip}", f"--interface={vip.interface or host.ifname}",
                f"--trigger-key={self.key}", f"--trigger-value={host.name}", "--dcs-type=etcd",
                f"--dcs-endpoints={self.etcd.endpoint}", f"--netmask={iface.network.prefixlen}"]

    def ll_argv(self, host: Host) -> list[str]:
        assert self.etcd is not None
        return [sys.executable, str(BENCH / "leader_loop.py"), "--endpoint", self.etcd.endpoint, "--key", self.key,
                "--name", host.name, "--ttl", str(LEASE_TTL)]

    def start(self, host: Host) -> None:
        d = self.workdir / host.name
        procs = [self._spawn(host, "leader-loop", self.ll_argv(host), d / "leader-loop.log")]
        for i, v in enumerate(self.vips):
            procs.append(self._spawn(host, "vip-manager", self.vm_argv(host, v),
                                     d / (f"vip-manager-{i}.log" if len(self.vips) > 1 else "vip-manager.log"),
                                     vip_manager_event))
        self.procs[host.name] = procs

    def planned_stop(self, host: Host) -> None:
        self.send_signal(host, signal.SIGTERM)  # the leader loop first (it releases the key), then vip-manager

    def wait_exit(self, host: Host, timeout: float) -> int | None:
        code = super().wait_exit(host, timeout)
        ps = self.host_procs(host)
        vm = [p.popen.returncode for p in ps if p.role == "vip-manager"]
        return vm[0] if vm and code is not None else code

    def rejoined(self, host: Host, since: float) -> bool:
        if not self.running(host) or self.stopped(host):
            return False
        return bool(self.events_since(host, "leader-loop", ("leader", "follower", "etcd_ok"), since))

    def members(self) -> set[str]:
        return {h.name for h in self.lab.hosts if self.running(h) and not self.stopped(h)
                and self.last_event(h, "leader-loop", self.LEADER_EVENTS) in ("leader", "follower", "etcd_ok", "lost")}

    def failover_bound(self) -> float:
        return LEASE_TTL + 0.5 + 1.0 + 0.5  # key TTL + etcd's expiry sweep (0.5 s) + one poll + slack

    def footprint_pids(self, host: Host) -> dict[str, list[int]]:
        return {p.role: [q.popen.pid for q in self.host_procs(host) if q.role == p.role and q.alive]
                for p in self.host_procs(host)}

    def settings(self) -> dict[str, Any]:
        h = self.lab.hosts[0]
        return {
            "daemon": self.name, "version": C.tool_version(["vip-manager", "--version"]),
            "interval_ms": 1000, "retry_after_ms": 250, "retry_num": 3, "manager_type": "basic",
            "dcs": "etcd v2 API (etcd --enable-v2=true)", "trigger_key": self.key,
            "leader_key_ttl_s": LEASE_TTL, "leader_refresh_s": LEASE_TTL / 3,
            "command": " ".join(self.vm_argv(h, self.vips[0])),
            "leader_loop": " ".join(self.ll_argv(h)),
            "summary": (f"interval 1000 ms, retry-after 250 ms, retry-num 3 (defaults); leader key TTL {LEASE_TTL} s "
                        f"(= vipd's lease TTL), refreshed every {LEASE_TTL / 3:g} s, released on SIGTERM; "
                        f"etcd --enable-v2=true"),
        }


def make_driver(daemon: str, lab: Lab, workdir: Path, vips: list[VipDef], *, etcd: EtcdServer | None,
                clock: C.Clock, tag: str = "", timing: dict[str, Any] | None = None,
                layout: str = "per-vip") -> DaemonDriver:
    if daemon == "vipd":
        return VipdDriver(lab, workdir, vips, etcd=etcd, clock=clock, tag=tag, timing=timing)
    if daemon == "vipd-tuned":
        return VipdTunedDriver(lab, workdir, vips, etcd=etcd, clock=clock, tag=tag, timing=timing)
    if daemon in KeepalivedDriver.PROFILES:
        return KeepalivedDriver(lab, workdir, vips, etcd=etcd, clock=clock, tag=tag, profile=daemon, layout=layout)
    if daemon == "vip-manager":
        return VipManagerDriver(lab, workdir, vips, etcd=etcd, clock=clock, tag=tag)
    raise ValueError(daemon)


class VipdTunedDriver(VipdDriver):
    """vipd with faster heartbeats: h 5 ms, L 45 ms, G 65 ms (G - L = 20 ms, the least vipd accepts)."""

    name = "vipd-tuned"
    PEERS = {"interval": 0.005, "lease": 0.045, "grace": 0.065}


CLASSES: dict[str, type[DaemonDriver]] = {"vipd": VipdDriver, "vipd-tuned": VipdTunedDriver, "keepalived": KeepalivedDriver,
                                          "keepalived-tuned": KeepalivedDriver, "vip-manager": VipManagerDriver}
DAEMONS = tuple(CLASSES)
USES_ETCD = {d: c.uses_etcd for d, c in CLASSES.items()}  # False: no etcd in the lab, no etcd-restart fault
ETCD_ARGS = {d: c.etcd_args for d, c in CLASSES.items()}  # extra etcd flags (vip-manager: the v2 API)

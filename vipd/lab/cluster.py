"""vipd on every host of a namespace Lab, started exactly as systemd starts it (`vipd run -c FILE`).

Shared by the lab tests, bench/ and `vipd demo`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from vipd.lab.topology import Host, Lab


def vipd_argv() -> list[str]:
    """The installed console script when there is one (what the unit runs), else `python -m vipd`."""
    script = Path(sys.executable).with_name("vipd")
    if script.exists():
        return [str(script)]
    found = shutil.which("vipd")
    return [found] if found else [sys.executable, "-m", "vipd"]


@dataclass
class VipDef:
    name: str
    address: str
    interface: str | None = None  # None: the host's lab NIC
    extra: dict[str, Any] = field(default_factory=dict)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_toml(top: dict[str, Any], tables: dict[str, dict[str, Any]], vips: Iterable[dict[str, Any]],
                egress: Iterable[dict[str, Any]] = ()) -> str:
    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items()]
    for name, table in tables.items():
        lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    for kind, items in (("vip", vips), ("egress", egress)):
        for item in items:
            lines += ["", f"[[{kind}]]"] + [f"{k} = {_toml_value(v)}" for k, v in item.items()]
    return "\n".join(lines) + "\n"


class Cluster:
    def __init__(self, lab: Lab, workdir: str | Path, vips: list[VipDef], *, endpoints: list[str],
                 lease_ttl: int = 3, etcd_extra: dict[str, Any] | None = None,
                 timing: dict[str, Any] | None = None, prefix: str = "/vipd/lab/",
                 placement: dict[str, Any] | None = None, host_extra: dict[str, dict[str, Any]] | None = None,
                 top_extra: dict[str, dict[str, Any]] | None = None) -> None:
        self.lab = lab
        self.dir = Path(workdir)
        self.vips = vips
        self.endpoints = endpoints
        self.lease_ttl = lease_ttl
        # The lab's fast profile (one etcd, lease TTL 3 s): vipd's pre-cluster defaults, pinned here so
        # that lab tests keep their timing; vipd's own defaults ride out etcd leader changes instead.
        self.etcd_extra = {"request_timeout": 0.5, **(etcd_extra or {})}
        self.timing = {"fence_margin": 1.5, "keepalives_per_ttl": 6, "reconcile_interval": 0.5,
                       "release_holdoff": 2.0, **(timing or {})}
        self.prefix = prefix
        # preemption off unless asked: the core tests watch one failover at a time
        self.placement = {"preempt": False, **(placement or {})}
        self.host_extra = host_extra or {}  # per host name: extra [host] table keys (weight, check, ...)
        self.top_extra = top_extra or {}  # extra tables for every host, e.g. {"hooks": {...}}
        self.host_tables: dict[str, dict[str, dict[str, Any]]] = {}  # per host name: its own tables, e.g. [bgp]
        self.egress: list[dict[str, Any]] = []  # [[egress]] tables for every host
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def host(self, name: str) -> Host:
        return next(h for h in self.lab.hosts if h.name == name)

    def config_path(self, host: Host) -> Path:
        return self.dir / host.name / "vipd.toml"

    def log_path(self, host: Host) -> Path:
        return self.dir / host.name / "vipd.log"

    def write_config(self, host: Host, **etcd_overrides: Any) -> Path:
        path = self.config_path(host)
        path.parent.mkdir(parents=True, exist_ok=True)
        etcd = {"endpoints": self.endpoints, "prefix": self.prefix, "lease_ttl": self.lease_ttl,
                **self.etcd_extra, **etcd_overrides}
        vips = [{"name": v.name, "address": v.address, "interface": v.interface or host.ifname,
                 "announce_count": 3, "announce_interval": 0.1, **v.extra} for v in self.vips]
        tables = {"etcd": etcd, "timing": self.timing, "metrics": {"listen": "127.0.0.1:9654"},
                  "placement": self.placement, **self.top_extra}
        if host.name in self.host_extra:
            tables["host"] = self.host_extra[host.name]
        tables.update(self.host_tables.get(host.name, {}))
        path.write_text(render_toml({"node": host.name, "state_dir": str(path.parent / "run"), "log_level": "info"},
                                    tables, vips, self.egress))
        return path

    def start(self, host: Host, **etcd_overrides: Any) -> subprocess.Popen[bytes]:
        path = self.write_config(host, **etcd_overrides)
        proc = self.lab.popen(host.ns, [*vipd_argv(), "run", "-c", str(path)], log=self.log_path(host))
        self.procs[host.name] = proc
        return proc

    def start_all(self) -> None:
        for h in self.lab.hosts:
            self.start(h)

    def signal(self, host: Host, sig: signal.Signals) -> None:
        proc = self.procs[host.name]
        if proc.poll() is None:
            os.kill(proc.pid, sig)

    def term(self, host: Host, timeout: float = 10.0) -> int:
        """SIGTERM and wait for a clean exit; returns the exit code."""
        self.signal(host, signal.SIGTERM)
        return self.procs[host.name].wait(timeout)

    def kill(self, host: Host) -> None:
        self.signal(host, signal.SIGKILL)
        self.procs[host.name].wait(5)

    def run_cli(self, host: Host, *args: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
        """A `vipd` subcommand inside the host's namespace, against its config."""
        return subprocess.run(["ip", "netns", "exec", host.ns, *vipd_argv(), *args, "-c", str(self.config_path(host))],
                              capture_output=True, text=True, timeout=timeout)

    def metrics(self, host: Host) -> str:
        out = subprocess.run(["ip", "netns", "exec", host.ns, sys.executable, "-c",
                              "import urllib.request;print(urllib.request.urlopen("
                              "'http://127.0.0.1:9654/metrics',timeout=3).read().decode())"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout

    def wait_holders(self, ip: Any, predicate: Any, timeout: float = 15.0, interval: float = 0.02) -> list[str]:
        """Poll lab.holders(ip) until predicate(holders) is true; AssertionError with the logs if not."""
        deadline = time.monotonic() + timeout
        holders = self.lab.holders(ip)
        while not predicate(holders):
            if time.monotonic() > deadline:
                raise AssertionError(f"{ip}: holders {holders} after {timeout}s\n{self.log_tail()}")
            time.sleep(interval)
            holders = self.lab.holders(ip)
        return holders

    def wait_owner(self, ip: Any, timeout: float = 15.0, exclude: Iterable[str] = ()) -> str:
        excl = set(exclude)
        holders = self.wait_holders(ip, lambda hs: len(hs) == 1 and hs[0] not in excl, timeout)
        return holders[0]

    def log_tail(self, lines: int = 15) -> str:
        out = []
        for h in self.lab.hosts:
            p = self.log_path(h)
            if p.exists():
                tail = p.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {h.name} ---\n" + "\n".join(tail))
        return "\n".join(out)

    def stop_all(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

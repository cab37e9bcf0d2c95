"""DSR lab plumbing: a vipd.lab.dsr_node per host (driven over its stdin), backend servers and client
tools from vipd.lab.dsr_apps, and tcpdump captures, all inside one Lab's namespaces."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from vipd.lab import netns
from vipd.lab.topology import Host, Lab

PORT = 8080


def config_toml(node: str, vip: str, interface: str, backends: Sequence[Host], *, mode: str = "single",
                service_interface: str | None = None) -> str:
    bl = ", ".join(f'{{ node = "{b.name}", address = "{b.ip.ip}" }}' for b in backends)
    extra = f'mode = "{mode}"\n' if mode != "single" else ""
    sif = f'interface = "{service_interface}"\n' if service_interface else ""
    return (f'node = "{node}"\nmetrics.listen = ""\n[[vip]]\nname = "web"\naddress = "{vip}"\n'
            f'interface = "{interface}"\nconflict_check = false\n{extra}'
            f'[[vip.service]]\nprotocol = "tcp"\nport = {PORT}\n{sif}backends = [{bl}]\ncheck_interval = 0.5\n'
            f'check_timeout = 0.3\n')


class Node:
    """One host's vipd.lab.dsr_node process."""

    def __init__(self, lab: Lab, host: Host, workdir: Path, toml: str, env: dict[str, str] | None = None) -> None:
        self.lab, self.host = lab, host
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / f"{host.name}.toml"
        self.config.write_text(toml)
        self.log = open(workdir / f"{host.name}.log", "ab")
        self.proc = subprocess.Popen(netns.exec_argv(host.ns, [sys.executable, "-m", "vipd.lab.dsr_node", str(self.config)]),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        lab.add_cleanup(self.stop)
        self.ready = self._read(30.0)

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError(f"{self.host.name}: dsr_node did not answer in {timeout}s (see its log)")
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.host.name}: dsr_node exited ({self.proc.poll()}); see its log")
            return dict(json.loads(line))

    def cmd(self, line: str, timeout: float = 20.0) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def kill(self) -> None:
        """SIGKILL: no code of vipd runs after this."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # EOF: the node cancels, detaches, restores
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


def app_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "vipd.lab.dsr_apps", *args]


def start_servers(lab: Lab, backends: Sequence[Host], workdir: Path) -> dict[str, Path]:
    logs = {}
    for b in backends:
        logs[b.name] = workdir / f"serve-{b.name}.log"
        lab.popen(b, app_argv("serve", str(PORT), b.name), log=logs[b.name])
    deadline = time.monotonic() + 15
    for b in backends:
        while f":{PORT:X} " not in _listening(lab, b):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{b.name}: server not listening")
            time.sleep(0.05)
    return logs


def _listening(lab: Lab, h: Host) -> str:
    return lab.run(h, ["cat", "/proc/net/tcp6"]).stdout


def peers_seen(log: Path) -> list[str]:
    return [json.loads(line)["peer"] for line in log.read_text().splitlines() if line.startswith("{")]


class Capture:
    """tcpdump -e on a host's NIC into a text file, stopped (SIGINT) by stop()."""

    def __init__(self, lab: Lab, host: Host, workdir: Path, bpf_filter: str) -> None:
        self.path = workdir / f"tcpdump-{host.name}-{time.monotonic_ns()}.txt"
        self.proc = lab.popen(host, ["tcpdump", "-i", host.ifname, "-e", "-n", "-l", "-U", bpf_filter],
                              log=self.path.with_suffix(".err"), stdout=open(self.path, "wb"))
        deadline = time.monotonic() + 10
        while b"listening on" not in self.path.with_suffix(".err").read_bytes():
            if time.monotonic() > deadline:
                raise TimeoutError("tcpdump did not start")
            time.sleep(0.05)

    def stop(self) -> list[str]:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(10)
        return [line for line in self.path.read_text().splitlines() if line.strip()]

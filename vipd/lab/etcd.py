"""A real single-member `etcd` process for tests, the lab and the demo.

Every server gets `--experimental-watch-progress-notify-interval` = PROGRESS_NOTIFY_INTERVAL: vipd's
watch treats a stream that stays silent for 3 such intervals (+ request timeout) as dead, so etcd must
send progress notifications at least that often (etcd's default is 10 minutes).
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any, Callable, Sequence, TypeVar

from vipd.lab import netns as netns_mod
from vipd.lab.certs import TlsFiles

PROGRESS_NOTIFY_INTERVAL = 1.0  # seconds; matches EtcdClient.watch_prefix(progress_interval=1.0)
T = TypeVar("T")
_running: set["EtcdServer"] = set()  # stopped at interpreter exit if a finalizer was skipped
atexit.register(lambda: [s.stop() for s in list(_running)])  # type: ignore[func-returns-value]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago (bind to port 0)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """Run fn inside network namespace `netns` (None: just call it)."""
    return fn() if netns is None else netns_mod.call_in(netns, fn)


class EtcdServer:
    """One etcd member. Working files live in data_dir: `data/` (etcd's store) and `etcd.log`."""

    def __init__(self, data_dir: str | Path, *, host: str = "127.0.0.1", client_port: int | None = None,
                 peer_port: int | None = None, netns: str | None = None, tls: TlsFiles | None = None,
                 client_cert_auth: bool = False, fast: bool = True, extra_args: Sequence[str] = (),
                 name: str = "vtetcd") -> None:
        self.dir = Path(data_dir)
        self.host = host
        self.netns = netns
        probe_host = host if netns is None else "127.0.0.1"  # in a fresh netns any port is free
        self.client_port = client_port or free_port(probe_host)
        self.peer_port = peer_port or free_port(probe_host)
        while self.peer_port == self.client_port:
            self.peer_port = free_port(probe_host)
        self.tls = tls
        self.client_cert_auth = client_cert_auth
        self.fast = fast
        self.extra_args = tuple(extra_args)
        self.name = name
        self.auth: tuple[str, str] | None = None  # (user, password) once enable_auth() ran
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def _url(self, scheme: str, port: int) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{port}"

    @property
    def endpoint(self) -> str:
        return self._url("https" if self.tls else "http", self.client_port)

    @property
    def log_path(self) -> Path:
        return self.dir / "etcd.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def args(self) -> list[str]:
        """The etcd command line (without the netns wrapper)."""
        peer = self._url("http", self.peer_port)
        args = ["etcd", "--name", self.name, "--data-dir", str(self.dir / "data"),
                "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"{self.name}={peer}", "--initial-cluster-state", "new",
                "--experimental-watch-progress-notify-interval", f"{int(PROGRESS_NOTIFY_INTERVAL * 1000)}ms"]
        if self.fast:
            args += ["--heartbeat-interval", "50", "--election-timeout", "500"]
        if self.tls:
            args += ["--cert-file", str(self.tls.server_cert), "--key-file", str(self.tls.server_key)]
            if self.client_cert_auth:
                args += ["--client-cert-auth", "--trusted-ca-file", str(self.tls.ca)]
        return args + list(self.extra_args)

    def start(self, timeout: float = 10.0) -> None:
        """Start etcd and wait until /health answers; RuntimeError with the log tail if it does not."""
        if self.pid is not None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        cmd = self.args() if self.netns is None else ["ip", "netns", "exec", self.netns, *self.args()]
        self._log = open(self.log_path, "ab")
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        _running.add(self)
        if not in_netns(self.netns, lambda: self._wait_healthy(timeout)):
            why = "exited" if self._proc.poll() is not None else f"was not healthy after {timeout}s"
            self.stop()
            raise RuntimeError(f"etcd {why} ({' '.join(cmd)}); log tail:\n{self.log_tail()}")

    def _wait_healthy(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._proc is not None and self._proc.poll() is None and time.monotonic() < deadline:
            if self._healthy():
                return True
            time.sleep(0.02)  # no readiness event to wait on: poll /health, bounded by timeout
        return False

    def _open(self, req: str | urllib.request.Request, timeout: float) -> Any:
        """urlopen without environment proxies, with the client certificate when TLS is on."""
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
        if self.tls is not None:
            ctx = ssl.create_default_context(cafile=str(self.tls.ca))
            ctx.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
            handlers.append(urllib.request.HTTPSHandler(context=ctx))
        return urllib.request.build_opener(*handlers).open(req, timeout=timeout)

    def _healthy(self) -> bool:
        try:
            with self._open(self.endpoint + "/health", 0.5) as r:
                return json.load(r).get("health") == "true"
        except (OSError, ValueError):
            return False

    def request(self, path: str, body: dict[str, Any], token: str | None = None) -> dict[str, Any]:
        """One JSON POST to the v3 gateway (e.g. "/v3/kv/compaction"); raises RuntimeError on an etcd error."""
        req = urllib.request.Request(self.endpoint + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": token} if token else {})

        def post() -> dict[str, Any]:
            try:
                with self._open(req, 5) as r:
                    return json.load(r)
            except urllib.error.HTTPError as e:
                raise RuntimeError(f"etcd {path}: HTTP {e.code}: {e.read().decode(errors='replace')}") from None

        return in_netns(self.netns, post)

    def enable_auth(self, user: str, password: str) -> None:
        """Create user root (and `user`, with role root) with `password`, then enable auth (via the gateway)."""
        self.request("/v3/auth/role/add", {"name": "root"})
        for name in dict.fromkeys(["root", user]):
            self.request("/v3/auth/user/add", {"name": name, "password": password})
            self.request("/v3/auth/user/grant", {"user": name, "role": "root"})
        self.request("/v3/auth/enable", {})
        self.auth = (user, password)

    def _signal(self, sig: signal.Signals) -> None:
        if self.pid is not None:
            self._proc.send_signal(sig)  # type: ignore[union-attr]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s. Idempotent."""
        if self._proc is not None:
            self._signal(signal.SIGCONT)  # a paused etcd cannot handle SIGTERM
            self._signal(signal.SIGTERM)
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        _running.discard(self)
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """SIGKILL (a crash, for fault tests)."""
        if self._proc is not None:
            self._proc.kill()
        self.stop()

    def pause(self) -> None:
        """SIGSTOP: the process keeps its sockets but answers nothing (a hung server)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def restart(self, timeout: float = 10.0) -> None:
        """Stop and start again with the same data dir and ports."""
        self.stop()
        self.start(timeout)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> "EtcdServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EtcdServer({self.endpoint}, dir={str(self.dir)!r}, pid={self.pid})"

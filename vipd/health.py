"""Health checks with rise/fall hysteresis: TCP connect, HTTP(S) GET, a command, interface carrier.

A check table in the config (``[[vip]] check = [...]`` or a host-wide ``[[check]]``)::

    {type = "tcp",     host = "127.0.0.1", port = 6443}
    {type = "http",    url = "https://127.0.0.1:6443/readyz", expect_status = 200, insecure = true}
    {type = "http",    url = "https://api.local:8443/healthz", ca_file = "/etc/vipd/ca.crt",
                       cert_file = "/etc/vipd/client.crt", key_file = "/etc/vipd/client.key"}
    {type = "command", command = ["/usr/local/bin/is-ready", "--quiet"]}
    {type = "carrier", interface = "eth0"}

and on every type: ``name`` (for logs and status; default: a description), ``interval`` (2 s,
start to start), ``timeout`` (1 s, at most ``interval``), ``rise`` (2 successes in a row to become
healthy), ``fall`` (3 failures in a row to become unhealthy). ``insecure`` (no certificate check)
is allowed only for https URLs on localhost or a loopback address.

Semantics: a check starts *unknown*, which counts as unhealthy: a host is healthy only after
``rise`` successes, so a daemon that just started does not campaign on an unproven service. A check
that outlives its timeout is cancelled and counts as failed (a command's whole process group is
killed). Every check runs in its own task on its own clock, so a hung one never delays another.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import ssl
import sys
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

import httpx
import trio

from vipd import log
from vipd.errors import ConfigError, DataplaneError, VipdError
from vipd.hooks import run_command

if sys.version_info < (3, 11):  # pragma: no cover - trio depends on exceptiongroup there
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:  # config.py imports this module: keep pyroute2 out of config parsing
    from vipd.dataplane.netlink import Netlink

TYPES = ("tcp", "http", "command", "carrier")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$")
_IFNAME_RE = re.compile(r"^[^/\s:]{1,15}$")


class CheckFailed(VipdError):
    """One run of a health check failed (refused, wrong status, exit status, no carrier, timeout)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ------------------------------------------------------------------------------- specs

@dataclass(frozen=True, kw_only=True)
class _Common:
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    name: str = ""  # "" -> describe()


@dataclass(frozen=True)
class TcpCheck(_Common):
    host: str
    port: int

    def describe(self) -> str:
        return f"tcp:{self.host}:{self.port}"


@dataclass(frozen=True)
class HttpCheck(_Common):
    url: str
    expect_status: int = 200
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False

    def describe(self) -> str:
        return f"http:{self.url}"


@dataclass(frozen=True)
class CommandCheck(_Common):
    argv: tuple[str, ...]

    def describe(self) -> str:
        return f"command:{os.path.basename(self.argv[0])}"


@dataclass(frozen=True)
class CarrierCheck(_Common):
    interface: str

    def describe(self) -> str:
        return f"carrier:{self.interface}"


CheckSpec = Union[TcpCheck, HttpCheck, CommandCheck, CarrierCheck]


def check_name(spec: CheckSpec) -> str:
    return spec.name or spec.describe()


# ------------------------------------------------------------------------------- parsing

class _Reader:
    def __init__(self, table: Any, path: str) -> None:
        if not isinstance(table, dict):
            raise ConfigError(path, f"must be a table, got {type(table).__name__}")
        self.table, self.path, self.used = table, path, {"type"}

    def key(self, k: str) -> str:
        return f"{self.path}.{k}"

    def get(self, k: str, types: tuple[type, ...], default: Any = None, what: str = "") -> Any:
        self.used.add(k)
        if k not in self.table:
            return default
        v = self.table[k]
        if isinstance(v, bool) != (bool in types) or not isinstance(v, types):
            raise ConfigError(self.key(k), f"expected {what or types[0].__name__}, got {type(v).__name__}")
        return v

    def require(self, k: str, types: tuple[type, ...], what: str = "") -> Any:
        if k not in self.table:
            raise ConfigError(self.key(k), "is required")
        return self.get(k, types, what=what)

    def number(self, k: str, default: float, lo: float, hi: float) -> float:
        v = float(self.get(k, (int, float), default, "a number"))
        if not lo < v <= hi:
            raise ConfigError(self.key(k), f"must be > {lo:g} and <= {hi:g}, got {v:g}")
        return v

    def integer(self, k: str, default: int, lo: int, hi: int) -> int:
        v = self.get(k, (int,), default, "an integer")
        if not lo <= v <= hi:
            raise ConfigError(self.key(k), f"must be between {lo} and {hi}, got {v}")
        return int(v)

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise ConfigError(self.key(unknown[0]), "unknown key")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_http(r: _Reader) -> dict[str, Any]:
    url = r.require("url", (str,), "a string")
    parts = urllib.parse.urlsplit(url)
    try:
        parts.port
    except ValueError:
        raise ConfigError(r.key("url"), f"bad port in {url!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(r.key("url"), f"not an http(s)://host[:port]/path URL: {url!r}")
    status = r.integer("expect_status", 200, 100, 599)
    files = {k: r.get(k, (str,), None, "a string") for k in ("ca_file", "cert_file", "key_file")}
    if (files["cert_file"] is None) != (files["key_file"] is None):
        raise ConfigError(r.key("cert_file" if files["cert_file"] is None else "key_file"),
                          "cert_file and key_file go together")
    insecure = r.get("insecure", (bool,), False, "a boolean")
    if parts.scheme == "http" and any(v is not None for v in files.values()):
        raise ConfigError(r.key(next(k for k, v in files.items() if v is not None)), "applies to https URLs only")
    if insecure:
        if parts.scheme != "https":
            raise ConfigError(r.key("insecure"), "applies to https URLs only")
        if files["ca_file"] is not None:
            raise ConfigError(r.key("insecure"), "give ca_file or insecure = true, not both")
        if not _loopback(parts.hostname):
            raise ConfigError(r.key("insecure"), f"allowed only for localhost or loopback URLs, not {parts.hostname}")
    return dict(url=url, expect_status=status, insecure=insecure, **files)


def parse_check(table: Any, key_path: str) -> CheckSpec:
    """One check table -> its frozen spec. ConfigError(key, reason) for any bad value or unknown key."""
    r = _Reader(table, key_path)
    kind = r.require("type", (str,), "a string")
    if kind not in TYPES:
        raise ConfigError(r.key("type"), f"must be one of {', '.join(TYPES)}, got {kind!r}")
    interval = r.number("interval", 2.0, 0.0, 3600.0)
    timeout = r.number("timeout", min(1.0, interval), 0.0, 3600.0)
    if timeout > interval:
        raise ConfigError(r.key("timeout"), f"must not exceed interval ({interval:g}), got {timeout:g}")
    common: dict[str, Any] = dict(interval=interval, timeout=timeout, rise=r.integer("rise", 2, 1, 100),
                                  fall=r.integer("fall", 3, 1, 100))
    name = r.get("name", (str,), "", "a string")
    if name and not _NAME_RE.match(name):
        raise ConfigError(r.key("name"), f"{name!r} is not a valid name (letters, digits, '_', '.', ':', '-')")
    common["name"] = name
    spec: CheckSpec
    if kind == "tcp":
        host = r.require("host", (str,), "a string")
        if not host or any(c.isspace() for c in host):
            raise ConfigError(r.key("host"), f"not a host name or address: {host!r}")
        port = r.require("port", (int,), "an integer")
        if not 1 <= port <= 65535:
            raise ConfigError(r.key("port"), f"must be between 1 and 65535, got {port}")
        spec = TcpCheck(host, port, **common)
    elif kind == "http":
        spec = HttpCheck(**_parse_http(r), **common)
    elif kind == "command":
        argv = r.require("command", (list,), "a list of strings")
        if not argv:
            raise ConfigError(r.key("command"), "needs at least the program")
        for i, a in enumerate(argv):
            if not isinstance(a, str) or (i == 0 and not a) or "\0" in a:
                raise ConfigError(f"{r.key('command')}[{i}]", f"expected a {'non-empty ' if i == 0 else ''}string")
        spec = CommandCheck(tuple(argv), **common)
    else:
        ifname = r.require("interface", (str,), "a string")
        if not _IFNAME_RE.match(ifname):
            raise ConfigError(r.key("interface"), f"{ifname!r} is not a valid interface name")
        spec = CarrierCheck(ifname, **common)
    r.done()
    return spec


def check_host(spec: CheckSpec, key_path: str, sys_class_net: str = "/sys/class/net") -> None:
    """Read-only checks against this host: files readable, program executable, interface present."""
    if isinstance(spec, HttpCheck):
        for k in ("ca_file", "cert_file", "key_file"):
            f = getattr(spec, k)
            if f is not None and not os.access(f, os.R_OK):
                raise ConfigError(f"{key_path}.{k}", f"cannot read {f}")
    elif isinstance(spec, CommandCheck):
        prog = spec.argv[0] if os.sep in spec.argv[0] else shutil.which(spec.argv[0])
        if prog is None or not os.path.isfile(prog) or not os.access(prog, os.X_OK):
            raise ConfigError(f"{key_path}.command[0]", f"{spec.argv[0]!r} is not an executable file")
    elif isinstance(spec, CarrierCheck) and not os.path.exists(os.path.join(sys_class_net, spec.interface)):
        raise ConfigError(f"{key_path}.interface", f"no interface {spec.interface!r} on this host")


# ------------------------------------------------------------------------------- hysteresis

class Hysteresis:
    """rise / fall debouncing, pure. ``state`` is True (healthy), False, or None (unknown).

    From a known state it flips after ``rise`` successes (to True) or ``fall`` failures (to False)
    in a row; from unknown, whichever run completes first decides. A contrary observation resets
    the run. :meth:`observe` returns the new state when it flips, else None.
    """

    def __init__(self, rise: int, fall: int, initial: bool | None = False) -> None:
        if rise < 1 or fall < 1:
            raise ValueError("rise and fall must be >= 1")
        self.rise, self.fall, self.state = rise, fall, initial
        self._run = 0  # length of the current run of observations of value _last
        self._last: bool | None = None

    def observe(self, ok: bool) -> bool | None:
        ok = bool(ok)
        if ok is self.state:
            self._run, self._last = 0, None
            return None
        if ok is not self._last:
            self._run, self._last = 0, ok
        self._run += 1
        if self._run >= (self.rise if ok else self.fall):
            self.state, self._run, self._last = ok, 0, None
            return ok
        return None


# ------------------------------------------------------------------------------- one run

_ssl_cache: dict[tuple[Any, ...], ssl.SSLContext] = {}


def _mtime(path: str | None) -> float | None:
    try:
        return os.stat(path).st_mtime if path else None
    except OSError:
        return None


def _build_ssl_context(spec: HttpCheck) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=spec.ca_file)
    if spec.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if spec.cert_file:
        ctx.load_cert_chain(spec.cert_file, spec.key_file)
    return ctx


async def ssl_context(spec: HttpCheck) -> ssl.SSLContext:
    """Built once per (files, their mtimes), so a rotated certificate is picked up; built in a
    worker thread (loading the system CA bundle takes ~30 ms)."""
    key = (spec.ca_file, spec.cert_file, spec.key_file, spec.insecure,
           _mtime(spec.ca_file), _mtime(spec.cert_file), _mtime(spec.key_file))
    ctx = _ssl_cache.get(key)
    if ctx is None:
        try:
            ctx = await trio.to_thread.run_sync(_build_ssl_context, spec)
        except (OSError, ssl.SSLError) as e:
            raise CheckFailed(f"TLS setup: {e}") from None
        if len(_ssl_cache) > 64:
            _ssl_cache.clear()
        _ssl_cache[key] = ctx
    return ctx


def _os_error_text(e: OSError) -> str:
    """trio's 'all attempts to connect failed' keeps the real errors in its cause: show them."""
    inner = e.__cause__
    if isinstance(inner, BaseExceptionGroup):
        texts = dict.fromkeys(x.strerror or str(x) for x in inner.exceptions if isinstance(x, OSError))
        if texts:
            return "; ".join(texts)
    return e.strerror or str(e)


async def _tcp(spec: TcpCheck, nl: Netlink | None) -> None:
    try:
        stream = await trio.open_tcp_stream(spec.host, spec.port)
    except OSError as e:
        raise CheckFailed(f"connect {spec.host}:{spec.port}: {_os_error_text(e)}") from None
    await stream.aclose()


def _http_error(e: Exception) -> str:
    cause: BaseException | None = e
    while cause is not None:  # the useful part is deep inside: a TLS verdict, or the OS errors
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"certificate not trusted ({cause.verify_message})"
        if isinstance(cause, OSError) and isinstance(cause.__cause__, BaseExceptionGroup):
            return _os_error_text(cause)
        cause = cause.__cause__ or cause.__context__
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


async def _http(spec: HttpCheck, nl: Netlink | None) -> None:
    verify = await ssl_context(spec)  # cached; unused for http:, but spares httpx building one per run
    try:
        async with httpx.AsyncClient(verify=verify, trust_env=False, timeout=None, follow_redirects=False) as client:
            async with client.stream("GET", spec.url, headers={"user-agent": "vipd-health"}) as resp:
                status = resp.status_code  # the body is not read: a large or endless one is fine
    except (httpx.HTTPError, OSError, ssl.SSLError) as e:
        raise CheckFailed(f"GET {spec.url}: {_http_error(e)}") from None
    if status != spec.expect_status:
        raise CheckFailed(f"GET {spec.url}: status {status}, expected {spec.expect_status}")


async def _command(spec: CommandCheck, nl: Netlink | None) -> None:
    try:
        res = await run_command(spec.argv, timeout=spec.timeout, keep=512)
    except OSError as e:
        raise CheckFailed(f"cannot run {spec.argv[0]}: {e.strerror or e}") from None
    if res.timed_out:
        raise CheckFailed(f"timed out after {spec.timeout:g}s (killed)")
    if res.returncode != 0:
        last = res.output.strip().splitlines()[-1:] or [""]
        how = f"killed by signal {-res.returncode}" if res.returncode and res.returncode < 0 else \
            f"exit status {res.returncode}"
        raise CheckFailed(f"{how}{': ' + last[0][:200] if last[0] else ''}")


async def _carrier(spec: CarrierCheck, nl: Netlink | None) -> None:
    if nl is not None:
        try:
            link = await nl.link(spec.interface)
        except DataplaneError as e:
            raise CheckFailed(str(e)) from None
        if not link.up:
            raise CheckFailed(f"{spec.interface}: down or no carrier")
        return
    try:  # a sysfs read does not block; EINVAL means administratively down
        with open(f"/sys/class/net/{spec.interface}/carrier") as f:
            carrier = f.read().strip()
    except FileNotFoundError:
        raise CheckFailed(f"no interface {spec.interface!r}") from None
    except OSError as e:
        raise CheckFailed(f"{spec.interface}: administratively down ({e.strerror})") from None
    if carrier != "1":
        raise CheckFailed(f"{spec.interface}: no carrier")


_RUN = {TcpCheck: _tcp, HttpCheck: _http, CommandCheck: _command, CarrierCheck: _carrier}


async def run_check(spec: CheckSpec, *, nl: Netlink | None = None) -> None:
    """Run ``spec`` once, bounded by ``spec.timeout``; CheckFailed(reason) if it fails.

    ``nl``: for carrier checks, ask this Netlink (its netns) instead of reading /sys.
    """
    try:
        with trio.fail_after(spec.timeout):
            await _RUN[type(spec)](spec, nl)  # type: ignore[operator]
    except trio.TooSlowError:
        raise CheckFailed(f"timed out after {spec.timeout:g}s") from None


# ------------------------------------------------------------------------------- monitor

@dataclass(frozen=True)
class CheckStatus:
    healthy: bool | None  # None: unknown (counts as unhealthy)
    reason: str  # of the last run ("ok" or why it failed)
    since: float  # trio clock of the last flip (or of the start)
    runs: int = 0


Runner = Callable[[CheckSpec], Any]  # async (spec) -> None, raising CheckFailed


class HealthMonitor:
    """Runs named checks concurrently, each in its own task on its own interval, debounced by its
    rise/fall, and calls ``on_change(name, healthy, reason)`` on every flip (unknown -> known too).

    ``run`` reports started once every check has finished its first run (each is bounded by its
    timeout), so a caller can read :meth:`status` at once; every check is still unknown (and so
    unhealthy) then unless its rise/fall is 1.
    """

    def __init__(self, checks: Sequence[tuple[str, CheckSpec]],
                 on_change: Callable[[str, bool, str], None] | None = None, *,
                 nl: Netlink | None = None, runner: Runner | None = None) -> None:
        names = [n for n, _ in checks]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate check names: {names}")
        self.checks = list(checks)
        self.on_change = on_change
        self._nl = nl
        self._runner = runner
        self._status = {n: CheckStatus(None, "not run yet", 0.0) for n in names}
        self._first_round = trio.Event()
        self._pending_first = len(names)

    def status(self) -> dict[str, CheckStatus]:
        return dict(self._status)

    def healthy(self, *names: str) -> bool:
        """Every named check (default: all of them) is known healthy."""
        return all(self._status[n].healthy is True for n in (names or self._status))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for name, spec in self.checks:
                nursery.start_soon(self._loop, name, spec)
            if self._pending_first == 0:
                self._first_round.set()
            await self._first_round.wait()
            task_status.started()

    async def _once(self, spec: CheckSpec) -> tuple[bool, str]:
        try:
            with trio.fail_after(spec.timeout):
                if self._runner is not None:
                    await self._runner(spec)
                else:
                    await run_check(spec, nl=self._nl)
        except trio.TooSlowError:
            return False, f"timed out after {spec.timeout:g}s"
        except CheckFailed as e:
            return False, e.reason
        except Exception as e:  # noqa: BLE001 - a bug in one check must not take the daemon down
            log.error("health_check_crashed", check=check_name(spec), error=repr(e))
            return False, f"internal error: {e!r}"
        return True, "ok"

    async def _loop(self, name: str, spec: CheckSpec) -> None:
        hyst = Hysteresis(spec.rise, spec.fall, initial=None)
        start = trio.current_time()
        self._status[name] = CheckStatus(None, "not run yet", start)
        first = True
        while True:
            started = trio.current_time()
            ok, reason = await self._once(spec)
            flip = hyst.observe(ok)
            old = self._status[name]
            since = trio.current_time() if flip is not None else old.since
            self._status[name] = CheckStatus(hyst.state, reason, since, old.runs + 1)
            if flip is not None:
                (log.info if flip else log.warning)("health_changed", check=name, healthy=flip, reason=reason)
                if self.on_change is not None:
                    self.on_change(name, flip, reason)
            if first:
                first = False
                self._pending_first -= 1
                if self._pending_first == 0:
                    self._first_round.set()
            await trio.sleep_until(started + spec.interval)

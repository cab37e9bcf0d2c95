"""Health check specs: the frozen dataclasses, the parser of one check table, and the read-only
host checks. Nothing here runs a check (:mod:`vipd.health.probes` does).

Check tables in the config, host-wide or per VIP::

    [[host.check]]                 # failing any host check releases every VIP of this host
    type = "carrier"
    interface = "eth0"

    [[vip.check]]                  # failing a VIP check releases that VIP (and its group)
    type = "http"
    url = "https://127.0.0.1:6443/readyz"
    ca_file = "/etc/kubernetes/pki/ca.crt"

One table per check, by ``type``:

* ``tcp``: ``host``, ``port``; healthy when a TCP connection is accepted.
* ``http``: ``url`` (http or https), ``expect_status`` (200), ``ca_file``, ``cert_file`` +
  ``key_file`` (a client certificate), ``insecure`` (no certificate check; https URLs on localhost
  or a loopback address only, and not together with ``ca_file``). The body is never read.
* ``command``: ``command`` (argv, a list of strings, no shell); healthy on exit status 0.
* ``carrier``: ``interface``; healthy while it is up with carrier.

and on every type: ``name`` (for logs and status; default: a description), ``interval`` (2 s,
start to start), ``timeout`` (1 s, at most ``interval``), ``rise`` (2 successes in a row to become
healthy), ``fall`` (3 failures in a row to become unhealthy).
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Any, Union

from vipd.configlib import absolute_path, finite, http_url, program_path
from vipd.errors import ConfigError

TYPES = ("tcp", "http", "command", "carrier")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$")
_IFNAME_RE = re.compile(r"^[^/\s:]{1,15}$")


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
        finite(self.key(k), v)
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
    parts = http_url(r.key("url"), url, path_allowed=True)
    assert parts.hostname is not None
    status = r.integer("expect_status", 200, 100, 599)
    files = {k: r.get(k, (str,), None, "a string") for k in ("ca_file", "cert_file", "key_file")}
    files = {k: None if f is None else absolute_path(r.key(k), f) for k, f in files.items()}
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
        program_path(f"{r.key('command')}[0]", argv[0])
        spec = CommandCheck(tuple(argv), **common)
    else:
        ifname = r.require("interface", (str,), "a string")
        if not _IFNAME_RE.match(ifname):
            raise ConfigError(r.key("interface"), f"{ifname!r} is not a valid interface name")
        spec = CarrierCheck(ifname, **common)
    r.done()
    return spec


def check_host(spec: CheckSpec, key_path: str, sys_class_net: str = "/sys/class/net") -> None:
    """Read-only checks against this host: TLS files load, the program is executable and only its
    owner can change it, the interface is present."""
    from vipd.hostchecks import check_program, tls_context

    if isinstance(spec, HttpCheck):
        if spec.url.startswith("https:"):
            tls_context(spec.ca_file, spec.cert_file, spec.key_file, key_path, verify=not spec.insecure)
    elif isinstance(spec, CommandCheck):
        check_program(f"{key_path}.command[0]", spec.argv[0])
    elif isinstance(spec, CarrierCheck) and not os.path.exists(os.path.join(sys_class_net, spec.interface)):
        raise ConfigError(f"{key_path}.interface", f"no interface {spec.interface!r} on this host")

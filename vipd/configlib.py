"""Reading TOML tables with key paths: the small toolkit every config section uses."""

from __future__ import annotations

import ipaddress
import math
import os
import re
import urllib.parse
from typing import Any, Union

from vipd.errors import ConfigError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
IFNAME_RE = re.compile(r"^[^/\s:]{1,15}$")


class Table:
    """A TOML table being read: tracks its path and which keys were used."""

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(path or "<root>", f"must be a table, got {type(data).__name__}")
        self.data = data
        self.path = path
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, types: type | tuple[type, ...], default: Any = None) -> Any:
        self.used.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            raise ConfigError(self.key(name), f"expected {typename(types)}, got a boolean")
        if not isinstance(value, types):
            raise ConfigError(self.key(name), f"expected {typename(types)}, got {type(value).__name__}")
        finite(self.key(name), value)
        return value

    def require(self, name: str, types: type | tuple[type, ...]) -> Any:
        if name not in self.data:
            self.used.add(name)
            raise ConfigError(self.key(name), "is required")
        return self.get(name, types)

    def table(self, name: str) -> "Table":
        self.used.add(name)
        return Table(self.data.get(name, {}), self.key(name))

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(self.key(unknown[0]), "unknown key")


def typename(types: type | tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "a list"}
    ts = types if isinstance(types, tuple) else (types,)
    return " or ".join(names.get(t, t.__name__) for t in ts if not (t is int and float in ts))


def positive(key: str, value: float, minimum: float = 0.0, maximum: float | None = None) -> float:
    """value > 0 when minimum is 0, else value >= minimum; and value <= maximum."""
    if (value <= 0) if minimum == 0 else (value < minimum):
        raise ConfigError(key, f"must be {'> 0' if minimum == 0 else f'>= {minimum}'}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(key, f"must be <= {maximum}, got {value}")
    return value



IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def finite(key: str, value: Any) -> None:
    """TOML has nan and inf: no vipd key means either (nan passes every < / > range check)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(key, f"must be a finite number, got {value}")


def check_unicast(key: str, ip: IPAddress, what: str = "address") -> None:
    """One address family rule for every address vipd adds or talks to: a unicast address a host can
    hold. Rejects unspecified, this-network (0/8), loopback, link-local, multicast, broadcast and
    reserved (240/4) addresses, and IPv4-mapped / IPv4-compatible IPv6 addresses."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        raise ConfigError(key, f"{ip} is an IPv4-mapped IPv6 address: write the IPv4 address {ip.ipv4_mapped}")
    if isinstance(ip, ipaddress.IPv6Address) and ip in ipaddress.IPv6Network("::/96") and not ip.is_unspecified \
            and not ip.is_loopback:
        raise ConfigError(key, f"{ip} is an IPv4-compatible IPv6 address (deprecated): write the IPv4 address")
    kinds = [("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback), ("link-local", ip.is_link_local),
             ("multicast", ip.is_multicast),
             ("this-network (0.0.0.0/8)", isinstance(ip, ipaddress.IPv4Address) and ip.packed[0] == 0),
             ("broadcast", ip == ipaddress.IPv4Address("255.255.255.255")), ("reserved", ip.is_reserved)]
    for kind, hit in kinds:
        if hit:
            raise ConfigError(key, f"{ip} is a {kind} address: it cannot be {what}")


def absolute_path(key: str, path: str) -> str:
    """Files and directories named in the config: absolute (a service's working directory is /),
    without NUL; normalised."""
    if not path or "\0" in path:
        raise ConfigError(key, f"not a path: {path!r}")
    if not os.path.isabs(path):
        raise ConfigError(key, f"must be an absolute path, got {path!r}")
    return os.path.normpath(path)


def program_path(key: str, program: str) -> None:
    """argv[0] of a hook or a command check: a bare name (looked up in PATH) or an absolute path."""
    if os.sep in program and not os.path.isabs(program):
        raise ConfigError(key, f"must be an absolute path or a bare program name, got {program!r}")


def port(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError(key, f"must be a port number between 1 and 65535, got {value!r}")
    return value


def host_port(key: str, text: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" -> (host, port); the port in 1..65535."""
    m = re.match(r"^(?:\[([0-9a-fA-F:.]+)\]|([^:\s\[\]]+)):(\d{1,5})$", text)
    if not m:
        raise ConfigError(key, f"expected host:port (IPv6 as [addr]:port), got {text!r}")
    host = m[1] or m[2]
    if m[1]:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(key, f"{host!r} is not an IPv6 address") from None
    return host, port(key, int(m[3]))


def http_url(key: str, url: str, *, path_allowed: bool) -> urllib.parse.SplitResult:
    """An http(s) URL with a host, a valid port, no credentials (they would be logged and printed:
    use the username/password keys) and, unless `path_allowed`, no path, query or fragment.
    Error messages never echo a URL that carries credentials."""
    parts = urllib.parse.urlsplit(url)
    if "@" in parts.netloc:
        raise ConfigError(key, "the URL contains credentials (user:password@): they would be logged and "
                               "printed; use etcd.username and etcd.password_file")
    if parts.scheme not in ("http", "https") or not parts.netloc or any(c.isspace() for c in url):
        raise ConfigError(key, f"not an http(s)://host:port URL: {url!r}")
    try:
        port_no = parts.port
    except ValueError:
        raise ConfigError(key, f"bad port in {url!r} (1..65535)") from None
    if not parts.hostname:
        raise ConfigError(key, f"no host in {url!r}")
    if port_no is not None and port_no == 0:
        raise ConfigError(key, f"bad port in {url!r} (1..65535)")
    if not path_allowed and (parts.path not in ("", "/") or parts.query or parts.fragment):
        raise ConfigError(key, f"expected http(s)://host:port only, without a path: {url!r}")
    return parts

"""Reading TOML tables with key paths: the small toolkit every config section uses."""

from __future__ import annotations

import re
from typing import Any

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



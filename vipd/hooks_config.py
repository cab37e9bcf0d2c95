"""The ``[hooks]`` table (vipd/hooks.py runs them): parsed and checked without loading trio, so
that `vipd cleanup`, `vipd check` and the other short commands that read the config start fast."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vipd.configlib import finite, program_path
from vipd.errors import ConfigError
from vipd.hostchecks import check_program

EVENTS = ("owner", "backup", "fenced", "fault")
DEFAULT_TIMEOUT = 10.0



@dataclass(frozen=True)
class HooksConfig:
    commands: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (event, argv) in EVENTS order
    timeout: float = DEFAULT_TIMEOUT

    def command(self, event: str) -> tuple[str, ...] | None:
        return dict(self.commands).get(event)


def parse_hooks(table: Any, key_path: str = "hooks") -> HooksConfig:
    """The ``[hooks]`` table -> HooksConfig; ConfigError naming the key for anything wrong."""
    if not isinstance(table, dict):
        raise ConfigError(key_path, f"must be a table, got {type(table).__name__}")
    for k in table:
        if k != "timeout" and k not in EVENTS:
            raise ConfigError(f"{key_path}.{k}", f"unknown key (events: {', '.join(EVENTS)}; and timeout)")
    timeout = table.get("timeout", DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ConfigError(f"{key_path}.timeout", f"expected a number, got {type(timeout).__name__}")
    finite(f"{key_path}.timeout", timeout)
    if not 0 < timeout <= 3600:
        raise ConfigError(f"{key_path}.timeout", f"must be > 0 and <= 3600, got {timeout}")
    commands = []
    for event in EVENTS:
        if event not in table:
            continue
        argv = table[event]
        key = f"{key_path}.{event}"
        if not isinstance(argv, list) or not argv:
            raise ConfigError(key, "expected a non-empty list of strings (program and arguments)")
        for i, arg in enumerate(argv):
            if not isinstance(arg, str) or (i == 0 and not arg) or "\0" in arg:
                raise ConfigError(f"{key}[{i}]", f"expected a {'non-empty ' if i == 0 else ''}string, got {arg!r}")
        program_path(f"{key}[0]", argv[0])
        commands.append((event, tuple(argv)))
    return HooksConfig(tuple(commands), float(timeout))


def check_hooks_host(cfg: HooksConfig, key_path: str = "hooks") -> None:
    """Read-only host check: every hook program exists, is executable (PATH lookup for bare names)
    and cannot be changed by anyone but its owner (it runs as vipd, with vipd's capabilities)."""
    for event, argv in cfg.commands:
        check_program(f"{key_path}.{event}[0]", argv[0])

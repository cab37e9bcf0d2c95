"""One line per event, key=value fields: `2026-11-23T18:40:01.123Z info vip=api event=owner epoch=42`."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

_log = logging.getLogger("vipd")


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"{ts}.{int(record.msecs):03d}Z {record.levelname.lower()} {record.getMessage()}"
        if record.exc_info:
            line += " exc=" + _quote(self.formatException(record.exc_info).replace("\n", " | "))
        return line


def _quote(v: Any) -> str:
    s = str(v)
    if s == "" or any(c in s for c in ' "=\n\t'):
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return s


def fields(**kv: Any) -> str:
    return " ".join(f"{k}={_quote(v)}" for k, v in kv.items() if v is not None)


def level_name() -> str:
    return logging.getLevelName(_log.level).lower()


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    _log.handlers[:] = [handler]
    _log.setLevel(level.upper())
    _log.propagate = False


def info(event: str, **kv: Any) -> None:
    _log.info(fields(event=event, **kv))


def warning(event: str, **kv: Any) -> None:
    _log.warning(fields(event=event, **kv))


def error(event: str, **kv: Any) -> None:
    _log.error(fields(event=event, **kv))


def debug(event: str, **kv: Any) -> None:
    if _log.isEnabledFor(logging.DEBUG):
        _log.debug(fields(event=event, **kv))

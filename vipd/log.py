"""One line per event, key=value fields: `2026-11-23T18:40:01.123Z info vip=api event=owner epoch=42`."""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from typing import Any, Optional, TextIO

_log = logging.getLogger("vipd")


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"{ts}.{int(record.msecs):03d}Z {record.levelname.lower()} {record.getMessage()}"
        if record.exc_info:
            line += " exc=" + _quote(self.formatException(record.exc_info).replace("\n", " | "))
        return line


_UNSAFE = re.compile(r'[ "=\n\t]')  # a value with any of these is quoted (one scan in C, not one per character)


def _quote(v: Any) -> str:
    s = v if type(v) is str else str(v)
    if s == "" or _UNSAFE.search(s):
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return s


def fields(**kv: Any) -> str:
    return " ".join(f"{k}={_quote(v)}" for k, v in kv.items() if v is not None)


_lock = threading.Lock()
_stream: Optional[TextIO] = None  # after setup(): lines are written here directly (logging's machinery costs ~80 us a line)
_second = -1
_stamp = ""


def level_name() -> str:
    return logging.getLevelName(_log.level).lower()


def setup(level: str = "info") -> None:
    global _stream
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    _log.handlers[:] = [handler]
    _log.setLevel(level.upper())
    _log.propagate = False
    _stream = sys.stderr


def _emit(levelno: int, level: str, event: str, kv: dict[str, Any]) -> None:
    """The same line _Formatter makes, written and flushed at once (one write per line, as before)."""
    global _second, _stamp
    if not _log.isEnabledFor(levelno):
        return
    stream = _stream
    ours = bool(_log.handlers) and getattr(_log.handlers[0], "stream", None) is stream
    if stream is None or not ours:
        _log.log(levelno, fields(event=event, **kv))  # not set up by vipd (tests, a library caller)
        return
    now = time.time()
    second = int(now)
    if second != _second:
        _second, _stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    line = f"{_stamp}.{int((now - second) * 1000):03d}Z {level} {fields(event=event, **kv)}\n"
    try:
        with _lock:  # the netlink owner thread logs too
            stream.write(line)
            stream.flush()
    except (OSError, ValueError):
        pass  # as logging.Handler.handleError does by default: a log line never stops the daemon


def info(event: str, **kv: Any) -> None:
    _emit(logging.INFO, "info", event, kv)


def warning(event: str, **kv: Any) -> None:
    _emit(logging.WARNING, "warning", event, kv)


def error(event: str, **kv: Any) -> None:
    _emit(logging.ERROR, "error", event, kv)


def debug(event: str, **kv: Any) -> None:
    if _log.isEnabledFor(logging.DEBUG):
        _log.debug(fields(event=event, **kv))

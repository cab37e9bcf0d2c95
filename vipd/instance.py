"""One daemon per state directory: `vipd run` (and `vipd cleanup`) take an exclusive flock on
`<state_dir>/vipd.lock` before anything touches the host or etcd, and the metrics port is checked
free before it too. A second instance exits at once naming the holder, having changed nothing.

The lock is released by the kernel when the process exits, however it exits (no stale lock after a
crash); the file keeps the holder's pid for the message."""

from __future__ import annotations

import errno
import fcntl
import os
import socket

from vipd.errors import VipdError

LOCK_NAME = "vipd.lock"


class InstanceConflict(VipdError):
    """Another vipd process holds this state directory, or the metrics port is taken."""


def lock_path(state_dir: str) -> str:
    return os.path.join(state_dir, LOCK_NAME)


def acquire(state_dir: str, what: str = "vipd run") -> int:
    """Take the state directory's lock for this process's lifetime; returns the fd (kept open,
    close-on-exec so hooks do not inherit it). InstanceConflict names the holder's pid."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    path = lock_path(state_dir)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_pid(fd)
        os.close(fd)
        raise InstanceConflict(f"{what}: another vipd (pid {holder or '?'}) is running with state_dir "
                               f"{state_dir}; refusing to touch its VIPs (stop it first, or give this "
                               "instance its own state_dir)") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None


def check_port_free(listen: str, key: str = "metrics.listen") -> None:
    """The metrics address can be bound now (as trio will, with SO_REUSEADDR); InstanceConflict if
    another process listens there."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    for family, kind, proto, _, addr in socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM,
                                                           flags=socket.AI_PASSIVE):
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind(addr)
                s.listen(1)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise InstanceConflict(f"{key}: {listen} is in use by another process; choose another "
                                           "port or stop that process") from None
                raise InstanceConflict(f"{key}: cannot listen on {listen}: {e.strerror}") from None

"""Small network-namespace helpers for the lab: `ip` commands, sockets opened inside a namespace,
netlink address dumps, process clean-up, and sending raw frames.

Everything here acts only on the namespace it is given; nothing touches the root namespace's
addresses, routes or links. Commands run through `ip` (iproute2) with bounded timeouts; sockets are
opened by a short-lived thread that enters the namespace (setns affects only the calling thread, and
a socket stays in the namespace it was created in).
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

from vipd.dataplane import nldump

T = TypeVar("T")

NETNS_DIR = "/run/netns"
CMD_TIMEOUT = 20.0  # seconds; no lab `ip` command legitimately takes this long
_CLONE_NEWNET = 0x40000000
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class CommandError(RuntimeError):
    """A lab command failed; the message carries the command line and its stderr."""


# --------------------------------------------------------------------------- commands

def run(argv: Sequence[str], *, input: str | None = None, check: bool = True,
        timeout: float = CMD_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output; CommandError (with stderr) when check and it fails."""
    try:
        cp = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout,
                            stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise CommandError(f"{' '.join(argv)}: timed out after {timeout}s") from e
    if check and cp.returncode != 0:
        detail = (cp.stderr or cp.stdout).strip()
        raise CommandError(f"{' '.join(argv)}: exit {cp.returncode}: {detail}")
    return cp


def run_all(commands: Iterable[tuple[Sequence[str], str | None]], *, timeout: float = CMD_TIMEOUT) -> None:
    """Run independent commands (argv, stdin text) concurrently; CommandError naming every failure."""
    procs = []
    try:
        for argv, text in commands:
            p = subprocess.Popen(list(argv), stdin=subprocess.PIPE if text is not None else subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append((argv, p, text))
        errors = []
        deadline = time.monotonic() + timeout
        for argv, p, text in procs:
            try:
                _, err = p.communicate(text, timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
                errors.append(f"{' '.join(argv)}: timed out after {timeout}s")
                continue
            if p.returncode != 0:
                errors.append(f"{' '.join(argv)}: exit {p.returncode}: {err.strip()}")
        if errors:
            raise CommandError("; ".join(errors))
    finally:
        for _, p, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`ip [-n NS] ARGS...`."""
    return run(["ip", *(("-n", ns) if ns else ()), *args], check=check)


def ip_batch(lines: Iterable[str], *, ns: str | None = None, force: bool = False) -> None:
    """Several `ip` commands in one process (`ip [-n NS] -batch -`): CommandError at the first failure,
    or with force, every line runs and failures are ignored (the caller checks the result)."""
    text = "".join(line + "\n" for line in lines)
    if text:
        run(["ip", *(("-n", ns) if ns else ()), *(("-force",) if force else ()), "-batch", "-"],
            input=text, check=not force)


def exec_argv(ns: str, argv: Sequence[str]) -> list[str]:
    """The argv that runs `argv` inside namespace `ns`."""
    return ["ip", "netns", "exec", ns, *argv]


def sysctl_argv(ns: str, settings: Mapping[str, Any]) -> list[str]:
    """The argv that sets net.* sysctls inside `ns` (/proc/sys/net belongs to the caller's netns)."""
    return exec_argv(ns, ["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in settings.items())])


def sysctl(ns: str, settings: Mapping[str, Any]) -> None:
    """Set net.* sysctls inside `ns` (one process)."""
    if settings:
        run(sysctl_argv(ns, settings))


# --------------------------------------------------------------------------- namespaces

def check_name(name: str) -> str:
    if not _NAME_RE.match(name) or len(name) > 64:
        raise ValueError(f"bad namespace name {name!r}")
    return name


def exists(ns: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, check_name(ns)))


def list_ns(prefix: str = "") -> list[str]:
    """Named namespaces (those under /run/netns) whose name starts with prefix."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def _ns_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def pids_in(ns: str) -> list[int]:
    """Processes whose network namespace is `ns` (what `ip netns pids` prints, without a process)."""
    target = _ns_id(os.path.join(NETNS_DIR, check_name(ns)))
    if target is None:
        return []
    return [int(d) for d in os.listdir("/proc") if d.isdigit() and _ns_id(f"/proc/{d}/ns/net") == target]


def delete(names: Iterable[str]) -> None:
    """Delete named namespaces that exist (one `ip -batch`); deleting a namespace destroys its links
    once no process or socket keeps it alive."""
    present = [n for n in names if exists(n)]
    if present:
        ip_batch((f"netns del {n}" for n in present), force=True)
    left = [n for n in present if exists(n)]
    if left:
        raise CommandError(f"could not delete namespaces {left}")


def kill_pids(pids: Iterable[int], *, ns: str, grace: float = 2.0) -> list[int]:
    """SIGTERM processes of namespace `ns`, SIGKILL those alive after `grace` seconds; returns the
    survivors (normally none). A pid is signalled only while it is still inside `ns`."""
    target = _ns_id(os.path.join(NETNS_DIR, check_name(ns)))
    pids = [p for p in dict.fromkeys(pids) if p > 1 and p != os.getpid()]

    def inside(pid: int) -> bool:
        return target is not None and _alive(pid) and _ns_id(f"/proc/{pid}/ns/net") == target

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        alive = [p for p in pids if inside(p)]
        for p in alive:
            try:
                os.kill(p, signal.SIGCONT)
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while alive and time.monotonic() < deadline:
            time.sleep(0.01)
            alive = [p for p in alive if inside(p)]
        if not alive:
            return []
    return [p for p in pids if inside(p)]


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


# --------------------------------------------------------------------------- sockets in a namespace

_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    global _libc
    if hasattr(os, "setns"):  # Python >= 3.12
        os.setns(fd, _CLONE_NEWNET)
        return
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def call_in(ns: str, fn: Callable[[], T]) -> T:
    """Run fn in a short-lived thread that has entered namespace `ns`; its result or exception is
    returned or raised here. Sockets fn creates belong to `ns` for their whole life."""
    path = os.path.join(NETNS_DIR, check_name(ns))
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(fd)
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    t = threading.Thread(target=body, name=f"netns-{ns}", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def socket_in(ns: str, family: int, type: int, proto: int = 0) -> socket.socket:
    """A socket created inside namespace `ns`."""
    return call_in(ns, lambda: socket.socket(family, type, proto))


# --------------------------------------------------------------------------- netlink address dumps

NETLINK_ROUTE = 0
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100
_RTM_NEWADDR, _RTM_GETADDR = 20, 22
_IFA_ADDRESS, _IFA_LOCAL, _IFA_LABEL, _IFA_FLAGS = 1, 2, 3, 8
IFA_F_DADFAILED = 0x08
_HDR = struct.Struct("=IHHII")
_IFADDR = struct.Struct("=BBBBI")
_RTA = struct.Struct("=HH")


@dataclass(frozen=True)
class Addr:
    """One address as the kernel reports it."""

    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    prefixlen: int
    ifindex: int
    flags: int
    label: str | None = None

    @property
    def usable(self) -> bool:
        """False for an IPv6 address whose duplicate address detection failed (held by nobody)."""
        return not self.flags & IFA_F_DADFAILED


def netlink_socket(ns: str, groups: int = 0) -> socket.socket:
    """A NETLINK_ROUTE socket inside `ns`, subscribed to `groups` (e.g. RTMGRP_IPV4_IFADDR)."""
    sock = socket_in(ns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
    try:
        sock.settimeout(5.0)  # a dump is answered in microseconds: never wait forever
        sock.bind((0, groups))
    except BaseException:
        sock.close()
        raise
    return sock


def dump_addresses(sock: socket.socket, family: int = socket.AF_UNSPEC) -> list[Addr]:
    """All addresses of the socket's namespace (one RTM_GETADDR dump, parsed here: ~20x cheaper
    than pyroute2's parser, which matters for a monitor sampling every 10 ms)."""
    request = lambda n: nldump.header(_IFADDR.size, _RTM_GETADDR, nldump.NLM_F_REQUEST | nldump.NLM_F_DUMP, n) + (  # noqa: E731
        _IFADDR.pack(family, 0, 0, 0, 0))
    out: list[Addr] = []
    for kind, data, start, end in nldump.dump(sock, request, "RTM_GETADDR"):
        if kind == _RTM_NEWADDR:
            a = _parse_addr(data, start - _HDR.size, end - start + _HDR.size)
            if a is not None:
                out.append(a)
    return out


def _parse_addr(data: bytes, off: int, length: int) -> Addr | None:
    fam, plen, flags, _scope, index = _IFADDR.unpack_from(data, off + _HDR.size)
    pos, end = off + _HDR.size + _IFADDR.size, off + length
    local = address = label = None
    while pos + _RTA.size <= end:
        rlen, rtype = _RTA.unpack_from(data, pos)
        if rlen < _RTA.size:
            break
        val = data[pos + _RTA.size:pos + rlen]
        if rtype == _IFA_LOCAL:
            local = val
        elif rtype == _IFA_ADDRESS:
            address = val
        elif rtype == _IFA_LABEL:
            label = val.rstrip(b"\0").decode(errors="replace")
        elif rtype == _IFA_FLAGS:
            flags = struct.unpack_from("=I", val)[0]
        pos += (rlen + 3) & ~3
    raw = local if fam == socket.AF_INET and local is not None else address
    if fam == socket.AF_INET and raw is not None and len(raw) == 4:
        return Addr(ipaddress.IPv4Address(raw), plen, index, flags, label)
    if fam == socket.AF_INET6 and raw is not None and len(raw) == 16:
        return Addr(ipaddress.IPv6Address(raw), plen, index, flags, label)
    return None


def addresses(ns: str) -> list[Addr]:
    """The addresses currently in `ns` (one socket, one dump)."""
    with netlink_socket(ns) as sock:
        return dump_addresses(sock)


def drain(sock: socket.socket) -> tuple[int, bool]:
    """Read everything queued on a non-blocking netlink event socket: (datagrams read, overflowed).
    An overflow (ENOBUFS) means events were lost: the caller must re-read the state."""
    count, overflow = 0, False
    for _ in range(10_000):  # bounded: a socket buffer holds far fewer messages
        try:
            data = sock.recv(1 << 16)
        except BlockingIOError:
            break
        except OSError as e:
            if e.errno != errno.ENOBUFS:
                raise
            overflow = True
            continue
        if data:
            count += 1
    return count, overflow


# --------------------------------------------------------------------------- frames

def send_frames(ns: str, ifname: str, frame: bytes, count: int = 1, interval: float = 0.0) -> None:
    """Send an Ethernet frame `count` times out of `ifname` in `ns` (AF_PACKET)."""
    with socket_in(ns, socket.AF_PACKET, socket.SOCK_RAW, 0) as sock:
        sock.bind((ifname, 0))
        for i in range(count):
            if i:
                time.sleep(interval)
            sock.send(frame)

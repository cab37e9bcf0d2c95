"""The one thread that owns a pyroute2 ``IPRoute``; trio code awaits jobs run in it.

pyroute2's sync ``IPRoute`` keeps one netlink socket (and one asyncio loop) per calling thread
and frees them only on ``close()``, so calling it from trio's short-lived worker threads leaks
sockets. :class:`Netlink` starts one dedicated thread per instance; that thread opens the
``IPRoute`` (in a named netns if asked), runs every job handed to :meth:`Netlink.call` in
submission order, and hands each outcome back to the waiting trio task through the trio token
(no per-call threads, no polling).

Cancellation: a job that has not started yet when its caller is cancelled is skipped; a job that
is already running in the owner thread cannot be interrupted and runs to completion, its result
(or exception) is discarded. So a cancelled ``claim`` may still have added the address: callers
that need certainty read the state back (``AddressManager.holds``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import queue
import socket
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, TypeVar

import outcome
import trio
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from vipd.errors import DataplaneError

log = logging.getLogger(__name__)

T = TypeVar("T")

IFF_UP = 0x1
IFF_RUNNING = 0x40  # the kernel sets it when the device is up and its operstate is UP or UNKNOWN
_NO_MAC = "00:00:00:00:00:00"
_CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/var/run/netns"


def netns_path(netns: str) -> str:
    """A netns name as `ip netns` makes it (or a path such as /proc/PID/ns/net) -> its path."""
    return netns if os.path.dirname(netns) else os.path.join(NETNS_RUN_DIR, netns)


def netlink_error_text(e: NetlinkError) -> str:
    """'No such device (errno 19)', with the kernel's extended ack message when it sent one."""
    code = getattr(e, "code", 0) or 0
    text = os.strerror(code) if code else "netlink error"
    extra = e.args[1] if len(e.args) > 1 and isinstance(e.args[1], str) else None
    if extra and extra != text:
        text = f"{text}: {extra}"
    return f"{text} (errno {code})"


@dataclass(frozen=True)
class LinkInfo:
    """One interface as the kernel reports it."""

    index: int
    name: str
    mac: Optional[str]  # None when the link has no (or an all-zero) hardware address, e.g. lo
    up: bool  # administratively up AND carrier / operstate up (IFF_UP and IFF_RUNNING)
    mtu: int


def link_info(msg: Any) -> LinkInfo:
    """Build a LinkInfo from a pyroute2 ifinfmsg."""
    flags = msg["flags"]
    mac = msg.get("IFLA_ADDRESS")
    if not mac or mac == _NO_MAC:
        mac = None
    return LinkInfo(
        index=msg["index"],
        name=msg.get("IFLA_IFNAME"),
        mac=mac,
        up=bool(flags & IFF_UP) and bool(flags & IFF_RUNNING),
        mtu=msg.get("IFLA_MTU") or 0,
    )


def _setns(fd: int) -> None:
    """Move the calling thread (only) into the network namespace behind ``fd``."""
    if hasattr(os, "setns"):  # Python >= 3.12
        os.setns(fd, _CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def enter_netns(netns: Optional[str]) -> Iterator[None]:
    """Run the ``with`` body with the calling thread (only) in ``netns`` (a name as for
    :func:`netns_path`, or a path; None: stay where it is), then move it back to its own netns.

    Sockets opened inside stay in ``netns``. Meant for short bodies in a thread nothing else uses
    meanwhile (the Netlink owner thread during a job): trio code must not await inside it.
    FileNotFoundError when the netns does not exist.
    """
    if netns is None:
        yield
        return
    with open("/proc/thread-self/ns/net", "rb") as home, open(netns_path(netns), "rb") as target:
        _setns(target.fileno())
        try:
            yield
        finally:
            _setns(home.fileno())


def socket_in_netns(netns: str, family: int, type_: int, proto: int) -> socket.socket:
    """A socket created in /run/netns/``netns``; the calling thread returns to its own netns.

    Meant for the Netlink owner thread, which nothing else uses while it runs a job.
    """
    with enter_netns(netns):
        return socket.socket(family, type_, proto)


class _Job:
    """One call: the function, where its outcome goes, and whether its caller gave up."""

    __slots__ = ("fn", "task", "token", "abandoned")

    def __init__(self, fn: Callable[[IPRoute], Any], task: Any, token: trio.lowlevel.TrioToken) -> None:
        self.fn = fn
        self.task = task
        self.token = token
        self.abandoned = False  # set from trio (under the GIL) when the caller is cancelled

    def deliver(self, result: outcome.Outcome) -> None:
        """Runs in the trio thread: wake the caller unless it was cancelled meanwhile."""
        if not self.abandoned:
            trio.lowlevel.reschedule(self.task, result)

    def hand_back(self, result: outcome.Outcome) -> None:
        """Runs in the owner thread."""
        try:
            self.token.run_sync_soon(self.deliver, result)
        except trio.RunFinishedError:
            pass  # the trio run is over; nobody is waiting


_STOP = object()


class Netlink:
    """Owns one IPRoute in one thread; ``await call(fn)`` runs ``fn(ipr)`` there.

    ``netns=None`` uses the netns of the process (the daemon is started inside its netns with
    ``ip netns exec``); ``netns="name"`` opens the socket in /run/netns/name (used by tests and
    the lab from the root netns) and never creates a missing netns.
    """

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._jobs: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._route: socket.socket | None = None  # owner thread only: see route_socket()
        self._seq = 0

    def __repr__(self) -> str:
        return f"Netlink(netns={self.netns!r})"

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> "Netlink":
        if self._thread is not None:
            raise DataplaneError("Netlink is not reusable: already entered")
        opened = _Job(lambda ipr: None, trio.lowlevel.current_task(), trio.lowlevel.current_trio_token())
        self._thread = threading.Thread(
            target=self._run, args=(opened,), name=f"vipd-netlink[{self.netns or '-'}]", daemon=True
        )
        self._thread.start()
        try:
            await self._wait(opened)
        except BaseException:
            # the owner thread has either failed to open (and exited) or opened: stop it either way
            self._stop_thread()
            self._thread.join()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop_thread()
        thread = self._thread
        if thread is not None:
            # Joining takes as long as the job in progress (netlink calls are sub-millisecond).
            await trio.to_thread.run_sync(thread.join)

    def _stop_thread(self) -> None:
        if not self._closed:
            self._closed = True
            self._jobs.put(_STOP)

    def _open(self) -> IPRoute:
        # groups=0: this socket only answers requests; subscribed events would pile up unread.
        # flags=0: a mistyped netns name must fail, not silently create an empty netns.
        # The existence check first: a failing IPRoute() leaks its asyncio loop (pyroute2 0.9.7).
        try:
            if self.netns is None:
                return IPRoute(groups=0)
            if not os.path.exists(netns_path(self.netns)):
                raise FileNotFoundError(netns_path(self.netns))
            return IPRoute(netns=self.netns, flags=0, groups=0)
        except FileNotFoundError:
            raise DataplaneError(f"network namespace {self.netns!r} does not exist") from None
        except (OSError, NetlinkError) as e:
            where = f"netns {self.netns!r}" if self.netns else "this netns"
            raise DataplaneError(f"cannot open rtnetlink in {where}: {e}") from None

    def _run(self, opened: _Job) -> None:
        """The owner thread: open, then run jobs in order until told to stop."""
        try:
            ipr = self._open()
        except BaseException as e:  # noqa: BLE001 - handed to the trio task that waits for us
            opened.hand_back(outcome.Error(e))
            return
        opened.hand_back(outcome.Value(None))
        try:
            while True:
                job = self._jobs.get()
                if job is _STOP:
                    break
                if job.abandoned:
                    continue
                job.hand_back(outcome.capture(job.fn, ipr))
        finally:
            if self._route is not None:
                self._route.close()
            try:
                ipr.close()
            except Exception:  # noqa: BLE001 - nothing useful to do while shutting down
                log.debug("closing IPRoute failed", exc_info=True)
            # Anything queued after the stop marker (a call racing __aexit__) must not hang.
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not _STOP:
                    job.hand_back(outcome.Error(DataplaneError("netlink owner thread is closed")))

    def route_socket(self) -> tuple[socket.socket, int]:
        """Inside a job only (the owner thread): a plain blocking NETLINK_ROUTE socket in this
        Netlink's netns, for raw dumps decoded with struct (vipd.dataplane.addrdump), and a fresh
        sequence number for the request. Made on first use, closed with the thread."""
        if self._route is None:
            family, type_ = socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC
            sock = (socket_in_netns(self.netns, family, type_, socket.NETLINK_ROUTE) if self.netns
                    else socket.socket(family, type_, socket.NETLINK_ROUTE))
            sock.settimeout(5.0)  # a dump never takes that long; never hang the owner thread
            sock.bind((0, 0))
            self._route = sock
        self._seq = (self._seq + 8) & 0x3FFFFFFF
        return self._route, self._seq

    def reserve_seq(self, count: int) -> None:
        """Inside a job: the request about to go out uses ``count`` sequence numbers from the one
        route_socket() returned; the next request starts after them."""
        self._seq = (self._seq + count) & 0x3FFFFFFF

    # -- calls ----------------------------------------------------------------------------

    async def _wait(self, job: _Job) -> Any:
        def abort(_raise_cancel: Any) -> trio.lowlevel.Abort:
            job.abandoned = True  # not started: skipped; running: finishes, result dropped
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    async def call(self, fn: Callable[[IPRoute], T]) -> T:
        """Run ``fn(ipr)`` in the owner thread and return its result (or raise its exception).

        Exceptions from pyroute2 (``NetlinkError``, ``OSError``) come back unchanged; callers
        translate them into the typed errors of their domain. See the module docstring for
        what cancellation means.
        """
        if self._thread is None or self._closed:
            raise DataplaneError("Netlink is not open (use `async with Netlink(...)`)")
        await trio.lowlevel.checkpoint_if_cancelled()
        job = _Job(fn, trio.lowlevel.current_task(), trio.lowlevel.current_trio_token())
        self._jobs.put(job)
        return await self._wait(job)

    async def call_checked(self, what: str, fn: Callable[[IPRoute], T], error: type[Exception]) -> T:
        """:meth:`call`, with pyroute2's ``NetlinkError`` and ``OSError`` raised as ``error("WHAT: why")``."""
        try:
            return await self.call(fn)
        except NetlinkError as e:
            raise error(f"{what}: {netlink_error_text(e)}") from None
        except OSError as e:
            raise error(f"{what}: {e}") from None

    async def socket(self, family: int, type_: int, proto: int = 0) -> trio.socket.SocketType:
        """A trio socket in this Netlink's netns (for AF_PACKET / rtnetlink sockets whose
        interface names must resolve there). DataplaneError if it cannot be made."""
        try:
            if self.netns is None:
                return trio.socket.socket(family, type_, proto)
            netns = self.netns
            sock = await self.call(lambda ipr: socket_in_netns(netns, family, type_, proto))
        except FileNotFoundError:
            raise DataplaneError(f"network namespace {self.netns!r} does not exist") from None
        except OSError as e:
            raise DataplaneError(f"cannot open socket: {e.strerror or e} (errno {e.errno})") from None
        return trio.socket.from_stdlib_socket(sock)

    async def link(self, ifname: str) -> LinkInfo:
        """The interface named ``ifname``; DataplaneError if it does not exist."""

        def get(ipr: IPRoute) -> Any:
            return ipr.link("get", ifname=ifname)

        try:
            msgs = await self.call(get)
        except NetlinkError as e:
            raise DataplaneError(f"interface {ifname!r}: {netlink_error_text(e)}") from None
        if not msgs:
            raise DataplaneError(f"interface {ifname!r}: not found")
        return link_info(msgs[0])

"""The heartbeat transport: one UDP socket served by one thread of its own, no busy polling.

Why a thread. A daemon with thousands of VIPs runs long scheduler batches on its trio loop
(starting controllers, a placement pass): heartbeats sent from that loop would pause with it and
its peers would suspect a host that is merely busy (vipd/loopwatch.py measures those batches).
The thread keeps heartbeating through them, as long as the trio loop still runs: it sends nothing
once the loop has not checked in for `stall` seconds (it checks in every stall/4: a hung daemon is
suspected within stall + G; a stopped or dead process after G, its thread stopping with it). The
thread waits in poll() for the socket, a wake-up from the loop, or the earliest deadline the
protocol asks for (a peer's next periodic send, or the moment a peer becomes suspect), drains every
pending datagram
before deciding anything (a daemon that was paused reads what arrived meanwhile before it suspects
anyone), answers each periodic heartbeat at once, sends the heartbeats that are due, and only then
asks the protocol which peers are now suspect.

The protocol state (vipd/peers/protocol.py) is changed under one lock, by the thread and by the
loop's calls (set_peers, validate, suspect). Events (Acked / Suspected / Recovered / Challenged)
reach `on_event` on the trio loop (run_sync_soon), in order; it must not block.

Clock: every time here is on the clock the owner of the Peers state reads (for the daemon, trio's:
`loop_clock()`, readable from any thread), so grants compare directly with its deadlines.
"""

from __future__ import annotations

import errno
import ipaddress
import math
import os
import select
import socket
import threading
import time
from pathlib import Path
from typing import Callable

import trio

from vipd import log
from vipd.peers.grants import GrantWriter
from vipd.peers.protocol import Acked, Event, Generation, PeerLink, Peers

Clock = Callable[[], float]
MAX_DRAIN = 4096  # datagrams read per wake-up before the deadlines are served again
STALL = 1.0  # default: seconds without a check-in from the trio loop before heartbeats stop


def load_incarnation(state_dir: str | os.PathLike[str], *, now_ns: int | None = None) -> int:
    """This start's incarnation: max(wall-clock ns, last persisted + 1), persisted (atomically) first."""
    path = Path(state_dir) / "peers.incarnation"
    last = 0
    try:
        last = int(path.read_text().strip())
    except (OSError, ValueError):
        pass
    inc = max(time.time_ns() if now_ns is None else now_ns, last + 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(f"{inc}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return inc


def loop_clock() -> Clock:
    """trio.current_time() of the running loop, readable from any thread (trio's system clock is
    perf_counter, i.e. CLOCK_MONOTONIC, plus a fixed offset)."""
    offset = trio.current_time() - time.perf_counter()
    return lambda: time.perf_counter() + offset


class PeerTransport:
    """Moves the bytes of a Peers state over one UDP socket bound to this host's address."""

    def __init__(self, peers: Peers, address: tuple[str, int], *, on_event: Callable[[Event], None] | None = None,
                 clock: Clock = time.monotonic, stall: float = STALL,
                 loop_busy_since: Callable[[], float | None] | None = None,
                 wants_ack: Callable[[str], bool] | None = None) -> None:
        self.peers = peers
        # asked (by the thread) before an Acked from a received datagram wakes the trio loop: the
        # loop needs acks only while something of it follows them (vipd/succession_tokens.py
        # `wants_ack`); the link state moves either way. None: every Acked is delivered
        self.wants_ack = wants_ack
        # when the trio loop's running batch began (on `clock`; None: it waits for I/O), read by
        # the thread; None: the loop checks in every stall/4 instead
        self.loop_busy_since = loop_busy_since
        self.address = address
        self.clock = clock
        self.stall = stall
        self.on_event = on_event or (lambda ev: None)
        self.directory: dict[str, tuple[str, int]] = {}
        self.send_errors: dict[str, int] = {}
        self.withholding = False  # sends stopped: the trio loop has not checked in for `stall`
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._replies: set[str] = set()  # peers owed a reply at once
        self._events: list[Event] = []  # for the trio loop
        self._posted = False  # a _deliver is scheduled on the trio loop
        self._failed: BaseException | None = None  # what ended the thread
        self._token: trio.lowlevel.TrioToken | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._stopping = False
        self._alive = clock()  # the trio loop's last check-in
        self._ended: trio.Event | None = None  # set (on the loop) when the thread ends
        self.grants: GrantWriter | None = None  # successors' grants re-armed here (vipd/peers/grants.py)

    @property
    def bound(self) -> tuple[str, int]:
        assert self._sock is not None
        return self._sock.getsockname()[:2]  # type: ignore[no-any-return]

    def set_peers(self, directory: dict[str, tuple[str, int]]) -> None:
        """Follow the host directory: {node: (ip, port)}; this node's own entry is ignored."""
        with self._lock:
            self.directory = {n: a for n, a in directory.items() if n != self.peers.node}
            events = self.peers.set_peers(self.directory, self.clock())
        for ev in events:
            self.on_event(ev)
        self._wake()

    def validate(self, peer: str, gen: Generation) -> None:
        with self._lock:
            events = self.peers.validate(peer, gen)
        for ev in events:
            self.on_event(ev)

    def hand_grants(self, grants: dict[str, int]) -> bool:
        """The trio side's grants (peer -> id) whose set exists: re-armed by this thread from now on.
        False: no writer (the trio side keeps re-arming them)."""
        if self.grants is None:
            return False
        with self._lock:
            self.grants.hand(grants)
        self._wake()
        return True

    def granted_until(self, peer: str) -> float | None:
        with self._lock:
            return self.peers.granted_until(peer)

    def link(self, peer: str) -> PeerLink | None:
        """The link's state (its fields are read without the lock: each is one atomic value, and its
        grants are replaced, never changed in place)."""
        return self.peers.links.get(peer)

    def peer_names(self) -> list[str]:
        return list(self.peers.links)

    def suspect(self, peer: str) -> bool:
        """May we take over from peer now? Drains the socket first. A yes opens a new suspicion
        generation at once when the periodic check has not yet (the thread may be a moment behind
        the caller's clock): under the lock the thread sends with, so no echo sent after this
        decision carries a generation the peer counts (vipd/peers/protocol.py, the safety argument)."""
        with self._lock:
            self._drain()
            now = self.clock()
            if not self.peers.suspect(peer, now):
                return False
            link = self.peers.links[peer]
            if not link.suspected:
                self._events.append(link.on_suspect(now))
                self._post()
            return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, start the thread, then check in every stall/4 until cancelled."""
        ip = ipaddress.ip_address(self.address[0])
        sock = socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_DGRAM)
        self._wake_r, self._wake_w = socket.socketpair()
        thread = None
        try:
            sock.setblocking(False)
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
            sock.bind(self.address)
            self._sock = sock
            self._token = trio.lowlevel.current_trio_token()
            self._alive = self.clock()
            self._stopping = False
            self._ended = trio.Event()
            thread = threading.Thread(target=self._serve, name="vipd-peers", daemon=True)
            thread.start()
            task_status.started()
            if self.loop_busy_since is not None:
                await self._ended.wait()  # (no wake-up until then: the thread reads the loop's state)
            while thread.is_alive():  # (so a hung loop's heartbeats stop 0.75 to 1 x stall after it hung)
                self._alive = self.clock()
                await trio.sleep(self.stall / 4)
            raise RuntimeError(f"heartbeat thread ended: {self._failed!r}")
        finally:
            self._stopping = True
            self._wake()
            if thread is not None:
                thread.join(1.0)
            if self.grants is not None and (thread is None or not thread.is_alive()):
                self.grants.close()
            self._sock = None
            sock.close()
            self._wake_r.close()
            self._wake_w.close()

    # ---- the thread ----------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"w")
            except (BlockingIOError, OSError):
                pass  # a wake-up is already pending (or we are closing)

    def _serve(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # run() re-raises it on the trio loop
            self._failed = e
        finally:
            ended, token = self._ended, self._token
            if ended is not None and token is not None:
                try:
                    token.run_sync_soon(ended.set)
                except trio.RunFinishedError:
                    pass

    def _loop_alive_at(self, now: float) -> float:
        """When the trio loop was last seen alive: now while it waits for I/O, else when its
        running batch began (or its last check-in, without the instrument)."""
        if self.loop_busy_since is None:
            return self._alive
        began = self.loop_busy_since()
        return now if began is None else max(self._alive, began)

    def _loop(self) -> None:
        assert self._sock is not None and self._wake_r is not None
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        interval = self.peers.params.interval
        while not self._stopping:
            with self._lock:
                deadline = None if self._replies else self.peers.next_deadline()
                now = self.clock()
                wait = 0.0 if self._replies else (None if deadline is None else max(0.0, deadline - now))
                if now - self._loop_alive_at(now) > self.stall:  # nothing is sent until the loop is back
                    wait = interval if wait is None else max(wait, interval)
            poller.poll(None if wait is None else math.ceil(wait * 1000))  # (ms: a deadline is served <= 1 ms late)
            try:
                while self._wake_r.recv(4096):
                    pass
            except (BlockingIOError, OSError):
                pass
            if self._stopping:
                return
            with self._lock:
                self._drain(wake=False)
                replies, self._replies = self._replies, set()
                now = self.clock()
                alive_at = self._loop_alive_at(now)
                live = now - alive_at <= self.stall
                if self.withholding == live:  # a change: logged (the peers are about to suspect this host)
                    self.withholding = not live
                    if live:
                        log.info("heartbeats_resumed")
                    else:
                        log.warning("heartbeats_withheld", loop_silent=round(now - alive_at, 3))
                if live:
                    for name in sorted(replies | set(self.peers.due(now))):
                        self._send(name, reply=name in replies)
                self._events.extend(self.peers.tick(self.clock()))
                self._post()
                due = self.grants.due(self.peers) if self.grants is not None else []
            if due:
                assert self.grants is not None
                self.grants.write(due)  # (outside the lock: a netlink round trip)

    def _drain(self, wake: bool = True) -> None:
        """Read every pending datagram (call with the lock held); peers that sent a periodic
        heartbeat are owed a reply at once (`wake`: the thread is told to send it)."""
        if self._sock is None:
            return
        for _ in range(MAX_DRAIN):
            try:
                data = self._sock.recv(256)
            except BlockingIOError:
                break
            except OSError:  # e.g. ECONNREFUSED reported for an earlier send: nothing to read
                continue
            name, reply, events = self.peers.receive(data, self.clock())
            if name is not None and reply:
                self._replies.add(name)
            wants = self.wants_ack
            self._events.extend(ev for ev in events if wants is None or not isinstance(ev, Acked) or wants(ev.peer))
        if self._replies and wake:
            self._wake()
        self._post()

    def _post(self) -> None:
        """Hand the events gathered so far to the trio loop (lock held)."""
        if not self._events or self._posted or self._token is None:
            return
        try:
            self._token.run_sync_soon(self._deliver)
            self._posted = True
        except trio.RunFinishedError:
            self._events.clear()

    def _deliver(self) -> None:
        with self._lock:
            events, self._events, self._posted = self._events, [], False
        for ev in events:
            self.on_event(ev)

    def _send(self, name: str, *, reply: bool) -> None:
        addr = self.directory.get(name)
        if addr is None or self._sock is None:
            return
        data = self.peers.build(name, self.clock(), reply=reply)  # sent_at is read before the sendto
        try:
            self._sock.sendto(data, addr)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED,
                               errno.EPERM, errno.ENOBUFS, errno.EINVAL):
                raise
            self.send_errors[name] = self.send_errors.get(name, 0) + 1

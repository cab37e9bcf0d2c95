"""The heartbeat transport: one UDP socket, one trio task, no busy polling.

The task sleeps until the socket is readable or the earliest deadline the protocol state asks for
(a peer's next periodic send, or the moment a peer becomes suspect), whichever comes first. It then
drains every pending datagram before deciding anything (a daemon that was paused reads what arrived
meanwhile before it suspects anyone), answers each periodic heartbeat at once, sends the periodic
heartbeats that are due, and only then asks the protocol which peers are now suspect.

Events (protocol.Acked / Suspected / Recovered / Challenged) go to a synchronous callback: it runs
on the transport task and must not block (put them on a memory channel with send_nowait, or update
state and set a trio.Event).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import time
from pathlib import Path
from typing import Callable

import trio

from vipd.peers.protocol import Event, Generation, PeerLink, Peers

Clock = Callable[[], float]
MAX_DRAIN = 4096  # datagrams read per wake-up before the deadlines are served again


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


class PeerTransport:
    """Moves the bytes of a Peers state over one UDP socket bound to this host's address."""

    def __init__(self, peers: Peers, address: tuple[str, int], *, on_event: Callable[[Event], None] | None = None,
                 clock: Clock = time.monotonic) -> None:
        self.peers = peers
        self.address = address
        self.clock = clock
        self.on_event = on_event or (lambda ev: None)
        self.directory: dict[str, tuple[str, int]] = {}
        self.send_errors: dict[str, int] = {}
        self._sock: socket.socket | None = None
        self._scope: trio.CancelScope | None = None  # the current wait: cancelled when the plan changes
        self._replies: set[str] = set()  # peers owed a reply at once

    @property
    def bound(self) -> tuple[str, int]:
        assert self._sock is not None
        return self._sock.getsockname()[:2]  # type: ignore[no-any-return]

    def set_peers(self, directory: dict[str, tuple[str, int]]) -> None:
        """Follow the host directory: {node: (ip, port)}; this node's own entry is ignored."""
        self.directory = {n: a for n, a in directory.items() if n != self.peers.node}
        self.peers.set_peers(self.directory, self.clock())
        self._wake()

    def _wake(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    def validate(self, peer: str, gen: Generation) -> None:
        for ev in self.peers.validate(peer, gen):
            self.on_event(ev)

    def granted_until(self, peer: str) -> float | None:
        return self.peers.granted_until(peer)

    def link(self, peer: str) -> PeerLink | None:
        return self.peers.links.get(peer)

    def peer_names(self) -> list[str]:
        return list(self.peers.links)

    def suspect(self, peer: str) -> bool:
        """May we take over from peer now? Drains the socket first (run on the transport's own trio loop)."""
        self._drain()
        return self.peers.suspect(peer, self.clock())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        ip = ipaddress.ip_address(self.address[0])
        sock = socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind(self.address)
            self._sock = sock
            task_status.started()
            while True:
                await self._wait()
                self._drain()
                replies, self._replies = self._replies, set()
                now = self.clock()
                for name in sorted(replies | set(self.peers.due(now))):
                    self._send(name, reply=name in replies)
                for ev in self.peers.tick(self.clock()):
                    self.on_event(ev)
        finally:
            self._sock = None
            sock.close()

    async def _wait(self) -> None:
        assert self._sock is not None
        if self._replies:
            await trio.lowlevel.checkpoint()
            return
        deadline = self.peers.next_deadline()
        at = float("inf") if deadline is None else trio.current_time() + (deadline - self.clock())
        with trio.move_on_at(at) as scope:
            self._scope = scope
            await trio.lowlevel.wait_readable(self._sock)
        self._scope = None
        if scope.cancelled_caught:
            await trio.lowlevel.checkpoint()

    def _drain(self) -> None:
        """Read every pending datagram; peers that sent a periodic heartbeat are owed a reply at once."""
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
            for ev in events:
                self.on_event(ev)
        if self._replies:
            self._wake()

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

"""Successors' grants re-armed by the heartbeat thread, as the echoes that move them arrive.

Why here. A grant lives L (90 ms at the shipped timing) past the send time of the successor's
newest counted echo, and every VIP the owner serves under that successor (the grant's group,
vipd/dataplane/fence_build.py) is dark in the owner's own fence once it lapses. Re-armed from the
trio loop, an ack reached the kernel three scheduler batches after it arrived (the ack's
delivery, the refresh task, the fence job's answer); in a takeover wave those batches took tens of
milliseconds each and the grants lapsed again and again, with no single long batch to blame: on
the hosts that stayed, while a third host with 1,000 VIPs stopped, up to ~1,000-1,600 VIPs were
dark at once (bench/scale.py, planned stop, "dark"). This thread holds the echoes first: it
re-arms each grant whose deadline moved a step, right after the datagrams that moved it, on a
netlink socket of its own (no trio batch, no shared netlink queue in between).

Safety. The deadline written is `PeerLink.granted_until()`: the value the trio side armed
(vipd/succession_tokens.py `_grant`) and the one the takeover's safety argument bounds
(vipd/succession.py, vipd/peers/protocol.py), read under the transport's lock from the echoes
received, counting only generations the trio side validated. Each write's timeout counts from a
clock read plus the kernel's expected lead and is re-sent shorter at once when the send ran late
(vipd/dataplane/fence_send.py `write`), as every token write is. The trio side creates a grant's
set and chain in the batch that first puts units in its group and only then hands the grant here;
from then on it never writes that grant again, so no stale value of its own can shorten or remove
one this thread wrote later. A grant whose deadline fell or lapsed is removed (a deadline already
over), as the trio side did. What a write cannot do is re-open anything the protocol closed: a
suspicion's newer generation stops the deadline moving here exactly as there, and a thawed
process re-reads the echoes before it writes (the transport drains its socket first).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

from pyroute2.netlink.exceptions import NetlinkError

from vipd import log
from vipd.dataplane.fence_send import Sockets, TokenOps, write
from vipd.errors import FenceError
from vipd.peers.protocol import Peers

Clock = Callable[[], float]


class GrantWriter:
    """Owned by the heartbeat thread: `due` under the transport's lock, `write` outside it.
    `hand` is called by the trio side (under the same lock)."""

    def __init__(self, netns: Optional[str], timeout_update: bool, clock: Clock, step: float) -> None:
        self._netns = netns
        self._timeout_update = timeout_update
        self._clock = clock  # the transport's (the trio loop's clock, readable here)
        self._step = step  # re-arm when a deadline moved this much (or fell): as the trio side did
        self._grants: dict[str, int] = {}  # peer -> grant id, handed by the trio side
        self._armed: dict[str, float] = {}  # peer -> the deadline last written here, as computed (the due rule)
        self._written: dict[str, float] = {}  # ... as the kernel got it (one already over: removed)
        self._socks: Optional[Sockets] = None
        self.writes = 0
        self.failures = 0
        self._failed_once = False
        self.stopped = False  # the daemon is dropping its tables: nothing more is written

    def hand(self, grants: dict[str, int]) -> None:
        """Grants (peer -> id) whose set and chain exist: from now on written here only."""
        self._grants.update(grants)

    def due(self, peers: Peers) -> list[tuple[str, int, float]]:
        """(peer, id, deadline) of every handed grant that moved a step or fell (call with the
        transport's lock held: the links are read as the protocol leaves them)."""
        out = []
        for peer, gid in self._grants.items():
            link = peers.links.get(peer)
            g = link.granted_until() if link is not None else None
            g = -math.inf if g is None else g
            was = self._armed.get(peer)
            if was is None or g < was or (g > was and g - was >= self._step):
                out.append((peer, gid, g))
        return out

    def write(self, due: list[tuple[str, int, float]]) -> None:
        """Write `due` in one batch (no lock held). A failure is counted and logged once: the
        grants end at their previous deadlines (never unsafe), and the trio side's fence
        (verify, rebuild) repairs a table that went missing."""
        if not due or self.stopped:
            return
        now = time.perf_counter()
        offset = self._clock() - now  # trio clock -> perf_counter (fence_send's clock)
        over = now - 1.0  # a deadline already over: the element is removed
        ops = TokenOps(grants=[(gid, max(g - offset, over)) for _, gid, g in due])
        try:
            if self._socks is None:
                self._socks = Sockets(self._netns)
            self._socks.created.update(gid for _, gid, _ in due)  # (created by the trio side: never here)
            write(self._socks, ops, lambda: ops, None, self._timeout_update)
        except (OSError, NetlinkError, FenceError) as e:
            self.failures += 1
            if not self._failed_once:  # (every failure is counted: vipd_fence_grant_write_failures)
                self._failed_once = True
                log.warning("grant_write_failed", thread="heartbeats", error=e)
            return
        self.writes += 1
        for peer, _, g in due:
            self._armed[peer] = g
            self._written[peer] = max(g, over + offset)

    def written(self, peer: str) -> Optional[float]:
        """The deadline last written for `peer`'s grant (trio clock; None before the first write):
        what the trio side's fence reads as that grant's deadline (NftFence.grant_source), for its
        lapse count and a rebuild. Read from the trio thread: one dict lookup."""
        return self._written.get(peer)

    def close(self) -> None:
        if self._socks is not None:
            self._socks.close()
            self._socks = None

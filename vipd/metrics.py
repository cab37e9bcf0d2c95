"""Prometheus metrics behind verb-named helpers, and a tiny trio HTTP endpoint that serves them.

The per-VIP series (state, owner, epoch, health, address presence, transitions, announcements,
conflicts, dataplane errors, takeovers) are plain dicts turned into metric families at scrape time
(vipd/metrics_text.py): a prometheus_client child per VIP and label set costs ~1-2 KB and a lock, and
with thousands of VIPs those children were tens of MiB of the daemon's RSS.
"""

from __future__ import annotations

import trio
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from vipd import log, metrics_text
from vipd.errors import VipdError
from vipd.streams import read_until
from vipd.model import State


class _VipSeries:
    """The per-VIP series, as dicts (written out by vipd/metrics_text.py at scrape time)."""

    def __init__(self) -> None:
        self.state: dict[str, State] = {}
        self.epoch: dict[str, int] = {}
        self.healthy: dict[str, bool] = {}
        self.present: dict[str, bool] = {}
        self.transitions: dict[tuple[str, str, str], int] = {}
        self.announcements: dict[str, int] = {}
        self.conflicts: dict[str, int] = {}
        self.errors: dict[tuple[str, str], int] = {}
        self.takeovers: dict[tuple[str, str], int] = {}

    def snapshot(self) -> "_VipSeries":
        """A copy of every dict (taken in the event loop, which alone writes them)."""
        out = _VipSeries()
        out.__dict__.update({k: dict(d) for k, d in self.__dict__.items()})
        return out


class Metrics:
    def __init__(self, node: str) -> None:
        self.registry = r = CollectorRegistry()
        self._vips = _VipSeries()
        self._keepalive = Histogram("vipd_lease_keepalive_seconds", "Lease keepalive round trip",
                                    buckets=(.001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2), registry=r)
        self._etcd_up = Gauge("vipd_etcd_reachable", "1 when the last etcd request succeeded", registry=r)
        self._validity = Gauge("vipd_lease_validity_seconds",
                               "Seconds before the host lease could expire in etcd (0: no lease)", registry=r)
        self._valid_until = 0.0
        self._validity.set_function(lambda: max(0.0, self._valid_until - trio.current_time())
                                    if self._valid_until else 0.0)
        self._l2_blocked = Gauge("vipd_l2_blocked", "1 while L2 VIPs on the interface are refused (proxy-ARP segment)",
                                 ["interface"], registry=r)
        self._takeover_seconds = Histogram("vipd_takeover_seconds", "From the owner key's deletion seen to the "
                                           "address added here", ["cause"],
                                           buckets=(.005, .01, .02, .05, .1, .2, .5, 1, 2, 5), registry=r)
        Gauge("vipd_info", "This daemon", ["node"], registry=r).labels(node).set(1)

    def record_transition(self, vip: str, old: State, new: State) -> None:
        v = self._vips
        key = (vip, old.value, new.value)
        v.transitions[key] = v.transitions.get(key, 0) + 1
        v.state[vip] = new

    def set_epoch(self, vip: str, epoch: int) -> None:
        self._vips.epoch[vip] = epoch

    def count_announcements(self, vip: str, frames: int) -> None:
        a = self._vips.announcements
        a[vip] = a.get(vip, 0) + frames

    def count_conflict(self, vip: str) -> None:
        c = self._vips.conflicts
        c[vip] = c.get(vip, 0) + 1

    def set_healthy(self, vip: str, healthy: bool) -> None:
        self._vips.healthy[vip] = healthy

    def count_dataplane_error(self, vip: str, op: str) -> None:
        e = self._vips.errors
        e[(vip, op)] = e.get((vip, op), 0) + 1

    def observe_keepalive(self, seconds: float) -> None:
        self._keepalive.observe(seconds)

    def set_etcd_reachable(self, up: bool) -> None:
        self._etcd_up.set(1 if up else 0)

    def set_lease_valid_until(self, valid_until: float) -> None:
        """valid_until on trio's clock; 0 when there is no lease."""
        self._valid_until = valid_until

    def set_l2_blocked(self, interface: str, blocked: bool) -> None:
        """After vipd.doctor.checks_l2.l2_blockers: 1 for each refused interface, 0 for the others."""
        self._l2_blocked.labels(interface).set(1 if blocked else 0)

    def set_address_present(self, vip: str, present: bool) -> None:
        """From the reconcile tick: are the unit's (tagged) addresses all in the kernel right now? (`vip`
        is the unit's name, as for vipd_vip_owner, so the two join in the VipdVipAddressMissing alert.)"""
        self._vips.present[vip] = present

    def record_takeover(self, vip: str, cause: str, seconds: float | None = None) -> None:
        """A claim of a VIP another host held: cause "released" or "expired"; seconds from the owner
        key's deletion (as this host saw it) to the address added, when known."""
        t = self._vips.takeovers
        t[(vip, cause)] = t.get((vip, cause), 0) + 1
        if seconds is not None:
            self._takeover_seconds.labels(cause).observe(seconds)

    def render(self) -> bytes:
        return metrics_text.render(self._vips) + generate_latest(self.registry)

    async def render_async(self) -> bytes:
        """A scrape without holding the event loop: the per-VIP text (78 ms at 10,000 VIPs:
        bench/metrics_render.py) is written in a worker thread from a snapshot of the dicts, the
        host families (their callbacks read trio's clock) here."""
        host, snap = generate_latest(self.registry), self._vips.snapshot()
        return await trio.to_thread.run_sync(metrics_text.render, snap) + host


async def serve(metrics: Metrics, listen: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve GET /metrics on host:port until cancelled."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    try:
        listeners = await trio.open_tcp_listeners(int(port), host=host)
    except OSError as e:  # taken since `vipd run` checked it: one line from the CLI, not a traceback
        raise VipdError(f"metrics.listen: cannot listen on {listen}: {e.strerror or e}") from None
    log.info("metrics_listening", listen=listen)
    task_status.started(listeners)

    async def handle(stream: trio.SocketStream) -> None:
        with trio.move_on_after(5):
            data = await read_until(stream, b"\r\n\r\n", 8192)
            if b"\r\n\r\n" not in data and len(data) < 8192:
                return  # the peer closed before sending a whole request
            path = data.split(b" ", 2)[1] if data.count(b" ") >= 2 else b""
            if path.split(b"?")[0] in (b"/metrics", b"/"):
                body, status, ctype = await metrics.render_async(), b"200 OK", CONTENT_TYPE_LATEST.encode()
            else:
                body, status, ctype = b"not found\n", b"404 Not Found", b"text/plain"
            head = (b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype + b"\r\nContent-Length: "
                    + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n")
            try:
                await stream.send_all(head + body)
            except trio.BrokenResourceError:
                pass
        await stream.aclose()

    await trio.serve_listeners(handle, listeners)

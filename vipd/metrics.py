"""Prometheus metrics behind verb-named helpers, and a tiny trio HTTP endpoint that serves them."""

from __future__ import annotations

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from vipd import log
from vipd.errors import VipdError
from vipd.streams import read_until
from vipd.model import State


class Metrics:
    def __init__(self, node: str) -> None:
        self.registry = r = CollectorRegistry()
        self._owner = Gauge("vipd_vip_owner", "1 while this host owns the VIP", ["vip"], registry=r)
        self._state = Gauge("vipd_vip_state", "1 for the VIP's current ownership state", ["vip", "state"], registry=r)
        self._epoch = Gauge("vipd_vip_epoch", "Ownership epoch (owner key create_revision) while owner",
                            ["vip"], registry=r)
        self._transitions = Counter("vipd_ownership_transitions", "Ownership state changes",
                                    ["vip", "from_state", "to_state"], registry=r)
        self._announcements = Counter("vipd_announcements", "Gratuitous ARP / unsolicited NA frames sent",
                                      ["vip"], registry=r)
        self._conflicts = Counter("vipd_address_conflicts", "Claims refused: another machine answers for the VIP",
                                  ["vip"], registry=r)
        self._healthy = Gauge("vipd_healthy", "1 while this host may serve the VIP (host and VIP checks pass)",
                              ["vip"], registry=r)
        self._errors = Counter("vipd_dataplane_errors", "Failed kernel operations", ["vip", "op"], registry=r)
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
        self._address_present = Gauge("vipd_vip_address_present",
                                      "1 while the VIP's address is in the kernel (compare with vipd_vip_owner)",
                                      ["vip"], registry=r)
        self._takeovers = Counter("vipd_takeovers", "VIPs this host took over, by what freed them "
                                  "(released: a planned hand-over; expired: the previous owner's lease ran out)",
                                  ["vip", "cause"], registry=r)
        self._takeover_seconds = Histogram("vipd_takeover_seconds", "From the owner key's deletion seen to the "
                                           "address added here", ["cause"],
                                           buckets=(.005, .01, .02, .05, .1, .2, .5, 1, 2, 5), registry=r)
        Gauge("vipd_info", "This daemon", ["node"], registry=r).labels(node).set(1)
        self._moved: dict[tuple[str, State, State], Counter] = {}
        self._states: dict[str, tuple[dict[State, Gauge], Gauge]] = {}

    def record_transition(self, vip: str, old: State, new: State) -> None:
        # the labelled children are cached: labels() costs ~6 us a call, and 2,000 VIPs start at once
        key = (vip, old, new)
        moved = self._moved.get(key)
        if moved is None:
            moved = self._moved[key] = self._transitions.labels(vip, old.value, new.value)
        moved.inc()
        states = self._states.get(vip)
        if states is None:
            states = self._states[vip] = ({st: self._state.labels(vip, st.value) for st in State},
                                          self._owner.labels(vip))
            for st, gauge in states[0].items():
                gauge.set(1 if st is new else 0)
        else:
            states[0][old].set(0)  # every other state's gauge is 0 already
            states[0][new].set(1)
        states[1].set(1 if new is State.OWNER else 0)

    def set_epoch(self, vip: str, epoch: int) -> None:
        self._epoch.labels(vip).set(epoch)

    def count_announcements(self, vip: str, frames: int) -> None:
        self._announcements.labels(vip).inc(frames)

    def count_conflict(self, vip: str) -> None:
        self._conflicts.labels(vip).inc()

    def set_healthy(self, vip: str, healthy: bool) -> None:
        self._healthy.labels(vip).set(1 if healthy else 0)

    def count_dataplane_error(self, vip: str, op: str) -> None:
        self._errors.labels(vip, op).inc()

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
        self._address_present.labels(vip).set(1 if present else 0)

    def record_takeover(self, vip: str, cause: str, seconds: float | None = None) -> None:
        """A claim of a VIP another host held: cause "released" or "expired"; seconds from the owner
        key's deletion (as this host saw it) to the address added, when known."""
        self._takeovers.labels(vip, cause).inc()
        if seconds is not None:
            self._takeover_seconds.labels(cause).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


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
                body, status, ctype = metrics.render(), b"200 OK", CONTENT_TYPE_LATEST.encode()
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

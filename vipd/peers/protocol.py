"""Host-to-host failure detector and successor-lease arithmetic (pure: no I/O, no clock; `now` is passed in).

Every host heartbeats every other host of its cluster (one datagram per host pair every h, never one
per VIP; see wire.py). Each message carries seq (the sender's counter toward the receiver) and echo
(the highest seq of the receiver's messages the sender has received). All times below are read on
the local monotonic clock of the host that uses them; no timestamp ever crosses hosts.

Owner side (O, toward a successor S): O keeps the local send time of each seq (a bounded ring). When
a message from S echoes seq k of O's *current* incarnation, O may arm its kernel token up to
    granted_until(S) = max(previous, sent_at(k) + L).

Successor side (S, toward O): acked_at(O) is the local send time of the first message S sent after
receiving O's newest seq (the first one carrying that echo). S promises never to take over anything
from O before acked_at(O) + G. suspect(O, now) holds when now >= acked_at(O) + G and no message from
O arrived since S last acked (the transport drains its socket before asking: a paused daemon reads
what arrived before it suspects anyone). A new link (first contact, a restart of S, a peer re-added)
starts with acked_at = its creation time: every ack an earlier incarnation of S ever sent was sent
before that, so the promise of the old incarnation is kept by the new one.

Suspicion generations. When S suspects O it increments suspect_gen toward O; every later message
carries it. Every decision to take over counts as a suspicion: the transport's `suspect()` opens the
generation itself when its periodic check has not yet, before it answers yes, under the lock its
sends take (so no echo sent after a decision carries a generation O already counts). O keys what it grants by the generation of the message carrying the echo, a pair
(S's incarnation, suspect_gen), ordered lexicographically, and grants only through generations the
daemon has validated (`validate(S, gen)`, called by the ownership core after an etcd transaction,
begun after it saw the generation, that makes a takeover by S on that suspicion impossible). Echoes
in messages of a newer generation grant nothing; O learns of a new generation through a
`Challenged(S, gen)` event.
Refinement of the brief (argued): the generation includes S's incarnation, and the first generation
of every S incarnation is unvalidated. Otherwise an S that suspected O (generation n+1, never seen by
O), took over and restarted would send generation 0 again, below O's validated n, and O would extend
its token through the acks of a host that may have taken over. The cost is one validation after a
peer restarts, which the core needs anyway to (re)name its successor.

Safety argument (why a successor never serves beside a live owner). Take any token O arms from an
echo of seq k carried by a message m of S whose generation O validated. m was built by S after S had
received k, so in real time sent_at(k) < receipt of k at S <= acked_at, where acked_at is S's ack
time of the newest seq at the moment S decides to take over (acked_at only moves forward, and any
echo in a message of a validated generation was sent before the suspicion that opened the next
generation). Then, in real time,
    O's token ends  <= sent_at(k) + L(1 + eps) + d  <=  acked_at + L(1 + eps) + d
                     <  acked_at + G(1 - eps)  <=  S's earliest takeover,
provided  G - L > (G + L) * eps + d + tick, with
  eps  = clock-rate error of CLOCK_MONOTONIC on either host (the kernel slews it by at most 500 ppm;
         a free-running crystal is within ~100 ppm); a host whose monotonic clock stops while the
         others run (a suspended VM) is outside this model;
  d    = delay between O reading its clock to compute the token's relative timeout
         (granted_until - now) and the kernel arming it (scheduling + netlink);
  tick = 4 ms nftables timeout granularity (the kernel rounds down, so this is extra slack).
S reads its clock before sending an ack (its real send is later: only more conservative) and reads it
again, after draining its socket, to decide; O reads sent_at before its sendto (its real send is later).
Defaults: h = 10 ms, L = 90 ms, G = 130 ms: G - L = 40 ms >= 220 ms * 5e-4 (0.11 ms) + 4 ms + d,
so d may reach ~35 ms. A GC pause or CPU starvation longer than that between reading the clock and
the netlink call is the residual risk; the ownership core should measure that interval and refuse
(disarm at once) when it exceeds the budget.
Liveness: S acks at once, so acked_at trails O's last heartbeat by one network delay and detection
after O dies takes between G and G + h (~130-140 ms); O's lease through S is renewed every h.

Reply at once without a storm: a periodic message is answered at once with a message flagged REPLY;
a REPLY is never answered at once (its echo rides on the next periodic message). Any send restarts
the periodic timer toward that peer, so a pair exchanges about two datagrams per h.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Union

from vipd.peers import wire

Generation = tuple[int, int]  # (peer incarnation, suspect_gen): ordered lexicographically


@dataclass(frozen=True)
class Params:
    interval: float = 0.010  # h
    lease: float = 0.090  # L
    grace: float = 0.130  # G
    ring: int = 256  # send times kept per peer (256 x 10 ms = 2.5 s of history)

    def __post_init__(self) -> None:
        if not (0 < self.interval and 0 < self.lease < self.grace and self.ring >= 8):
            raise ValueError(f"bad peer timing {self}")


@dataclass(frozen=True)
class Acked:
    """granted_until toward peer moved forward (local monotonic time)."""
    peer: str
    granted_until: float


@dataclass(frozen=True)
class Suspected:
    """This host suspects peer (its suspect generation toward peer is now gen)."""
    peer: str
    gen: int


@dataclass(frozen=True)
class Recovered:
    """A message from a suspected peer arrived."""
    peer: str


@dataclass(frozen=True)
class Challenged:
    """peer's messages carry a generation newer than the validated one: they grant nothing until validate()."""
    peer: str
    gen: Generation


Event = Union[Acked, Suspected, Recovered, Challenged]


@dataclass
class PeerStats:
    sent: int = 0
    received: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    lost: int = 0  # gaps in the peer's seq (heartbeats that never arrived)
    suspicions: int = 0
    detection_latency: float | None = None  # last: suspicion time - last receipt from the peer


class PeerLink:
    """The state of this host toward one peer, both roles at once (owner and successor)."""

    def __init__(self, name: str, my_inc: int, params: Params, now: float) -> None:
        self.name = name
        self.params = params
        self.my_inc = my_inc
        self.stats = PeerStats()
        # what we send
        self.seq = 0
        self._sent_at: list[tuple[int, float]] = [(0, 0.0)] * params.ring
        self.last_send: float | None = None
        self.suspect_gen = 0
        self.suspected = False
        # what we received (successor side)
        self.peer_inc = 0
        self.peer_seq = 0
        self.acked_at = now  # conservative start: every earlier ack of ours was sent before now
        self.unacked = False  # a message arrived that no message of ours has echoed yet
        self.last_rx: float | None = None
        # what we were granted (owner side)
        self.peer_gen: Generation | None = None
        self.validated: Generation | None = None
        self._base = float("-inf")  # grants folded from validated generations
        self._grants: dict[Generation, float] = {}

    # --- sending --------------------------------------------------------------------------------

    def on_send(self, now: float, reply: bool = False) -> wire.Message:
        """Build our next message to the peer, sent at `now` (read before the sendto)."""
        self.seq += 1
        self._sent_at[self.seq % self.params.ring] = (self.seq, now)
        if self.unacked:  # the first message carrying the newest echo
            self.acked_at = now
            self.unacked = False
        self.last_send = now
        self.stats.sent += 1
        return wire.Message(0, 0, self.my_inc, self.seq, self.peer_inc, self.peer_seq, self.suspect_gen, reply)

    def sent_at(self, seq: int) -> float | None:
        s, t = self._sent_at[seq % self.params.ring]
        return t if s == seq and seq > 0 else None

    def unechoed_since(self, echoed: float) -> float | None:
        """The send time of our oldest message sent after `echoed` (the send time of the newest
        message the peer echoed) that the ring still holds; None when we sent nothing since."""
        oldest, seq = None, self.seq
        while seq > 0 and seq > self.seq - self.params.ring:
            t = self.sent_at(seq)
            if t is None or t <= echoed + 1e-9:
                break
            oldest, seq = t, seq - 1
        return oldest

    def next_send(self) -> float:
        return float("-inf") if self.last_send is None else self.last_send + self.params.interval

    # --- receiving ------------------------------------------------------------------------------

    def on_receive(self, m: wire.Message, now: float) -> list[Event]:
        """A message that passed wire.Receiver (authentic, for us, newer than anything before)."""
        if (m.src_inc, m.seq) <= (self.peer_inc, self.peer_seq):
            return []  # defence in depth: the receiver already refuses these
        events: list[Event] = []
        before = self.granted_until()
        if m.src_inc == self.peer_inc:
            self.stats.lost += m.seq - self.peer_seq - 1
        self.peer_inc, self.peer_seq = m.src_inc, m.seq
        self.unacked = True
        self.last_rx = now
        self.stats.received += 1
        if self.suspected:
            self.suspected = False
            events.append(Recovered(self.name))
        gen = (m.src_inc, m.suspect_gen)
        if self.peer_gen is None or gen > self.peer_gen:
            self.peer_gen = gen
            if self.validated is None or gen > self.validated:
                events.append(Challenged(self.name, gen))
        if m.echo_inc == self.my_inc and m.echo_seq > 0:
            sent = self.sent_at(m.echo_seq)
            if sent is not None:
                until = sent + self.params.lease
                if until > self._grants.get(gen, float("-inf")):
                    # replaced, not changed in place: another thread may be reading granted_until()
                    self._grants = {**self._grants, gen: until}
        after = self.granted_until()
        if after is not None and (before is None or after > before):
            events.append(Acked(self.name, after))
        return events

    # --- decisions ------------------------------------------------------------------------------

    def suspect(self, now: float) -> bool:
        """True when we may take over from the peer: G has passed since our last ack and nothing new arrived."""
        return not self.unacked and now >= self.acked_at + self.params.grace

    def suspect_deadline(self) -> float | None:
        return None if (self.suspected or self.unacked) else self.acked_at + self.params.grace

    def on_suspect(self, now: float) -> Suspected:
        self.suspected = True
        self.suspect_gen += 1
        self.stats.suspicions += 1
        if self.last_rx is not None:
            self.stats.detection_latency = now - self.last_rx
        return Suspected(self.name, self.suspect_gen)

    def validate(self, gen: Generation) -> None:
        """The core proved through etcd that the peer cannot take over on suspicions up to gen."""
        if self.validated is not None and gen <= self.validated:
            return
        self.validated = gen
        folded = [t for g, t in self._grants.items() if g <= gen]
        if folded:  # _base first: a reader in between sees the grant twice, never not at all
            self._base = max(self._base, *folded)
            self._grants = {g: t for g, t in self._grants.items() if g > gen}

    def granted_upto(self, gen: Generation | None) -> float | None:
        """granted_until counting echoes of generations up to `gen` (None: the validated ones only)."""
        if gen is None or (self.validated is not None and gen <= self.validated):
            return self.granted_until()
        return self.granted_until(gen)

    def granted_until(self, validated: Generation | None = None) -> float | None:
        """Horizon (local monotonic) up to which the peer promised not to take over from us: only echoes
        in messages of generations <= validated count (default: the generation passed to validate())."""
        v = self.validated if validated is None else validated
        if v is None:
            return None
        if self.validated is not None and v < self.validated:
            raise ValueError(f"generation {v} is below the validated {self.validated}")
        best = max([self._base] + [t for g, t in self._grants.items() if g <= v])
        return None if best == float("-inf") else best


class Peers:
    """All links of one node, plus the wire codec: bytes in, bytes and events out."""

    def __init__(self, node: str, incarnation: int, key: bytes, params: Params = Params()) -> None:
        self.node = node
        self.incarnation = incarnation
        self.params = params
        self._key = wire.auth_key(key)
        self.me = wire.node_id(node)
        self.receiver = wire.Receiver(self._key, self.me)
        self.links: dict[str, PeerLink] = {}
        self._by_id: dict[int, str] = {}
        self.unattributed: dict[str, int] = {}  # rejections from no known peer, by reason

    def set_peers(self, names: Iterable[str], now: float) -> list[Event]:
        """Follow the host directory: new peers get a fresh link, gone peers are forgotten. A gone
        peer we suspected is no longer a suspect (Recovered): a host that left the directory (its
        presence lapsed) and comes back gets a fresh, unsuspected link, and nothing else would ever
        tell the units (which would go on trying to take over from it every retry)."""
        wanted = {n for n in names if n != self.node}
        ids = {wire.node_id(n): n for n in wanted}
        if len(ids) != len(wanted) or self.me in ids:
            raise ValueError("two node names share a wire id; rename one")
        events: list[Event] = []
        for name in set(self.links) - wanted:
            if self.links[name].suspected:
                events.append(Recovered(name))
            del self.links[name]
            self.receiver.forget(wire.node_id(name))
        for name in sorted(wanted - set(self.links)):
            self.links[name] = PeerLink(name, self.incarnation, self.params, now)
        self._by_id = ids
        self.receiver.known = set(ids)
        return events

    def build(self, peer: str, now: float, reply: bool = False) -> bytes:
        link = self.links[peer]
        m = link.on_send(now, reply)
        return wire.encode(self._key, wire.Message(self.me, wire.node_id(peer), m.src_inc, m.seq, m.echo_inc,
                                                   m.echo_seq, m.suspect_gen, m.reply))

    def receive(self, data: bytes, now: float) -> tuple[str | None, bool, list[Event]]:
        """One datagram: (peer it came from or None if rejected, whether to reply at once, events)."""
        try:
            m = self.receiver.accept(data)
        except wire.Rejected as r:
            name = self._by_id.get(r.src) if r.src is not None else None
            counts = self.links[name].stats.rejected if name in self.links else self.unattributed
            counts[r.reason.value] = counts.get(r.reason.value, 0) + 1
            return None, False, []
        name = self._by_id[m.src]
        return name, not m.reply, self.links[name].on_receive(m, now)

    def due(self, now: float) -> list[str]:
        """Peers whose periodic heartbeat is due."""
        return [n for n, link in self.links.items() if link.next_send() <= now]

    def tick(self, now: float) -> list[Event]:
        """Suspicions due at now (call after draining the socket and sending replies)."""
        return [link.on_suspect(now) for link in self.links.values()
                if not link.suspected and link.suspect(now)]

    def next_deadline(self) -> float | None:
        times: list[float] = []
        for link in self.links.values():
            times.append(link.next_send())
            d = link.suspect_deadline()
            if d is not None:
                times.append(d)
        return min(times) if times else None

    def suspect(self, peer: str, now: float) -> bool:
        return self.links[peer].suspect(now)

    def validate(self, peer: str, gen: Generation) -> list[Event]:
        link = self.links[peer]
        before = link.granted_until()
        link.validate(gen)
        after = link.granted_until()
        return [Acked(peer, after)] if after is not None and (before is None or after > before) else []

    def granted_until(self, peer: str, validated: Generation | None = None) -> float | None:
        return self.links[peer].granted_until(validated)

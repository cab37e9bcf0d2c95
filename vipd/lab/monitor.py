"""AddressMonitor: which lab hosts serve which watched addresses, over time, and dual ownership.

A host *holds* (serves) a VIP at t when the address is configured on it AND its nftables token
fence lets it through: no table ``netdev vipd_fence``, or the VIP not in its managed set, or the
VIP's token alive at t (:mod:`vipd.lab.fence_tokens`). vipd keeps a fenced owner's address while
the kernel drops all its traffic, so a frozen or killed owner keeps the address for seconds but
stops answering at its token's end: that is not dual ownership; live tokens overlapping are.
``address_only=True`` judges by the address alone (the old meaning); `address_timeline` always
shows who has the address.

One background thread owns two netlink sockets per host, both opened inside the host's namespace:
a dump socket (RTM_GETADDR) and an event socket subscribed to the IPv4/IPv6 address groups; and
(unless address_only) a NETLINK_NETFILTER socket that dumps the fence's sets (NFT_MSG_GETSETELEM).
- Every `interval` (a *sample*) it dumps every host's addresses.
- Between samples it sleeps in select() on the event sockets, so a change wakes it at once and the
  changed host is dumped again (events are used only as "look again" signals: the dump is the truth,
  and an event overflow costs nothing but a dump).
- A state is recorded only after a *stable pass*: every host's event socket read empty after the last
  dump. Reading hosts one after another is not an atomic snapshot, but this makes it sound: when a
  recorded state shows two holders, both held the address at the same instant (the moment of the
  stable pass). A clean move (delete on A, then add on B) never shows as dual, however close the two
  changes; an overlap is timed from the wake-up that saw it begin to the one that saw it end
  (sub-millisecond when the thread is idle, as it is between changes). Under an address storm (no
  stable pass within 20 dump rounds) the state is recorded unsettled: it may move an address to one
  holder or none, never show a new overlap (those addresses keep their holders until a stable pass).
- Tokens: per host and VIP it keeps the latest known token end (read time + the element's remaining
  ``expires``: never earlier than the kernel's cut, at most a tick (4 ms at HZ 250) later). A host
  dumped in a wake-up (every host on a sample) is read if it has a watched address it does not
  serve through a live known token (no table, lapsed, unknown), so a new arm is seen within a
  sample. A host serving through its token is read again at that token's known end (the thread
  wakes there: no event announces an end): refreshed, it goes on; not, it stopped serving AT that
  end (the timeline is cut there). It is also read every 20 ms before that end (REREAD): vipd
  shortens tokens (a successor named caps the etcd horizon to that successor's grant), and a read
  takes the element's remaining time as the truth, later or earlier; a token found absent before
  its known end is taken as gone at that read (erring toward an overlap by at most 20 ms).
  Before a state showing two holders is recorded, every holder not read in that
  wake-up is read again. So a recorded overlap of tokens is real (up to that tick), begins within
  a sample of the later arm (arms raise no event) and ends at the earlier token's end.
  The rule trusts the table to be whole (chains on the VIP's device; vipd's verify() repairs it).
  A host's token set, group map and grants are separate dumps: a read that an nftables batch
  landed in (the generation id moved, NFT_MSG_GETGEN) is taken again (fence_tokens
  `TokenGates.read`), or a VIP leaving its group as its token closed read as live and ungrouped.

Measured (2 CPUs, interval 10 ms; first figures on a quiet machine): 0.13-0.2 ms of CPU per
wake-up, 1.4 % of a core with 3 hosts, 2.2 % with 5 hosts and 20 addresses; mean gap 10.0 ms, max
gap ~11 ms. Overlaps of >= 1 ms were caught 199 times out of 200 (duration within ~0.5 ms), overlaps
of ~0.3 ms 35 times out of 200. The fence costs (bench/monitor.py, machine shared, load ~3.5; CPU
per sample, address only -> fence aware): 3 hosts, owner unfenced 0.28 -> 0.33 ms (2 set dumps per
sample, ~15 us each), owner fenced 0.27 -> 0.27 ms (no dump: read at its token's end only), plus
a lapsed host keeping the address 0.33 ms (4 dumps); 5 hosts, 20 VIPs, all fenced 0.50 -> 0.60 ms.
A dump's cost grows with the set: ~0.45 ms for a set of 1,000 tokens (a key is found by a byte
search, not a full parse). The thread shares the test process's GIL: a CPU-bound main thread
stretched the gaps to 16 ms mean, 40 ms max. `max_gap` reports the largest interval actually
achieved: a stalled monitor is visible (assert_never_dual(max_gap=...) can require it).
An IPv6 address whose DAD failed is held by nobody; a tentative one counts as held.
"""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import threading
import time
from typing import TYPE_CHECKING, Iterable, Sequence

from vipd.lab import fence_tokens, netns
from vipd.lab.fence_tokens import Judgement, TokenGates
from vipd.lab.topology import AnyIP, to_ip

if TYPE_CHECKING:
    from vipd.lab.topology import Host, Lab

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Timeline = list[tuple[float, frozenset[str]]]
_MAX_PASSES = 20  # dumps + re-checks per wake-up before a state is recorded unsettled (address storm)
_LATE = 0.0002  # seconds past a token end at which to wake (select may return a hair early)
_INF = float("inf")
Socks = list[tuple[str, socket.socket, socket.socket, socket.socket | None]]  # name, events, dump, nf


class IPMap(dict):  # type: ignore[type-arg]
    """A dict keyed by address that also accepts "10.0.0.1", "10.0.0.1/24" or an interface as key."""

    def __missing__(self, key: object) -> object:
        ip = to_ip(key)  # type: ignore[arg-type]
        if ip == key and type(ip) is type(key):
            raise KeyError(key)
        return self[ip]

    def get(self, key: object, default: object = None) -> object:
        try:
            return self[key]
        except (KeyError, ValueError):
            return default

    def __contains__(self, key: object) -> bool:
        return self.get(key, _ABSENT) is not _ABSENT


_ABSENT = object()


class AddressMonitor:
    """Samples every host's addresses every `interval` seconds (and on every address event)."""

    def __init__(self, lab: "Lab", ips: Iterable[AnyIP], interval: float = 0.01, *,
                 hosts: Sequence["Host"] | None = None, address_only: bool = False) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.lab = lab
        self.ips: tuple[IP, ...] = tuple(dict.fromkeys(to_ip(x) for x in ips))
        if not self.ips:
            raise ValueError("no address to watch")
        self.interval = interval
        self.hosts = list(lab.hosts if hosts is None else hosts)
        self._watched = frozenset(self.ips)
        self.address_only = address_only  # True: holding = having the address (the fence ignored)
        self._timeline: dict[IP, Timeline] = {ip: [] for ip in self.ips}  # who serves (see the docstring)
        self._addr_timeline: dict[IP, Timeline] = {ip: [] for ip in self.ips}  # who has the address
        self._gates = TokenGates()
        self._gated: set[tuple[str, IP]] = set()  # (host, VIP) served through a token at the last record
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._wake_w: int | None = None
        self.error: BaseException | None = None
        # statistics, written by the monitor thread only
        self.samples = 0  # completed periodic samples (a dump of every host)
        self.max_gap = 0.0  # largest interval between two consecutive samples, seconds
        self.events = 0  # netlink event datagrams received
        self.wakeups = 0  # recorded states (samples + event wake-ups)
        self.unsettled = 0  # wake-ups recorded without a stable pass (only under address storms)
        self.overflows = 0  # event socket overflows (each followed by a dump)
        self.busy = 0.0  # seconds spent dumping and recording
        self.token_wakeups = 0  # wake-ups at a known token end (no event announces one)
        self.started_at: float | None = None
        self.stopped_at: float | None = None
        self._last_record: float | None = None

    # ------------------------------------------------------------------ life cycle

    def start(self) -> "AddressMonitor":
        """Open the sockets and take the first sample before returning."""
        if self._thread is not None:
            raise RuntimeError("monitor already started")
        r, w = os.pipe()
        self._wake_w = w
        self._thread = threading.Thread(target=self._run, args=(r,), name="vipd-lab-monitor", daemon=True)
        self._thread.start()
        self.lab.add_cleanup(self.stop)
        if not self._ready.wait(10.0) or self.error is not None:
            err = self.error
            self.stop(raise_error=False)
            raise RuntimeError(f"address monitor did not start: {err!r}") from err
        return self

    def stop(self, raise_error: bool = True) -> None:
        """Stop sampling (idempotent). Raises RuntimeError if the monitor thread failed."""
        self.lab.remove_cleanup(self.stop)
        self._stop.set()
        if self._wake_w is not None:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(10.0)
            if self._thread.is_alive():
                raise RuntimeError("address monitor thread did not stop")
        if self._wake_w is not None:
            os.close(self._wake_w)
            self._wake_w = None
        if raise_error and self.error is not None:
            raise RuntimeError(f"address monitor failed: {self.error!r}") from self.error

    def __enter__(self) -> "AddressMonitor":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop(raise_error=exc[0] is None)

    # ------------------------------------------------------------------ the thread

    def _run(self, wake_r: int) -> None:
        opened: list[socket.socket] = []
        try:
            socks = []
            for h in self.hosts:
                # Subscribe before the first dump, so no change can fall between the two.
                ev = netns.netlink_socket(h.ns, netns.RTMGRP_IPV4_IFADDR | netns.RTMGRP_IPV6_IFADDR)
                opened.append(ev)
                ev.setblocking(False)
                dump = netns.netlink_socket(h.ns)
                opened.append(dump)
                nf = None if self.address_only else fence_tokens.netfilter_socket(h.ns)
                if nf is not None:
                    opened.append(nf)
                socks.append((h.name, ev, dump, nf))
            self._loop(wake_r, socks)
        except BaseException as e:  # reported by start()/stop() and self.error
            self.error = e
        finally:
            self.stopped_at = time.monotonic()
            for s in opened:
                s.close()
            os.close(wake_r)
            self._ready.set()
            with self._cond:
                self._cond.notify_all()

    def _loop(self, wake_r: int, socks: Socks) -> None:
        state: dict[str, frozenset[IP]] = {}
        watched = self._watched
        by_fd = {ev.fileno(): i for i, (_, ev, _, _) in enumerate(socks)}
        nf = {name: sock for name, _, _, sock in socks if sock is not None}
        fds = [*by_fd, wake_r]
        self.started_at = next_sample = time.monotonic()
        last_sample: float | None = None
        token_end = _INF
        while not self._stop.is_set():
            timeout = min(next_sample, token_end + _LATE) - time.monotonic()
            if timeout > 0:
                readable, _, _ = select.select(fds, [], [], timeout)
                if wake_r in readable:
                    break
            t0 = time.monotonic()
            sample = t0 >= next_sample
            self.token_wakeups += not sample and t0 >= token_end
            dirty = set(range(len(socks))) if sample else set()
            changed: set[str] = set()
            stable = False
            for _ in range(_MAX_PASSES):
                # One poll of every event socket (one syscall: few GIL hand-offs), then read the busy ones.
                for fd in select.select(list(by_fd), [], [], 0)[0]:
                    i = by_fd[fd]
                    n, overflow = netns.drain(socks[i][1])
                    self.events += n
                    self.overflows += overflow
                    if n or overflow:
                        dirty.add(i)
                if not dirty:
                    stable = True  # every host read quiet after its last dump
                    break
                for i in dirty:
                    name, _, dump, _ = socks[i]
                    state[name] = frozenset(a.ip for a in netns.dump_addresses(dump) if a.usable) & watched
                    changed.add(name)
                dirty.clear()
            j = self._by_address(state) if self.address_only else self._gates.settle(nf, state, changed)
            t = j.t
            self.unsettled += not stable
            self._record(j if stable else self._no_new_dual(j), state)
            token_end = j.next_end
            self.busy += time.monotonic() - t0
            if sample:
                self.samples += 1
                if last_sample is not None:
                    self.max_gap = max(self.max_gap, t - last_sample)
                last_sample = t
                next_sample += self.interval
                if next_sample <= t:  # late (stalled): resume the schedule from now, the gap shows
                    next_sample = t + self.interval
                self._ready.set()

    @staticmethod
    def _by_address(state: dict[str, frozenset[IP]]) -> Judgement:
        serving: dict[IP, set[str]] = {}
        for name, held in state.items():
            for ip in held:
                serving.setdefault(ip, set()).add(name)
        return Judgement(time.monotonic(), {ip: frozenset(n) for ip, n in serving.items()}, set(), _INF, set())

    def _no_new_dual(self, j: Judgement) -> Judgement:
        """An unsettled state (hosts read one after another while addresses kept changing) is no
        snapshot: two holders in it may never have held at once. It may move an address to one holder
        or none, never to two: those addresses keep their recorded holders (a real overlap that
        outlasts the storm is recorded by the next stable pass)."""
        serving = dict(j.serving)
        with self._cond:
            for ip, holders in j.serving.items():
                line = self._timeline[ip]  # (only watched addresses are judged)
                before = line[-1][1] if line else frozenset()
                if len(holders) >= 2 and before != holders:
                    if before:
                        serving[ip] = before
                    else:
                        del serving[ip]
        return j._replace(serving=serving)

    def _record(self, j: Judgement, state: dict[str, frozenset[IP]]) -> None:
        t, gated_before, last = j.t, self._gated, self._last_record
        empty: frozenset[str] = frozenset()
        with self._cond:
            for ip, line in self._timeline.items():
                holders = j.serving.get(ip, empty)
                if line and line[-1][1] != holders and last is not None and gated_before:
                    # a token that ended since the last record: the holder is gone from its end on
                    # (no event marks it; the state at `t` was read after it)
                    cut = sorted((end, name) for name in line[-1][1] - holders
                                 if (name, ip) in gated_before
                                 and (end := self._gates.gated_end(name, ip)) is not None and last < end < t)
                    for end, name in cut:
                        line.append((end, line[-1][1] - {name}))
                if not line or line[-1][1] != holders:
                    line.append((t, holders))
                addr_line = self._addr_timeline[ip]
                having = frozenset(name for name, held in state.items() if ip in held)
                if not addr_line or addr_line[-1][1] != having:
                    addr_line.append((t, having))
            self._gated = j.gated
            self._last_record = t
            self.wakeups += 1
            self._cond.notify_all()

    # ------------------------------------------------------------------ results

    def _end(self) -> float:
        return self.stopped_at if self.stopped_at is not None else (self._last_record or time.monotonic())

    def holders_timeline(self, ip: AnyIP | None = None) -> Timeline | dict[IP, Timeline]:
        """Per address: [(t_monotonic, holders)], one entry at the first sample and one at every change
        (holders are valid from t until the next entry). With `ip`, that address's list only."""
        with self._cond:
            if ip is not None:
                return list(self._timeline[to_ip(ip)])
            return IPMap((k, list(v)) for k, v in self._timeline.items())

    def address_timeline(self, ip: AnyIP) -> Timeline:
        """Like holders_timeline(ip), but of the hosts that have the address configured, whether
        or not their fence lets it through (a fenced host whose token ran out keeps it)."""
        with self._cond:
            return list(self._addr_timeline[to_ip(ip)])

    def holders_now(self, ip: AnyIP) -> frozenset[str]:
        """The holders in the latest recorded state."""
        with self._cond:
            line = self._timeline[to_ip(ip)]
            return line[-1][1] if line else frozenset()

    def wait_holders(self, ip: AnyIP, expected: Iterable[str], timeout: float = 5.0) -> bool:
        """Wait until exactly `expected` hold `ip` (True), or `timeout` seconds (False)."""
        want, key = frozenset(expected), to_ip(ip)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                line = self._timeline[key]
                if line and line[-1][1] == want:
                    return True
                left = deadline - time.monotonic()
                if left <= 0 or self.stopped_at is not None:
                    return False
                self._cond.wait(left)

    def owner_changes(self, ip: AnyIP) -> list[tuple[float, frozenset[str], frozenset[str]]]:
        """[(t, old_holders, new_holders)] for every change after the first sample."""
        line = self.holders_timeline(ip)
        assert isinstance(line, list)
        return [(t, line[i - 1][1], holders) for i, (t, holders) in enumerate(line) if i]

    def dual_windows(self) -> list[tuple[IP, float, float, frozenset[str]]]:
        """[(ip, start, end, holders)] for every period in which two or more hosts held an address."""
        end = self._end()
        out = []
        with self._cond:
            for ip, line in self._timeline.items():
                for i, (t, holders) in enumerate(line):
                    if len(holders) >= 2:
                        out.append((ip, t, line[i + 1][0] if i + 1 < len(line) else end, holders))
        return out

    def dual_ownership(self) -> dict[IP, float]:
        """Seconds during which >= 2 hosts held the address, per watched address (0.0 when never).
        Keys are addresses; lookups also accept strings and interfaces."""
        total = IPMap((ip, 0.0) for ip in self.ips)
        for ip, start, end, _ in self.dual_windows():
            total[ip] += max(0.0, end - start)
        return total

    def assert_never_dual(self, max_gap: float | None = None) -> None:
        """AssertionError naming the address, the hosts and the time window of every dual ownership;
        also when `max_gap` is given and the monitor went blind for longer than that."""
        base = self.started_at or 0.0
        problems = [f"{ip} held by {', '.join(sorted(holders))} at once for {(end - start) * 1e3:.1f} ms "
                    f"(t={start:.3f}..{end:.3f}, +{start - base:.3f} s after the monitor started)"
                    for ip, start, end, holders in self.dual_windows()]
        if max_gap is not None and self.max_gap > max_gap:
            problems.append(f"the monitor went blind for {self.max_gap * 1e3:.1f} ms (> {max_gap * 1e3:.0f} ms)")
        if problems:
            raise AssertionError("dual ownership: " + "; ".join(problems) + f" [{self.summary()}]")

    def stats(self) -> dict[str, float]:
        duration = self._end() - (self.started_at or self._end())
        return {
            "samples": self.samples, "duration": duration, "interval": self.interval,
            "mean_gap": duration / (self.samples - 1) if self.samples > 1 else 0.0,
            "max_gap": self.max_gap, "events": self.events, "wakeups": self.wakeups,
            "unsettled": self.unsettled, "overflows": self.overflows,
            "busy_per_wakeup_ms": self.busy / self.wakeups * 1e3 if self.wakeups else 0.0,
            "busy_fraction": self.busy / duration if duration > 0 else 0.0,
            "token_reads": self._gates.reads, "token_wakeups": self.token_wakeups,
            "token_rereads": self._gates.rereads, "token_torn": self._gates.torn,
            "token_busy_fraction": self._gates.busy / duration if duration > 0 else 0.0,
        }

    def summary(self) -> str:
        s = self.stats()
        return (f"{s['samples']} samples in {s['duration']:.2f} s, mean gap {s['mean_gap'] * 1e3:.1f} ms, "
                f"max gap {s['max_gap'] * 1e3:.1f} ms, {s['events']} events, "
                f"{s['unsettled']} unsettled, {s['token_reads']} token reads, cpu {s['busy_fraction'] * 100:.1f} %")

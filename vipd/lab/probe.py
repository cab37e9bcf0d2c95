"""Probe: a client of the lab probing a VIP every 10 ms, recording which host answered each probe.

Design. A small child process runs inside the client namespace (`ip netns exec CLIENT python -m
vipd.lab.probe ...`): its own interpreter, so the pace of the probes and their timestamps do not depend
on the GIL of the test process, and a probe cannot outlive its parent by more than one probe (its
stdout breaks) or its `max_duration`.
- Each probe is an ICMP echo request sent through the client's ordinary kernel stack (a raw ICMP
  socket), so the destination MAC comes from the client's real neighbour cache, exactly as for any
  client: gratuitous ARP / unsolicited NA, ARP timeouts and stale entries all show in the results.
  The first probe creates the neighbour entry, as a ping would. The kernel of the holder answers; the
  hosts need nothing.
- The replies are read from an AF_PACKET socket on the client's NIC, whose source address is the MAC
  of the host that answered: the lab's fixed MACs name it (Lab.host_by_mac). The raw socket itself
  receives nothing (ICMP type filter), so nothing queues up.
- Each probe carries its 64-bit sequence number; the child prints one JSON line per probe sent and
  per reply, stamped with its time.monotonic(). CLOCK_MONOTONIC is system-wide (namespaces do not
  change it), so these times compare directly with the test's and the AddressMonitor's.
A reply later than `timeout` (default 100 ms) counts as lost: a probe queued during ARP resolution and
answered a second later was not service. Outages are measured to +-1 interval (the probes' spacing).

Measured: start ~50-80 ms; the child uses ~1.6 % of a core at 10 ms, the parent's reader well under
1 %; sends kept a max gap of ~12 ms on an idle 2-CPU machine.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vipd.lab.topology import AnyIP, Lab

_MAGIC = b"vipdprob"
_PAYLOAD = struct.Struct("!8sQ")  # magic, 64-bit sequence number
_ETH_P_IP, _ETH_P_IPV6 = 0x0800, 0x86DD
_PACKET_OUTGOING = 4
_SOL_RAW, _ICMP_FILTER = 255, 1
_ICMP6_FILTER = 1


@dataclass(frozen=True)
class Outage:
    """A period without answers: from the first unanswered probe to the next answered one."""

    start: float  # time.monotonic() when the first unanswered probe was sent
    end: float  # when the next answered probe was sent (if none: when the next probe would go out)
    ms: float  # (end - start) * 1000: the lost probes times the interval
    before_host: str | None  # the host that answered last before (None: nobody had yet)
    after_host: str | None  # the host that answered first after (None: still down at the end)
    lost: int  # probes sent and not answered in time

    @property
    def ongoing(self) -> bool:
        return self.after_host is None


class Probe:
    """Probes `ip` from the lab's client every `interval` seconds until stop() (or max_duration)."""

    def __init__(self, lab: "Lab", ip: "AnyIP", interval: float = 0.01, *, timeout: float | None = None,
                 max_duration: float = 600.0, log: str | Path | None = None) -> None:
        from vipd.lab.topology import to_ip  # here: the child process never needs the lab modules

        if interval < 0.001:
            raise ValueError("interval must be at least 1 ms")
        self.lab = lab
        self.ip = to_ip(ip)
        self.interval = interval
        self.timeout = timeout if timeout is not None else max(0.1, 5 * interval)
        self.max_duration = max_duration
        self.log = Path(log) if log is not None else Path(tempfile.gettempdir()) / f"{lab.prefix}-probe.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._cond = threading.Condition()
        self._sent: list[float] = []  # index = sequence number
        self._replies: dict[int, tuple[float, str]] = {}  # seq -> (t_received, host)
        self._last: tuple[float, str] | None = None  # latest reply in time: (t_received, host)
        self._ready = False
        self._ended = False
        self.max_send_gap = 0.0  # largest interval between two probes actually sent
        self.late = 0  # replies received after `timeout` (counted as lost)
        self.error: str | None = None

    # ------------------------------------------------------------------ life cycle

    def start(self, wait: float = 10.0) -> "Probe":
        """Start the child and wait until its sockets are open (the first probe goes out at once)."""
        if self._proc is not None:
            raise RuntimeError("probe already started")
        root = str(Path(__file__).resolve().parents[2])  # the directory holding the vipd package
        env = dict(os.environ)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        argv = [sys.executable, "-m", "vipd.lab.probe", "--ip", str(self.ip), "--ifname", self.lab.client.ifname,
                "--interval", repr(self.interval), "--max-duration", repr(self.max_duration)]
        self._proc = self.lab.popen(self.lab.client, argv, log=self.log, env=env, stdout=subprocess.PIPE)
        self._reader = threading.Thread(target=self._read, name="vipd-lab-probe", daemon=True)
        self._reader.start()
        self.lab.add_cleanup(self.stop)
        deadline = time.monotonic() + wait
        with self._cond:
            while not self._ready and not self._ended and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            ok = self._ready
        if not ok:
            self.stop()
            raise RuntimeError(f"probe did not start: {self.error or ''} {self._log_tail()}")
        return self

    def stop(self) -> None:
        """Stop probing (idempotent); results stay available."""
        self.lab.remove_cleanup(self.stop)
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(3.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(3.0)
        if self._reader is not None:
            self._reader.join(5.0)
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> "Probe":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        try:
            for raw in self._proc.stdout:
                try:
                    msg = json.loads(raw)
                except ValueError:
                    continue
                self._handle(msg)
        except (OSError, ValueError) as e:  # stdout closed under us by stop()
            self.error = self.error or repr(e)
        finally:
            with self._cond:
                self._ended = True
                self._cond.notify_all()

    def _handle(self, msg: list[Any]) -> None:
        kind = msg[0]
        with self._cond:
            if kind == "s":
                seq, t = msg[1], msg[2]
                if seq == len(self._sent):
                    if self._sent:
                        self.max_send_gap = max(self.max_send_gap, t - self._sent[-1])
                    self._sent.append(t)
            elif kind == "r":
                seq, t, mac = msg[1], msg[2], msg[3]
                if seq < len(self._sent) and seq not in self._replies:
                    host = self.lab.host_by_mac(mac)
                    name = host.name if host is not None else mac
                    if t - self._sent[seq] > self.timeout:
                        self.late += 1
                    else:
                        self._replies[seq] = (t, name)
                    if self._last is None or t >= self._last[0]:
                        self._last = (t, name)
            elif kind == "ready":
                self._ready = True
            self._cond.notify_all()

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    # ------------------------------------------------------------------ results

    def sent(self) -> int:
        with self._cond:
            return len(self._sent)

    def answered(self) -> int:
        with self._cond:
            return len(self._replies)

    def last_responder(self) -> str | None:
        """The host whose reply arrived last (in time, whether late or not)."""
        with self._cond:
            return self._last[1] if self._last else None

    def wait_responder(self, host: str, timeout: float = 5.0, since: float | None = None) -> bool:
        """Wait until a probe sent after `since` (default: now) is answered by `host`."""
        since = time.monotonic() if since is None else since
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for seq in range(len(self._sent) - 1, -1, -1):
                    if self._sent[seq] < since:
                        break
                    if self._replies.get(seq, (0.0, None))[1] == host:
                        return True
                left = deadline - time.monotonic()
                if left <= 0 or self._ended:
                    return False
                self._cond.wait(left)

    def responders(self) -> list[tuple[float, str]]:
        """[(t_sent, host)] of the first answered probe and of every change of responder."""
        out: list[tuple[float, str]] = []
        with self._cond:
            for seq in sorted(self._replies):
                host = self._replies[seq][1]
                if not out or out[-1][1] != host:
                    out.append((self._sent[seq], host))
        return out

    def outages(self, since: float | None = None, min_gap: float | None = None) -> list[Outage]:
        """Gaps between answered probes longer than `min_gap`, including one at the start (nothing
        answered yet) and one at the end (nothing answered since). The default, 2.5 intervals, makes
        two consecutive lost probes an outage and one lost probe plus scheduling jitter not. With
        `since`, only outages ending after it."""
        gap = 2.5 * self.interval if min_gap is None else min_gap
        with self._cond:
            sent, replies = list(self._sent), dict(self._replies)
        if not sent:
            return []
        # Answered probes, between a virtual one just before the first probe and one just after the last.
        marks = [(-1, sent[0] - self.interval, None),
                 *((seq, sent[seq], replies[seq][1]) for seq in sorted(replies)),
                 (len(sent), sent[-1] + self.interval, None)]
        out = []
        for (a, ta, host_a), (b, tb, host_b) in pairwise(marks):
            lost = b - a - 1
            if lost > 0 and tb - ta > gap:
                start = sent[a + 1]
                out.append(Outage(start, tb, (tb - start) * 1e3, host_a, host_b, lost))
        if since is not None:
            out = [o for o in out if o.end > since]
        return out

    def summary(self) -> str:
        return (f"{self.sent()} probes, {self.answered()} answered, {self.late} late, "
                f"max send gap {self.max_send_gap * 1e3:.1f} ms, last responder {self.last_responder()}")


# ====================================================================== the child process

def _icmp4_echo(ident: int, seq: int) -> bytes:
    payload = _PAYLOAD.pack(_MAGIC, seq)
    head = struct.pack("!BBHHH", 8, 0, 0, ident, seq & 0xFFFF)
    data = head + payload
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return data[:2] + struct.pack("!H", ~s & 0xFFFF) + data[4:]


def _icmp6_echo(ident: int, seq: int) -> bytes:  # the kernel fills in the ICMPv6 checksum
    return struct.pack("!BBHHH", 128, 0, 0, ident, seq & 0xFFFF) + _PAYLOAD.pack(_MAGIC, seq)


def _parse_reply(data: bytes, vip: bytes, ident: int) -> int | None:
    """The sequence number of our echo reply from `vip` in an IP packet, else None."""
    if len(vip) == 4:
        if len(data) < 20 or data[0] >> 4 != 4 or data[9] != 1 or data[12:16] != vip:
            return None
        off = (data[0] & 0x0F) * 4
        if len(data) < off + 8 + _PAYLOAD.size or data[off] != 0:
            return None
    else:
        if len(data) < 40 or data[0] >> 4 != 6 or data[6] != 58 or data[8:24] != vip:
            return None
        off = 40
        if len(data) < off + 8 + _PAYLOAD.size or data[off] != 129:
            return None
    if struct.unpack_from("!H", data, off + 4)[0] != ident:
        return None
    magic, seq = _PAYLOAD.unpack_from(data, off + 8)
    return seq if magic == _MAGIC else None


def _child(ip: str, ifname: str, interval: float, max_duration: float) -> int:
    vip = ipaddress.ip_address(ip)
    ident = os.getpid() & 0xFFFF
    out = sys.stdout

    def emit(*msg: Any) -> None:
        out.write(json.dumps(msg, separators=(",", ":")) + "\n")

    # SIGTERM/SIGINT only set a flag; the wake-up pipe ends the select() at once, and no line is
    # ever cut in the middle of its write.
    stopping = False

    def on_term(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    if vip.version == 4:
        tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        tx.setsockopt(_SOL_RAW, _ICMP_FILTER, struct.pack("I", 0xFFFFFFFF))  # receive no ICMP at all
        build, proto = _icmp4_echo, _ETH_P_IP
    else:
        tx = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        tx.setsockopt(socket.IPPROTO_ICMPV6, _ICMP6_FILTER, b"\xff" * 32)  # block every type
        build, proto = _icmp6_echo, _ETH_P_IPV6
    rx = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(proto))
    rx.bind((ifname, proto))
    rx.setblocking(False)
    vip_bytes = vip.packed
    dest = (str(vip), 0)
    seq = 0
    start = next_send = time.monotonic()
    deadline = start + max_duration
    emit("ready", start)
    out.flush()
    try:
        while not stopping:
            now = time.monotonic()
            if now >= next_send:
                if now >= deadline:
                    break
                try:
                    tx.sendto(build(ident, seq), dest)
                except OSError as e:  # e.g. EHOSTUNREACH after a failed ARP: a lost probe like any other
                    emit("e", seq, e.errno)
                emit("s", seq, now)
                seq += 1
                next_send += interval
                if next_send < now:  # stalled for more than an interval: skip the missed slots (the gap shows)
                    next_send = now + interval
                out.flush()
                continue
            readable, _, _ = select.select([rx, wake_r], [], [], next_send - now)  # type: ignore[type-var]
            if wake_r in readable:
                try:
                    os.read(wake_r, 512)
                except BlockingIOError:
                    pass
            if rx not in readable:
                continue
            for _ in range(1000):
                try:
                    data, addr = rx.recvfrom(2048)
                except BlockingIOError:
                    break
                t = time.monotonic()
                if addr[2] == _PACKET_OUTGOING:
                    continue
                got = _parse_reply(data, vip_bytes, ident)
                if got is not None:
                    emit("r", got, t, addr[4][:6].hex(":"))
            out.flush()
        emit("end", time.monotonic(), seq)
        out.flush()
    finally:
        tx.close()
        rx.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vipd.lab.probe",
                                description="ICMP-probe a VIP from the current netns; JSON lines on stdout")
    p.add_argument("--ip", required=True)
    p.add_argument("--ifname", required=True, help="the NIC whose replies are read (AF_PACKET)")
    p.add_argument("--interval", type=float, default=0.01)
    p.add_argument("--max-duration", type=float, default=600.0)
    a = p.parse_args(argv)
    try:
        return _child(a.ip, a.ifname, a.interval, a.max_duration)
    except BrokenPipeError:  # the parent is gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no noise at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())

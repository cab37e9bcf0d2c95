"""The token fence's sockets and its one kernel write path (owner thread only).

`Sockets`: pyroute2's NFTables for setup and dumps, a raw NETLINK_NETFILTER socket for token
batches, and what the owner thread knows of the table (grants created, send timing).
`TokenOps`: one atomic batch's worth of changes, deadlines on time.perf_counter's clock (the owner
thread cannot read trio's): VIP tokens and grants to arm (a deadline already over removes the
element), VIPs to put in a grant's group or take out of theirs. `send` encodes it
(vipd.dataplane.fence_wire.token_batch) and waits for the kernel's verdict; `write` sends it so
that no element outlives its deadline (vipd/dataplane/fence_nft.py's docstring), rebuilding the
table if it went missing.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.nftables.main import NFTables

from vipd.dataplane.fence_build import NFPROTO_NETDEV, drop_table_ops, encode_setup, grant_ops, setup_ops
from vipd.dataplane.fence_wire import parse_acks, token_batch, token_ms
from vipd.dataplane.netlink import enter_netns
from vipd.errors import FenceError

Key = Union[ipaddress.IPv4Interface, ipaddress.IPv6Interface]  # a VIP, as VipSpec.address

_NETLINK_NETFILTER = 12
_SOL_NETLINK, _NETLINK_CAP_ACK = 270, 10
_SO_SNDBUFFORCE = 32  # socket.SO_SNDBUFFORCE is not exported by every Python
_ACK_WAIT = 5.0  # seconds; the kernel answers a batch in well under a millisecond
_ENOENT = 2
_MAX_PASSES = 3  # sends of one token batch when the thread is held up (see fence_nft's docstring)
_LEAD_BASE = 0.0003  # seconds: clock read -> kernel insert for a small batch, with room to spare


class Sockets:
    """The owner thread's sockets: pyroute2 for setup and dumps, a raw one for token batches."""

    def __init__(self, netns: Optional[str]) -> None:
        with enter_netns(netns):
            self.nft = NFTables(nfgen_family=NFPROTO_NETDEV)
            self.raw = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
        self.raw.setsockopt(_SOL_NETLINK, _NETLINK_CAP_ACK, 1)
        self.raw.bind((0, 0))
        self.raw.settimeout(_ACK_WAIT)
        self.seq = 1
        self._sndbuf = self.raw.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        self.created: set[int] = set()  # grant ids whose chain and set exist
        self.per_elem = 2e-6  # seconds per element from clock read to kernel insert (running mean)
        self.last_batch = 0.0  # clock read -> kernel done, of the last batch

    def take_seqs(self, n: int) -> int:
        """Reserve `n` sequence numbers on the raw socket (dumps, batches); returns the first."""
        first = self.seq
        self.seq = (self.seq + n) & 0x7FFFFFFF or 1
        return first

    def fit(self, size: int) -> None:
        """Let one send of `size` bytes through (a token batch of thousands of VIPs is larger than
        the default socket buffer: EMSGSIZE). SO_SNDBUFFORCE needs CAP_NET_ADMIN, which vipd has."""
        if size + 4096 <= self._sndbuf // 2:  # (the kernel doubles what is set, and reports that)
            return
        want = 2 * (size + 4096)
        for opt in (_SO_SNDBUFFORCE, socket.SO_SNDBUF):
            try:
                self.raw.setsockopt(socket.SOL_SOCKET, opt, want)
                break
            except OSError:
                continue
        self._sndbuf = self.raw.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)

    def close(self) -> None:
        self.raw.close()
        self.nft.close()


@dataclass
class TokenOps:
    """One atomic batch: deadlines on time.perf_counter's clock."""
    tokens: list[tuple[Key, float]] = field(default_factory=list)
    grants: list[tuple[int, float]] = field(default_factory=list)  # (grant id, deadline)
    join: list[tuple[Key, int]] = field(default_factory=list)  # (VIP, grant id): it is in no group now
    leave: list[Key] = field(default_factory=list)  # VIPs in a group now

    def __len__(self) -> int:
        return len(self.tokens) + len(self.grants) + len(self.join) + len(self.leave)


def send(s: Sockets, ops: TokenOps, lead: float, timeout_update: bool) -> tuple[int, float, float, int]:
    """Send `ops` as one batch, each timeout counted from the clock read + `lead` (the moment the
    kernel is expected to have inserted it): (0 or the errno of the first failing message, that
    clock read and the perf_counter time right after the kernel processed the batch (both
    perf_counter), the elements armed). A batch whose encoding ran past its lead (the thread
    held up: preempted, or the process stopped) is encoded again from a fresh clock before it is
    sent: sent as it was, its timeouts would count from the late send, and a token the owner let
    lapse while it was stopped would serve again until `write` sent it once more (a SIGSTOPped
    owner, thawed, served beside its successor for 7 ms in bench/failover.py). What is left is a
    hold-up between the check and the kernel (a few bytecodes and the syscall), which `write`'s
    resend still bounds."""
    for _ in range(_MAX_PASSES):
        t0 = time.perf_counter()
        at = t0 + lead
        # (an address with its prefix is an address: encoded by its packed bytes, no .ip object made)
        arm = [(k, ms) for k, d in ops.tokens if (ms := token_ms(d, at))]
        remove = [k for k, d in ops.tokens if not token_ms(d, at)]
        grants = [(g, ms) for g, d in ops.grants if (ms := token_ms(d, at))]
        ungrant = [g for g, d in ops.grants if not token_ms(d, at)]
        data, last = token_batch(arm, remove, s.seq, timeout_update, grants=grants, ungrant=ungrant,
                                 join=list(ops.join), leave=list(ops.leave))
        if last < 0:
            return 0, t0, time.perf_counter(), 0
        s.fit(len(data))
        if time.perf_counter() <= at:
            break
    first = s.take_seqs(len(ops) + 16)
    s.raw.send(data)  # nfnetlink processes the whole batch inside this call
    sent = time.perf_counter()
    return _acked(s, first, last), t0, sent, len(arm) + len(grants)


def _acked(s: Sockets, first: int, last: int) -> int:
    """Read the raw socket's answers up to message `last`'s: 0, or the errno of the first message
    in first..last that failed (the kernel answers a batch in order, `last` asking for an ack)."""
    err = 0
    while True:
        try:
            reply = s.raw.recv(1 << 16)
        except socket.timeout:
            raise FenceError(f"no answer from nf_tables within {_ACK_WAIT:g} s") from None
        for seq, code in parse_acks(reply):
            if first <= seq <= last:
                err = err or code
                if seq == last:
                    return err


Table = tuple[Sequence[tuple[Key, str]], Sequence[Key]]  # (VIP, device) pairs and the ARP/ND-only VIPs of ensure()


def write(s: Sockets, ops: TokenOps, rebuilt: Callable[[], TokenOps], table: Optional[Table],
          timeout_update: bool) -> int:
    """Send `ops` in one batch. Each timeout is counted from the moment the kernel is expected to
    have inserted the last element (a lead learnt from past batches); if the send took longer, the
    batch is recomputed and sent again at once. A missing table or set: rebuilt from `table` (the
    last ensure()), then `rebuilt()` sent (everything a VIP's serving depends on: its token never
    goes back without its group). Returns elements armed."""
    armed = 0
    create_grants(s, ops)
    for _ in range(_MAX_PASSES):
        lead = _LEAD_BASE + 2.0 * s.per_elem * len(ops)
        err, t0, sent, armed = send(s, ops, lead, timeout_update)
        if err == _ENOENT and table is not None:
            rebuild(s, table[0], table[1], rebuilt(), timeout_update)
            return armed
        if err:
            raise NetlinkError(err)
        took = sent - t0  # the kernel inserted every element before send() returned
        s.last_batch = took
        s.per_elem += 0.2 * (took / max(1, len(ops)) - s.per_elem)
        if took <= lead:  # so each expires by t0 + took + ms <= its deadline
            return armed
        # sent again for its timeouts only: its group changes are in (a leave sent twice is
        # ENOENT: the table was rebuilt, every VIP dark for a moment, when a send ran late)
        ops = TokenOps(ops.tokens, ops.grants)
    return armed  # each pass shortened: the last one was sent with the freshest clock


def rebuild(s: Sockets, vip_devs: Sequence[tuple[Key, str]], l2only: Sequence[Key], ops: TokenOps,
            timeout_update: bool) -> None:
    """Delete and rebuild the whole table in one batch, then send `ops` in the next one: until then
    every managed VIP is dropped."""
    s.nft.nlm_request_batch(encode_setup(drop_table_ops() + setup_ops(vip_devs, (), l2only)))
    s.created.clear()
    create_grants(s, ops)
    if len(ops):
        err, _, _, _ = send(s, ops, _LEAD_BASE + 2.0 * s.per_elem * len(ops), timeout_update)
        if err:
            raise NetlinkError(err)


def send_prebuilt(s: Sockets, parts: Sequence[bytes]) -> None:
    """Send a batch `fence_build.prebuild` encoded (begin, ops asking for an ack, end), numbered
    here, on the raw socket; NetlinkError with the first failing message's errno."""
    first = s.take_seqs(len(parts))
    buf = bytearray(b"".join(parts))
    off = 0
    for i, part in enumerate(parts):
        struct.pack_into("=I", buf, off + 8, first + i)
        off += len(part)
    s.fit(len(buf))
    s.raw.send(buf)
    err = _acked(s, first + 1, first + len(parts) - 2)  # (the batch's begin and end are not acked)
    if err:
        raise NetlinkError(err)


def create_grants(s: Sockets, ops: TokenOps) -> None:
    """The chain and set of every grant `ops` arms or joins that has none yet (a batch of its own
    before `ops`: an empty grant set lets nothing through, and no VIP is in its group yet)."""
    new = {g for g, _ in ops.grants} | {g for _, g in ops.join}
    new.difference_update(s.created)
    if new:
        s.nft.nlm_request_batch(encode_setup(grant_ops(sorted(new))))
        s.created.update(new)

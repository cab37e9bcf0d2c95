"""The token fence's sockets and its one kernel write path (owner thread only).

`Sockets`: pyroute2's NFTables for setup and dumps, and a raw NETLINK_NETFILTER socket for token
batches. `TokenOps`: one atomic batch's worth of changes, deadlines on time.perf_counter's clock
(the owner thread cannot read trio's): VIP tokens and grants to arm (a deadline already over
removes the element), VIPs to put in a grant's group or take out of theirs. `send` encodes it
(vipd.dataplane.fence_build.token_batch) and waits for the kernel's verdict.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass, field
from typing import Optional, Union

from pyroute2.nftables.main import NFTables

from vipd.dataplane.fence_build import NFPROTO_NETDEV, parse_acks, token_batch, token_ms
from vipd.dataplane.netlink import enter_netns
from vipd.errors import FenceError

Key = Union[ipaddress.IPv4Interface, ipaddress.IPv6Interface]  # a VIP, as VipSpec.address

_NETLINK_NETFILTER = 12
_SOL_NETLINK, _NETLINK_CAP_ACK = 270, 10
_SO_SNDBUFFORCE = 32  # socket.SO_SNDBUFFORCE is not exported by every Python
_ACK_WAIT = 5.0  # seconds; the kernel answers a batch in well under a millisecond


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


def send(s: Sockets, ops: TokenOps, at: float, timeout_update: bool) -> tuple[int, float, int]:
    """Send `ops` as one batch, each timeout counted from `at` (perf_counter): (0 or the errno of
    the first failing message, the perf_counter time right after the kernel processed it, the
    elements armed)."""
    # (an address with its prefix is an address: encoded by its packed bytes, no .ip object made)
    arm = [(k, ms) for k, d in ops.tokens if (ms := token_ms(d, at))]
    remove = [k for k, d in ops.tokens if not token_ms(d, at)]
    grants = [(g, ms) for g, d in ops.grants if (ms := token_ms(d, at))]
    ungrant = [g for g, d in ops.grants if not token_ms(d, at)]
    data, last = token_batch(arm, remove, s.seq, timeout_update, grants=grants, ungrant=ungrant,
                             join=list(ops.join), leave=list(ops.leave))
    first = s.seq
    s.seq = (s.seq + len(ops) + 16) & 0x7FFFFFFF or 1
    if last < 0:
        return 0, time.perf_counter(), 0
    s.fit(len(data))
    s.raw.send(data)  # nfnetlink processes the whole batch inside this call
    sent = time.perf_counter()
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
                    return err, sent, len(arm) + len(grants)

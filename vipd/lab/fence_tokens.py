"""Reading vipd's nftables token fence in a lab host, for the address monitor (read only).

vipd's fence (:mod:`vipd.dataplane.fence_build`) is the table ``netdev vipd_fence``: a VIP in set
``managed4``/``managed6`` is served only while its element in ``token4``/``token6`` is alive
(elements carry a millisecond timeout; an expired element is absent for lookups and for dumps),
and, when map ``group4``/``group6`` sends it to a grant's chain, while that grant's set
(``grant_<id>``: one element per protocol) has a live element too.

:func:`read_set` dumps one set (NFT_MSG_GETSETELEM) over a NETLINK_NETFILTER socket opened inside
the host's namespace by :func:`netfilter_socket`, and returns, for the wanted keys only, each
element's remaining time: ``NFTA_SET_ELEM_EXPIRATION`` in ms (None for an element without a
timeout, as in the managed sets). A wanted key is found by a byte search for its value attribute
(~15 us for a small set, ~0.45 ms for 1,000 elements, where a full parse takes 2.6 ms). The
kernel computes the remaining time in whole jiffies from its last tick, so ``read time + expires``
(the read time taken after the answer arrived) is never earlier than the element's true end.
Nothing is ever written: the dump is the only request sent.

:class:`TokenGates` keeps, per host and VIP, what the reads showed, and judges who serves what at
an instant (the rule is stated on the class and in :mod:`vipd.lab.monitor`).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
import time
from typing import Iterable, Mapping, NamedTuple

from vipd.dataplane import nldump
from vipd.lab import netns

TABLE = "vipd_fence"  # == vipd.dataplane.fence_build.TABLE (not imported: the lab reads the kernel only)
MANAGED = {4: "managed4", 6: "managed6"}
TOKEN = {4: "token4", 6: "token6"}
GROUP = {4: "group4", 6: "group6"}
_GRANT_KEYS = frozenset(struct.pack("!H", p) for p in (0x0800, 0x0806, 0x86DD))  # a grant set's elements
IP = ipaddress.IPv4Address | ipaddress.IPv6Address
NETLINK_NETFILTER = 12
NFPROTO_NETDEV = 5

_NFT_GETSETELEM, _NFT_NEWSETELEM = (10 << 8) | 13, (10 << 8) | 12  # NFNL_SUBSYS_NFTABLES << 8 | msg
_NFT_GETGEN, _NFT_NEWGEN, _GEN_ID = (10 << 8) | 16, (10 << 8) | 15, 1
_NFGEN = 4  # struct nfgenmsg
_RTA = struct.Struct("=HH")
_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
_L_TABLE, _L_SET, _L_ELEMENTS, _LIST_ELEM = 1, 2, 3, 1
_E_KEY, _E_DATA, _E_EXPIRATION, _D_VALUE, _D_VERDICT, _V_CHAIN = 1, 2, 5, 1, 2, 2
_U64 = struct.Struct("!Q")


def netfilter_socket(ns: str) -> socket.socket:
    """A NETLINK_NETFILTER socket inside namespace `ns` (no multicast group)."""
    sock = netns.socket_in(ns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        sock.settimeout(5.0)  # a dump is answered at once: never wait forever
        sock.bind((0, 0))
    except BaseException:
        sock.close()
        raise
    return sock


def _nla(kind: int, payload: bytes) -> bytes:
    n = _RTA.size + len(payload)
    return _RTA.pack(n, kind) + payload + b"\0" * (-n & 3)


_TABLE_ATTR = _nla(_L_TABLE, TABLE.encode() + b"\0")
_SET_ATTR = {name: _nla(_L_SET, name.encode() + b"\0") for name in (*MANAGED.values(), *TOKEN.values())}
def _dump(sock: socket.socket, set_name: str) -> list[tuple[int, bytes, int, int]] | None:
    """The NEWSETELEM messages of one set dump; None when the table or the set does not exist."""
    body = (struct.pack("!BBH", NFPROTO_NETDEV, 0, 0) + _TABLE_ATTR
            + (_SET_ATTR.get(set_name) or _nla(_L_SET, set_name.encode() + b"\0")))
    request = lambda n: nldump.header(len(body), _NFT_GETSETELEM, nldump.NLM_F_REQUEST | nldump.NLM_F_DUMP, n) + body  # noqa: E731
    try:
        messages = nldump.dump(sock, request, f"NFT_MSG_GETSETELEM {set_name}")
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.EOPNOTSUPP):  # no table / set (no nf_tables)
            return None
        raise
    return [m for m in messages if m[0] == _NFT_NEWSETELEM]


def generation(sock: socket.socket) -> int | None:
    """The netns's nftables generation id (NFT_MSG_GETGEN): every committed batch raises it, so two
    equal readings around several set dumps mean no batch landed between them."""
    body = struct.pack("!BBH", 0, 0, 0)
    request = lambda n: nldump.header(len(body), _NFT_GETGEN, nldump.NLM_F_REQUEST | nldump.NLM_F_ACK, n) + body  # noqa: E731
    for kind, data, start, end in nldump.dump(sock, request, "NFT_MSG_GETGEN"):
        if kind == _NFT_NEWGEN:
            for akind, a0, a1 in _attrs(data, start + _NFGEN, end):
                if akind == _GEN_ID and a1 - a0 >= 4:
                    return struct.unpack_from("!I", data, a0)[0]
    return None


def read_set(sock: socket.socket, set_name: str, keys: frozenset[bytes]) -> dict[bytes, int | None] | None:
    """The elements of ``netdev vipd_fence`` set `set_name` whose key (packed address) is in `keys`:
    key -> remaining ms (None: no timeout). None when the table or the set does not exist."""
    messages = _dump(sock, set_name)
    if messages is None:
        return None
    out: dict[bytes, int | None] = {}
    for _, data, start, end in messages:
        _find_elements(data, start + _NFGEN, end, keys, out)
    return out


def read_groups(sock: socket.socket, map_name: str, keys: frozenset[bytes] | None) -> dict[bytes, str]:
    """The wanted VIPs (None: all) of verdict map `map_name` (group4/group6): key -> the grant
    chain it jumps to."""
    out: dict[bytes, str] = {}
    for _, data, start, end in _dump(sock, map_name) or []:
        _find_groups(data, start + _NFGEN, end, keys, out)
    return out


def _find_groups(data: bytes, pos: int, end: int, keys: frozenset[bytes] | None, out: dict[bytes, str]) -> None:
    """The wanted elements of one NEWSETELEM message of a verdict map: key -> the chain it jumps to."""
    for kind, a0, a1 in _attrs(data, pos, end):
        if kind != _L_ELEMENTS:
            continue
        for ekind, e0, e1 in _attrs(data, a0, a1):
            key, chain = None, None
            for akind, b0, b1 in _attrs(data, e0, e1) if ekind == _LIST_ELEM else []:
                inner = _attrs(data, b0, b1)
                if akind == _E_KEY:
                    key = next((data[c0:c1] for k, c0, c1 in inner if k == _D_VALUE), None)
                elif akind == _E_DATA:
                    for k, c0, c1 in inner:
                        if k == _D_VERDICT:
                            chain = next((data[d0:d1].rstrip(b"\0").decode() for vk, d0, d1 in _attrs(data, c0, c1)
                                          if vk == _V_CHAIN), None)
            if key is not None and (keys is None or key in keys) and chain:
                out[key] = chain


def read_grant(sock: socket.socket, name: str) -> int | None:
    """The remaining ms of grant set `name` (its latest element: erring toward serving); _ABSENT
    when it has no live element or does not exist."""
    els = read_set(sock, name, _GRANT_KEYS)
    if not els:
        return _ABSENT
    return None if any(ms is None for ms in els.values()) else max(ms for ms in els.values() if ms is not None)


def _attrs(data: bytes, pos: int, end: int) -> list[tuple[int, int, int]]:
    """(type, payload start, payload end) of the attributes in data[pos:end]."""
    out = []
    while pos + _RTA.size <= end:
        rlen, rtype = _RTA.unpack_from(data, pos)
        if rlen < _RTA.size:
            break
        out.append((rtype & _TYPE_MASK, pos + _RTA.size, min(end, pos + rlen)))
        pos += (rlen + 3) & ~3
    return out


def _find_elements(data: bytes, pos: int, end: int, keys: frozenset[bytes],
                   out: dict[bytes, int | None]) -> None:
    """The wanted elements of one NEWSETELEM message. Fast path, for large sets: an element's key
    is NFTA_LIST_ELEM { NFTA_SET_ELEM_KEY { NFTA_DATA_VALUE key } ... }, so a key whose value
    attribute does not occur in the message is not in it, and one that does is parsed from its
    enclosing element. Anything else (an occurrence not at that place): the full parse."""
    for key in keys:
        value = _RTA.pack(_RTA.size + len(key), _D_VALUE) + key
        at = data.find(value, pos, end)
        while at >= 0:
            elem = at - 2 * _RTA.size
            if elem < pos:
                return _parse_elements(data, pos, end, keys, out)
            klen, ktype = _RTA.unpack_from(data, at - _RTA.size)
            elen, etype = _RTA.unpack_from(data, elem)
            if (ktype & _TYPE_MASK != _E_KEY or klen != len(value) + _RTA.size
                    or etype & _TYPE_MASK != _LIST_ELEM or elem + elen > end):
                return _parse_elements(data, pos, end, keys, out)
            expires: int | None = None
            for akind, astart, astop in _attrs(data, elem + _RTA.size, elem + elen):
                if akind == _E_EXPIRATION and astop - astart >= 8:
                    expires = _U64.unpack_from(data, astart)[0]
            out[key] = expires
            at = data.find(value, at + len(value), end)


def _parse_elements(data: bytes, pos: int, end: int, keys: frozenset[bytes],
                    out: dict[bytes, int | None]) -> None:
    for kind, start, stop in _attrs(data, pos, end):
        if kind != _L_ELEMENTS:
            continue
        for ekind, estart, estop in _attrs(data, start, stop):
            if ekind != _LIST_ELEM:
                continue
            key: bytes | None = None
            expires: int | None = None
            for akind, astart, astop in _attrs(data, estart, estop):
                if akind == _E_KEY:
                    for dkind, dstart, dstop in _attrs(data, astart, astop):
                        if dkind == _D_VALUE:
                            key = data[dstart:dstop]
                elif akind == _E_EXPIRATION and astop - astart >= 8:
                    expires = _U64.unpack_from(data, astart)[0]
            if key is not None and key in keys:
                out[key] = expires


# --------------------------------------------------------------------------- per host and VIP: does the fence let it through?

REREAD = 0.02  # seconds: a live token is read again at least this often (a re-arm may shorten it)
TRIES = 3  # reads of one host while batches keep landing between their dumps (then the last is taken)
_ABSENT = -1
_INF = float("inf")


class TokenGates:
    """What the monitor knows of each host's fence, per (host, VIP): whether the fence gates the
    VIP at all (``open``: no table, or the VIP not in the managed set) and the latest known end of
    its token (``end``, time.monotonic(); only ever moves later). Used by one thread only.

    A host with the address serves the VIP at t iff it is open or its known end is later than t.
    A read that finds the token absent keeps the known end: a token ends early only by an explicit
    disarm, after which vipd removes the address anyway (erring toward serving is erring toward
    reporting an overlap, never toward hiding one)."""

    def __init__(self) -> None:
        self.end: dict[tuple[str, IP], float] = {}
        self.open: dict[tuple[str, IP], bool] = {}
        self.read_at: dict[str, float] = {}  # host -> time of its last read
        self.reads = 0  # set dumps sent
        self.rereads = 0  # hosts read again because a state would have shown two holders
        self.busy = 0.0  # seconds spent in them
        self.torn = 0  # reads taken again because a batch landed between their dumps

    def read(self, host: str, sock: socket.socket, ips: Iterable[IP]) -> float:
        """Read `host`'s token (and if needed managed) set for each of `ips` (addresses it has
        configured), again while a batch landed between the dumps (the generation moved, up to
        TRIES times): the token set, the group map and the grants are separate dumps, and a batch
        that takes a VIP out of its group and closes its token in one step (a rename starting)
        read half before, half after looked like a live token and no group: serving, for up to
        REREAD (a 9.3 ms "dual ownership" in the demo's link cut, where the owner retried its
        rename every 0.1 s). Returns the time of the read (after the answers arrived)."""
        ips = tuple(ips)
        for _ in range(TRIES):
            before = generation(sock)
            r = self._read(host, sock, ips)
            if generation(sock) == before:
                break
            self.torn += 1
        return r

    def _read(self, host: str, sock: socket.socket, ips: tuple[IP, ...]) -> float:
        t0 = r = time.monotonic()
        for version in (4, 6):
            mine = [ip for ip in ips if ip.version == version]
            if not mine:
                continue
            keys = frozenset(ip.packed for ip in mine)
            tokens = read_set(sock, TOKEN[version], keys)
            r = time.monotonic()
            self.reads += 1
            if tokens is None:  # no table (or not a whole one): nothing is dropped
                for ip in mine:
                    self.open[host, ip] = True
                continue
            live = frozenset(k for k in keys if k in tokens)
            groups = read_groups(sock, GROUP[version], live) if live else {}
            grants = {name: read_grant(sock, name) for name in set(groups.values())}
            self.reads += 1 + len(grants) if live else 0
            r = time.monotonic()
            unknown = []
            for ip in mine:
                k = (host, ip)
                ms = tokens.get(ip.packed, _ABSENT)
                grant = groups.get(ip.packed)
                if ms != _ABSENT and grant is not None:  # served while the token AND the grant live
                    g = grants[grant]
                    ms = _ABSENT if g == _ABSENT else g if ms is None else ms if g is None else min(ms, g)
                if ms != _ABSENT:  # the truth at r, later or earlier than known (a re-arm may shorten it)
                    self.end[k] = _INF if ms is None else r + ms / 1000.0
                elif self.end.get(k, -_INF) > r:  # removed before its known end: gone by r at the latest
                    self.end[k] = r
                if self.end.get(k, -_INF) > r:
                    self.open[k] = False  # alive: whether it is managed matters only once it ends
                else:
                    unknown.append(ip)
            if unknown:
                managed = read_set(sock, MANAGED[version], keys)
                r = time.monotonic()
                self.reads += 1
                for ip in unknown:
                    self.open[host, ip] = managed is None or ip.packed not in managed
        self.busy += r - t0
        self.read_at[host] = r
        return r

    def gated_end(self, host: str, ip: IP) -> float | None:
        """The known token end when the fence gates `ip` on `host`, else None (open or unknown)."""
        k = (host, ip)
        if self.open.get(k, True):
            return None
        return self.end.get(k, -_INF)

    def judge(self, state: Mapping[str, frozenset[IP]], t: float) -> Judgement:
        """Who serves what at `t` (`state`: host -> the watched addresses it has configured)."""
        serving: dict[IP, list[str]] = {}
        gated: set[tuple[str, IP]] = set()
        passed: set[str] = set()
        next_end = _INF
        end, open_, read_at = self.end, self.open, self.read_at
        for name, held in state.items():
            for ip in held:
                k = (name, ip)
                if not open_.get(k, True):
                    e = end.get(k, -_INF)
                    if e <= t:
                        if read_at.get(name, -_INF) < e:
                            passed.add(name)
                        continue
                    gated.add(k)
                    due = read_at.get(name, -_INF) + REREAD  # a re-arm may have shortened it since
                    if due <= t:
                        passed.add(name)
                    next_end = min(next_end, e, due)
                serving.setdefault(ip, []).append(name)
        return Judgement(t, {ip: frozenset(names) for ip, names in serving.items()}, gated, next_end, passed)

    def settle(self, socks: Mapping[str, socket.socket], state: Mapping[str, frozenset[IP]],
               changed: Iterable[str]) -> Judgement:
        """Read the fence of every host in `changed` (`state`: host -> the watched addresses it has)
        that has a watched address it does not serve through a known live token; then of every
        host whose known token end has passed since its last read; then once of every host that a
        state would show serving an address together with another. Returns who serves what at
        the instant after the last read.

        A host serving through a token is read again at the token's known end (cut there if not
        refreshed), and every REREAD before it: vipd shortens tokens too (a successor named caps
        the etcd horizon to its grant; an arm in the past removes the element), and a token found
        absent before its known end is taken as gone at that read (at most REREAD late)."""
        read_now: set[str] = set()
        t = time.monotonic()
        end, open_ = self.end, self.open
        todo = {name for name in changed
                if any(open_.get((name, ip), True) or not end.get((name, ip), -_INF) > t for ip in state.get(name, ()))}
        duals_checked = False
        for _ in range(4):  # bounded: a token that keeps ending between reads is read at the next wake
            for name in todo:
                self.read(name, socks[name], state[name])
                read_now.add(name)
            j = self.judge(state, time.monotonic())
            todo = j.passed
            if not todo and not duals_checked:
                duals_checked = True
                for names in j.serving.values():
                    if len(names) >= 2:
                        todo.update(h for h in names if h not in read_now)
                self.rereads += len(todo)
            if not todo:
                break
        return j


class Judgement(NamedTuple):
    t: float  # the instant judged
    serving: dict[IP, frozenset[str]]  # VIP -> the hosts that serve it (VIPs nobody serves: absent)
    gated: set[tuple[str, IP]]  # (host, VIP) served through a live token
    next_end: float  # the earliest known end of those tokens (inf: none)
    passed: set[str]  # hosts with a token whose known end passed since their last read


def dark_groups(sock: socket.socket, most: int = 16) -> dict[str, int]:
    """The grants of this host's fence with no live element, each with how many VIPs its group
    holds: VIPs whose owner (this host) serves them, that its own fence drops while the grant is
    dead (vipd/succession.py: a successor's grant bounds every VIP of its group). Cheap while no
    grant is dead (one small dump per grant, ids dense from 1); the group maps are read only then.
    A VIP whose own token lapsed is not counted here."""
    dead = []
    for gid in range(1, most + 1):
        name = f"grant_{gid}"
        els = read_set(sock, name, _GRANT_KEYS)
        if els is None:
            break
        if not els:
            dead.append(name)
    if not dead:
        return {}
    out = dict.fromkeys(dead, 0)
    for version in (4, 6):
        for chain in read_groups(sock, GROUP[version], None).values():
            if chain in out:
                out[chain] += 1
    return out

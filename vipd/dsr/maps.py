"""The director's maps, in the layouts bpf/dsr.c declares: services, their double-buffered Maglev
tables, backends, peers, the fence deadlines, interface MACs, and the counters read back.

Synchronous and fast (a table is one batch syscall); a trio task may call these directly.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence, Union

from vipd.dsr import maglev
from vipd.dsr.bpf import BpfError, BpfObject

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

MAX_SERVICES = 16
MAX_BACKENDS = 256
PROTOS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
# bpf/dsr.c enum reason, in order
REASONS = ("directed", "local", "pass_not_ip", "pass_vlan", "pass_truncated", "pass_proto", "pass_fragment",
           "pass_no_service", "pass_peer", "pass_not_armed", "pass_expired", "drop_no_backend", "drop_no_iface",
           "drop_fenced")


def mac_bytes(mac: str) -> bytes:
    b = bytes(int(x, 16) for x in mac.split(":"))
    if len(b) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return b


def svc_key(vip: IPAddress, proto: str, port: int) -> bytes:
    return struct.pack("=16sHBB", vip.packed, socket.htons(port), PROTOS[proto], vip.version)


def vip_key(vip: IPAddress) -> bytes:
    return struct.pack("=16sI", vip.packed, vip.version)


@dataclass(frozen=True)
class BackendSlot:
    name: str  # node name or static address: what Maglev hashes
    mac: str | None  # None: not resolved yet; its slots drop (counted) rather than go elsewhere
    local: bool  # this host itself: delivered up the stack


@dataclass
class Traffic:
    packets: int = 0
    bytes: int = 0


class DirectorMaps:
    """Programs one loaded dsr object. Backend ids are allocated per name and kept while in use."""

    def __init__(self, obj: BpfObject) -> None:
        self.services = obj.map("services")
        self.tables = obj.map("tables")
        self.backends = obj.map("backends")
        self.traffic = obj.map("backend_traffic")
        self.reasons = obj.map("reasons")
        self.fence = obj.map("fence")
        self.ifaces = obj.map("ifaces")
        self.peers = obj.map("peers")
        self._svc_ids: dict[bytes, int] = {}
        self._active: dict[bytes, int] = {}
        self._flags: dict[bytes, int] = {}
        self.generation: dict[bytes, int] = {}  # table generation per service key
        self._ids: dict[str, int] = {}  # backend name -> id
        self._slots: dict[str, BackendSlot] = {}
        self._tables: dict[bytes, tuple[str, ...]] = {}  # what each service's table holds
        self._table_cache: dict[tuple[str, ...], list[int]] = {}
        self._baseline: dict[int, Traffic] = {}  # percpu counters cannot be zeroed: subtract instead

    # -------------------------------------------------------------- services and tables

    def set_service(self, vip: IPAddress, proto: str, port: int, backends: Sequence[BackendSlot],
                    self_backend: bool = False) -> bool:
        """Make the service's table direct to exactly `backends` (by name). Writes the inactive
        half, then flips: a packet sees the old table or the new one, never a mix. `self_backend`:
        this host is one of the service's backends (unarmed, its frames go up the stack instead of
        being dropped). Returns True when the table changed."""
        key = svc_key(vip, proto, port)
        for b in backends:
            self._backend(b)
        names = tuple(sorted({b.name for b in backends}))
        flags = int(self_backend)
        if self._tables.get(key) == names and key in self._svc_ids:  # same members: the same table
            if self._flags.get(key) != flags:
                self.services.update(key, struct.pack("=III", self._svc_ids[key], self._active[key], flags))
                self._flags[key] = flags
            return False
        sid = self._svc_ids.get(key)
        if sid is None:
            free = sorted(set(range(MAX_SERVICES)) - set(self._svc_ids.values()))
            if not free:
                raise BpfError(f"more than {MAX_SERVICES} DSR services")
            sid = free[0]
        half = 1 - self._active.get(key, 1)
        table = self._table(names)
        ids = [self._ids[n] for n in names]
        values = struct.pack(f"={maglev.TABLE_SIZE}I", *(maglev.EMPTY if s == maglev.EMPTY else ids[s] for s in table))
        base = (sid * 2 + half) * maglev.TABLE_SIZE
        keys = struct.pack(f"={maglev.TABLE_SIZE}I", *range(base, base + maglev.TABLE_SIZE))
        self.tables.update_batch(keys, values, maglev.TABLE_SIZE)
        self.services.update(key, struct.pack("=III", sid, half, flags))  # the flip: one element, atomic
        self._svc_ids[key], self._active[key], self._flags[key] = sid, half, flags
        self._tables[key] = names
        self.generation[key] = self.generation.get(key, 0) + 1
        self._gc()
        return True

    def remove_service(self, vip: IPAddress, proto: str, port: int) -> None:
        key = svc_key(vip, proto, port)
        self.services.delete(key)
        self._svc_ids.pop(key, None)
        self._active.pop(key, None)
        self._flags.pop(key, None)
        self._tables.pop(key, None)
        self._gc()

    def _table(self, names: tuple[str, ...]) -> list[int]:
        if names not in self._table_cache:
            if len(self._table_cache) > 64:
                self._table_cache.clear()
            self._table_cache[names] = maglev.build(names)
        return self._table_cache[names]

    # -------------------------------------------------------------- backends and peers

    def _backend(self, b: BackendSlot) -> None:
        if self._slots.get(b.name) == b:
            return
        bid = self._ids.get(b.name)
        if bid is None:
            free = sorted(set(range(MAX_BACKENDS)) - set(self._ids.values()))
            if not free:
                raise BpfError(f"more than {MAX_BACKENDS} DSR backends")
            bid = free[0]
            self.traffic_reset(bid)
        if b.mac is None:
            self.backends.update(struct.pack("=I", bid), bytes(8))  # valid = 0
        else:
            self.backends.update(struct.pack("=I", bid), mac_bytes(b.mac) + bytes([int(b.local), 1]))
        old = self._slots.get(b.name)
        self._ids[b.name], self._slots[b.name] = bid, b
        if old is not None and old.mac is not None and old.mac != b.mac:
            self._unpeer(old.mac)
        if b.mac is not None:
            self.peers.update(mac_bytes(b.mac) + b"\0\0", b"\1")

    def _unpeer(self, mac: str) -> None:
        if not any(s.mac == mac for s in self._slots.values()):
            self.peers.delete(mac_bytes(mac) + b"\0\0")

    def _gc(self) -> None:
        """Forget backends no table refers to (after the flip, so no packet can still pick them)."""
        used = {n for names in self._tables.values() for n in names}
        for name in [n for n in self._ids if n not in used]:
            bid, slot = self._ids.pop(name), self._slots.pop(name)
            self.backends.update(struct.pack("=I", bid), bytes(8))
            if slot.mac is not None:
                self._unpeer(slot.mac)

    def traffic_reset(self, bid: int) -> None:
        self._baseline[bid] = self._raw_traffic(bid)

    def _raw_traffic(self, bid: int) -> Traffic:
        t = Traffic()
        for v in self.traffic.percpu_values(struct.pack("=I", bid)):
            p, b = struct.unpack("=QQ", v)
            t.packets += p
            t.bytes += b
        return t

    def backend_traffic(self) -> dict[str, Traffic]:
        """Packets and bytes directed (or delivered locally) per backend name, since it got its id."""
        base = self._baseline
        out = {}
        for name, bid in self._ids.items():
            raw, b0 = self._raw_traffic(bid), base.get(bid, Traffic())
            out[name] = Traffic(raw.packets - b0.packets, raw.bytes - b0.bytes)
        return out

    def service_backends(self) -> Mapping[bytes, tuple[str, ...]]:
        return dict(self._tables)

    # -------------------------------------------------------------- fence, interfaces, counters

    def set_deadline(self, vip: IPAddress, deadline_ns: int) -> None:
        self.fence.update(vip_key(vip), struct.pack("=Q", max(0, deadline_ns)))

    def clear_deadline(self, vip: IPAddress) -> None:
        self.fence.delete(vip_key(vip))

    def deadline(self, vip: IPAddress) -> int | None:
        raw = self.fence.lookup(vip_key(vip))
        return None if raw is None else int(struct.unpack("=Q", raw)[:1][0])

    def set_iface(self, ifindex: int, mac: str) -> None:
        self.ifaces.update(struct.pack("=I", ifindex), mac_bytes(mac) + b"\0\0")

    def reason_counts(self) -> dict[str, int]:
        out = {}
        for i, name in enumerate(REASONS):
            out[name] = sum(struct.unpack("=Q", v)[0] for v in self.reasons.percpu_values(struct.pack("=I", i)))
        return out


def slots(entries: Iterable[tuple[str, str, bool]]) -> list[BackendSlot]:
    return [BackendSlot(n, m, loc) for n, m, loc in entries]

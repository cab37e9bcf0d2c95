"""Many VIPs in a namespace lab: the configuration and the kernel's view, for bench/scale.py and
tests/lab/test_scale.py."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any, Iterable

from vipd.dataplane import addrdump
from vipd.dataplane.netlink import enter_netns
from vipd.lab.cluster import VipDef

VIPD_PROTO = 0x56
# log events that must never appear while a settled host sits still
TROUBLE = ("address_expired", "address_missing", "lease_deadline_passed", "lease_lost", "keepalive_failed",
           "owner_key_delete_failed", "address_claim_failed", "address_remove_failed", "fenced")
_EVENT_RE = re.compile(r" event=(\w+)")
_FENCE_RE = re.compile(r" to=fenced ")


def scale_vips(n_nic: int, n_lo: int, extra: dict[str, Any] | None = None) -> list[VipDef]:
    """n_nic VIPs on the host's NIC and n_lo on lo, IPv4 /32 and IPv6 /128 alternating."""
    out = []
    for kind, n, iface in (("n", n_nic, None), ("l", n_lo, "lo")):
        net4, net6 = ("10.214", "fd00:214::") if kind == "n" else ("10.215", "fd00:215::")
        for i in range(n):
            address = f"{net4}.{i // 250}.{1 + i % 250}/32" if i % 2 == 0 else f"{net6}{i + 1:x}/128"
            out.append(VipDef(f"{kind}{i}", address, interface=iface, extra=dict(extra or {})))
    return out


def tagged_addresses(netns: str) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The IPs carrying vipd's tag in a namespace (one raw rtnetlink dump)."""
    with enter_netns(netns):
        sock = addrdump.open_socket()
    with sock:
        return {a.address.ip for a in addrdump.dump(sock, 1) if a.proto == VIPD_PROTO}


def vip_ips(vips: Iterable[VipDef]) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    return {ipaddress.ip_interface(v.address).ip for v in vips}


def log_events(path: Path) -> dict[str, int]:
    """Count of each `event=` in a vipd log, plus "fenced" for transitions to FENCED."""
    counts: dict[str, int] = {}
    if not path.exists():
        return counts
    for line in path.read_text(errors="replace").splitlines():
        m = _EVENT_RE.search(line)
        if m:
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
        if _FENCE_RE.search(line):
            counts["fenced"] = counts.get("fenced", 0) + 1
    return counts


_GC_RE = re.compile(r" event=gc_paused seconds=([0-9.]+)")
_STALL_RE = re.compile(r" event=loop_stalled .*?longest=([0-9.]+).*? batches=(\d+)")


def loop_stalls(path: Path) -> dict[str, float]:
    """From a vipd log's `loop_stalled` and `gc_paused` lines: how many trio batches ran past the
    warning and the longest; how many garbage collections did and the longest, and how many of
    them came before the daemon's first `ready` line (while it built and started its units)."""
    count, longest, gcs, gc_longest, gc_before_ready = 0, 0.0, 0, 0.0, 0
    if path.exists():
        text = path.read_text(errors="replace")
        ready = text.find(" event=ready ")
        for m in _STALL_RE.finditer(text):
            longest, count = max(longest, float(m.group(1))), count + int(m.group(2))
        for m in _GC_RE.finditer(text):
            gc_longest, gcs = max(gc_longest, float(m.group(1))), gcs + 1
            gc_before_ready += ready < 0 or m.start() < ready
    return {"batches": count, "longest_s": longest, "gc_pauses": gcs, "gc_longest_s": gc_longest,
            "gc_pauses_before_ready": gc_before_ready}


_TASKS_RE = re.compile(r' event=loop_stalled_tasks seconds=([0-9.]+) top="([^"]*)"')


def loop_tasks(path: Path) -> dict[str, dict[str, float]]:
    """From a vipd log's `loop_stalled_tasks` lines (VIPD_LOOP_TASKS=1): per task name, in how many
    of those long batches it took the most time, and its seconds in them all."""
    out: dict[str, dict[str, float]] = {}
    if path.exists():
        for m in _TASKS_RE.finditer(path.read_text(errors="replace")):
            for i, part in enumerate(m.group(2).split(";")):
                name, _, rest = part.rpartition("=")
                if not name:
                    continue
                row = out.setdefault(name, {"longest_in": 0, "seconds": 0.0})
                row["longest_in"] += i == 0
                row["seconds"] = round(row["seconds"] + float(rest.split("/")[0]), 3)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["seconds"]))


def trouble(counts: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counts.items() if k in TROUBLE and v}




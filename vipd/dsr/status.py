"""`vipd status` for DSR: every service's backends and their state as etcd shows them (node backends:
present and healthy, absent, or unhealthy; static backends are health-checked by each director, so
etcd cannot tell: "static"). The live view of one director (MACs, packets, its own checks) is
DsrService.status(), served by the daemon's control socket."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from vipd.config import VipSpec
from vipd.election.hosts import HostInfo


def rows(vips: Sequence[VipSpec], hosts: Mapping[str, HostInfo]) -> list[dict[str, Any]]:
    out = []
    for v in vips:
        for s in v.services:
            backends = []
            for b in s.backends:
                if b.node is None:
                    state = "static"
                elif b.node not in hosts:
                    state = "absent"
                else:
                    state = "active" if hosts[b.node].healthy else "unhealthy"
                backends.append({"backend": b.name, "address": str(b.address), "state": state})
            out.append({"vip": v.name, "service": s.label, "address": str(v.ip), "backends": backends})
    return out


def render(services: Sequence[Mapping[str, Any]]) -> list[str]:
    if not services:
        return []
    lines = ["", f"{'DSR SERVICE':<24} {'BACKEND':<24} {'ADDRESS':<28} STATE"]
    for s in services:
        for i, b in enumerate(s["backends"]):
            head = f"{s['vip']} {s['service']}" if i == 0 else ""
            lines.append(f"{head:<24} {b['backend']:<24} {b['address']:<28} {b['state']}")
    return lines

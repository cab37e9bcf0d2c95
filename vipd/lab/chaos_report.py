"""The figures of a chaos soak (vipd.lab.chaos): nearest-rank percentiles, holder windows from an
AddressMonitor timeline, the report (per VIP, per fault kind, log warnings) and the result dict that
bench/chaos.py prints and tests/lab/test_chaos.py checks.
"""

from __future__ import annotations

import collections
import re
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Callable, Sequence

from vipd.lab.topology import to_ip

if TYPE_CHECKING:
    from vipd.lab.chaos import Chaos

_LOG_RE = re.compile(r"^\S+Z (\w+) event=(\S+)")


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))] if s else None


def describe(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "median": pct(values, 50), "p90": pct(values, 90), "max": max(values, default=None),
            "total": sum(values)}


def windows(line: list[tuple[float, frozenset[str]]], pred: Callable[[frozenset[str]], bool],
            lo: float, hi: float) -> list[tuple[float, float]]:
    """The periods within [lo, hi] during which pred(holders) held, from a monitor timeline."""
    out = []
    for i, (t, holders) in enumerate(line):
        s, e = max(t, lo), min(line[i + 1][0] if i + 1 < len(line) else hi, hi)
        if e > s and pred(holders):
            out.append((s, e))
    return out


def report(chaos: Chaos, t0: float, t1: float, kinds: Sequence[str]) -> dict[str, Any]:
    """The soak's figures between t0 and t1: per VIP (holder changes, gaps, availability, timeline,
    client probes), per fault kind (recovery, worst gap; in the order of `kinds`), warnings in the logs."""
    per_vip: dict[str, Any] = {}
    off = time.time() - time.monotonic()
    for v in chaos.vips:
        ip = to_ip(v.address)
        line = chaos.monitor.holders_timeline(ip)
        gaps = [(e - s) * 1e3 for s, e in windows(line, lambda h: not h, t0, t1)]  # type: ignore[arg-type]
        changes = [c for c in chaos.monitor.owner_changes(ip) if t0 <= c[0] <= t1]
        row = {"address": v.address, "transitions": len(changes),
               "acquisitions": sum(1 for _, a, b in changes if len(b) == 1 and not a),  # none -> one
               "dual_ms": sum(e - s for i, s, e, _ in chaos.monitor.dual_windows() if i == ip) * 1e3,
               "no_holder_ms": describe(gaps), "availability": 1 - sum(gaps) / 1e3 / max(t1 - t0, 1e-9),
               "timeline": [[round(t + off, 3), sorted(h)] for t, h in line]}  # type: ignore[misc]  # wall-clock (epoch) times
        if v.name in chaos.probes:
            outs = [o for o in chaos.probes[v.name].outages() if t0 <= o.end and o.start <= t1]
            row["probe_outage_ms"] = describe([o.ms for o in outs])
            row["probe"] = chaos.probes[v.name].summary()
        per_vip[v.name] = row
    by_kind: dict[str, Any] = {}
    for kind in kinds:
        fs = [f for f in chaos.faults if f.kind == kind]
        if fs:
            by_kind[kind] = {"count": len(fs), "failed": sum(1 for f in fs if f.error),
                             "recovery_ms": describe([f.recovery_ms for f in fs if f.recovery_ms is not None]),
                             "worst_no_holder_ms": describe([max(f.no_holder_ms.values(), default=0.0)
                                                             for f in fs])}
    logs: dict[str, Any] = {}
    for h in chaos.lab.hosts:  # warnings and errors by event; lines not in vipd's format (tracebacks)
        counts: collections.Counter[str] = collections.Counter()
        path = chaos.cluster.log_path(h)
        for ln in path.read_text(errors="replace").splitlines() if path.exists() else []:
            m = _LOG_RE.match(ln)
            if not m or m.group(1) != "info":
                counts[f"{m.group(1)} {m.group(2)}" if m else "(unparsed line)"] += 1
        logs[h.name] = dict(counts.most_common())
    return {"elapsed": t1 - t0, "per_vip": per_vip, "by_kind": by_kind, "log_warnings": logs,
            "monitor": chaos.monitor.stats()}


def result(chaos: Chaos, end: dict[str, Any]) -> dict[str, Any]:
    """The run's outcome: the report and what run() gathered (`end`), counted up; ok or not."""
    leaks, figures = end["leaks"], end.get("report", {})
    n_leaks = (sum(len(v) for v in leaks.get("vips", {}).values()) + len(leaks.get("etcd_keys", []))
               + len(leaks["namespaces"]) + len(leaks["processes"]))
    dual = sum(r["dual_ms"] for r in figures.get("per_vip", {}).values())
    failures = list(chaos.failures) + [f"vipd on {k} exit code {v} at the clean stop"
                                       for k, v in end.get("exit_codes", {}).items() if v != 0]
    final_ok = all(len(h) == 1 for h in end.get("final_holders", {}).values())
    return {"seed": chaos.seed, "prefix": chaos.cfg.prefix, "workdir": str(chaos.dir),
            "duration": chaos.cfg.duration, "interrupted": chaos.interrupted, "kinds": list(chaos.cfg.kinds),
            "faults_total": len(chaos.faults),
            "faults_by_kind": dict(collections.Counter(f.kind for f in chaos.faults)),
            "transitions_total": sum(r["transitions"] for r in figures.get("per_vip", {}).values()),
            "dual_ownership_ms": dual, "leaks_total": n_leaks, "final_ok": final_ok, "failures": failures,
            "ok": dual == 0 and n_leaks == 0 and not failures and final_ok, **end,
            "faults": [asdict(f) | {"recovery_ms": f.recovery_ms} for f in chaos.faults]}

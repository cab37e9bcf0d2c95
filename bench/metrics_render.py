#!/usr/bin/env python3
"""What one /metrics scrape costs the daemon (`Metrics.render`, run in the event loop), at 10,
1,000, 2,000 and 10,000 VIPs, each an owner with a typical history (three transitions, an epoch,
announcements, health, presence, a takeover): vipd's per-VIP text writer (vipd/metrics_text.py)
against prometheus_client's `generate_latest` over the very same families (parsed back from
vipd's own output, so both write the same bytes; the parse is not timed). Pure CPU, no lab.

    .venv/bin/python bench/metrics_render.py [--runs 7]

Output: a table (median ms over the runs, lines, bytes) and bench/out/metrics_render-<ts>.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Iterator

import _common as C
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from vipd import metrics_text
from vipd.metrics import Metrics
from vipd.model import State


def host(n: int) -> Metrics:
    m = Metrics("h1")
    for i in range(n):
        v = f"vip-{i:05d}"
        m.record_transition(v, State.INIT, State.BACKUP)
        m.record_transition(v, State.BACKUP, State.ACQUIRING)
        m.record_transition(v, State.ACQUIRING, State.OWNER)
        m.set_epoch(v, 100000 + i)
        m.count_announcements(v, 3)
        m.set_healthy(v, True)
        m.set_address_present(v, True)
        m.record_takeover(v, "expired")
    return m


class Parsed:
    """vipd's per-VIP families as prometheus_client Metric objects (a Collector)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def timed(fn, runs: int) -> tuple[float, bytes]:  # type: ignore[no-untyped-def]
    times, out = [], b""
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=7)
    args = p.parse_args()
    rows, out = [], []
    for n in (10, 1000, 2000, 10000):
        m = host(n)
        ours_ms, ours = timed(lambda: metrics_text.render(m._vips), args.runs)
        registry = CollectorRegistry()
        registry.register(Parsed(list(text_string_to_metric_families(ours.decode()))))  # type: ignore[arg-type]
        theirs_ms, theirs = timed(lambda: generate_latest(registry), args.runs)
        assert theirs == ours, "the two writers differ"
        whole_ms, whole = timed(m.render, args.runs)
        rows.append([f"{n} VIPs", f"{ours_ms:.1f}", f"{theirs_ms:.1f}", f"{theirs_ms / ours_ms:.1f}x",
                     f"{whole_ms:.1f}", str(whole.count(b"\n")), str(len(whole))])
        out.append({"vips": n, "per_vip_ms": ours_ms, "prometheus_client_ms": theirs_ms, "scrape_ms": whole_ms,
                    "lines": whole.count(b"\n"), "bytes": len(whole)})
    print(C.table(["VIPs", "per-VIP text ms", "prometheus_client ms", "ratio", "whole scrape ms", "lines", "bytes"],
                  rows, right=[1, 2, 3, 4, 5, 6]))
    C.write_json("metrics_render", {"runs": args.runs, "rows": out})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

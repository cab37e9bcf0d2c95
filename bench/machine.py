"""What this machine charges for waking up, beside what it charges for computing.

A daemon that sits still spends its CPU on wake-ups (timers, a keepalive, a reconcile tick, kernel
notifications), so its `% of a core` follows the cost of a wake-up more than the speed of the CPU.
On this shared 2-core VM that cost moved by a factor of ~5 within one boot while the compute speed
did not: the same vipd commit (274bcc7) measured 1.2 % idle at 10 VIPs and 4.2-4.9 % with
1,000 + 1,000 VIPs early on 2026-12-07, and 7.2 % / 13.6-14.8 % (bench/scale.py, same command)
ten hours later. Run this beside any CPU figure, and compare CPU figures only between runs whose
wake-up costs here agree (or as ratios of runs back to back).

No namespaces, no root: a process that only sleeps, in three ways (time.sleep, a bare epoll
timeout, trio.sleep) at three periods, and the CPU it was charged per wake-up (getrusage: user +
system); and a compute reference (summing 10 million ints, thread CPU time). Medians of `--runs`.

    .venv/bin/python bench/machine.py
"""

from __future__ import annotations

import argparse
import resource
import select
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

PERIODS = (0.05, 0.01, 0.002)  # seconds between wake-ups
SPAN = 1.0  # seconds each measurement sleeps


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _charged(sleep: Callable[[float], None], period: float, span: float = SPAN) -> float:
    """CPU seconds charged per wake-up of `sleep(period)`, repeated for `span` seconds."""
    n = max(1, int(span / period))
    c0 = _cpu()
    for _ in range(n):
        sleep(period)
    return (_cpu() - c0) / n


def _epoll_sleep() -> Callable[[float], None]:
    ep = select.epoll()
    return lambda period: ep.poll(period) and None


def _trio_charged(period: float, span: float = SPAN) -> float:
    import trio

    async def main() -> float:
        n = max(1, int(span / period))
        c0 = _cpu()
        for _ in range(n):
            await trio.sleep(period)
        return (_cpu() - c0) / n

    return trio.run(main)


def wakeup_cost_us(period: float = 0.01, span: float = 0.5) -> float:
    """One quick figure for a bench's environment: microseconds of CPU per time.sleep wake-up."""
    return round(_charged(time.sleep, period, span) * 1e6, 1)


def compute_s() -> float:
    t = time.thread_time()
    sum(range(10_000_000))
    return time.thread_time() - t


def measure() -> dict[str, Any]:
    out: dict[str, Any] = {"compute_10M_sum_s": round(compute_s(), 4), "wakeup_cpu_us": {}}
    for period in PERIODS:
        ms = f"{period * 1e3:g} ms"
        out["wakeup_cpu_us"][ms] = {
            "time.sleep": round(_charged(time.sleep, period) * 1e6, 1),
            "epoll": round(_charged(_epoll_sleep(), period) * 1e6, 1),
            "trio.sleep": round(_trio_charged(period) * 1e6, 1),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    runs = [measure() for _ in range(args.runs)]
    rows = [["compute: sum of 10M ints (s)", f"{statistics.median(r['compute_10M_sum_s'] for r in runs):.3f}", ""]]
    for period in PERIODS:
        ms = f"{period * 1e3:g} ms"
        for how in ("time.sleep", "epoll", "trio.sleep"):
            us = statistics.median(r["wakeup_cpu_us"][ms][how] for r in runs)
            rows.append([f"CPU per wake-up, {how} every {ms} (us)", f"{us:.0f}",
                         f"{100 * us / 1e6 / period:.2f} % of a core"])
    print(C.table(["measure", "median", "idle cost"], rows, right=(1, 2)))
    C.write_json("machine", {"args": vars(args), "runs": runs})


if __name__ == "__main__":
    main()

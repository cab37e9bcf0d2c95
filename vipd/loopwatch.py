"""How long the trio loop goes without looking at its sockets and timers.

Trio runs every runnable task once per scheduler batch, then polls for I/O. While a batch runs no
datagram is read and no timer fires, so the longest batch bounds how late the daemon answers
anything on its loop (an etcd keepalive reply, a kernel event). The watch records each batch's
length (Prometheus histogram `vipd_loop_batch_seconds`) and logs `loop_stalled` for batches
longer than `warn` (at most once per second, with how many there were since the last line).

Python's cyclic garbage collector stops every thread of the process while it runs (the heartbeat
thread too): its pauses are timed as well (`vipd_gc_pause_seconds`, and `gc_paused` lines past
`warn`).
"""

from __future__ import annotations

import gc
import time
from typing import Callable

import trio
from prometheus_client import CollectorRegistry, Histogram

from vipd import log

BUCKETS = (.001, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5)


class LoopWatch(trio.abc.Instrument):
    def __init__(self, registry: CollectorRegistry | None = None, *, warn: float = 0.1,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.warn = warn
        self.longest = 0.0  # since start
        self.stalls = 0  # batches longer than warn, since start
        self._clock = clock
        self._began: float | None = None
        self._logged_at = -float("inf")
        self._unlogged = 0
        self._unlogged_max = 0.0
        self.gc_longest = 0.0
        self._gc_began = 0.0
        self._gc_hist = (Histogram("vipd_gc_pause_seconds", "Length of one garbage collection (every thread "
                                   "waits)", ["generation"], buckets=BUCKETS, registry=registry)
                         if registry is not None else None)
        self._hist = (Histogram("vipd_loop_batch_seconds", "Length of one trio scheduler batch (no I/O is "
                                "read while one runs)", buckets=BUCKETS, registry=registry)
                      if registry is not None else None)

    def after_io_wait(self, timeout: float) -> None:
        self._began = self._clock()

    def busy_since(self) -> float | None:
        """When the running batch began (on this watch's clock), None while the loop waits for
        I/O. Any thread may call it (the heartbeat thread: a batch past its stall allowance is a
        hung loop, vipd/peers/transport.py)."""
        return self._began

    def before_io_wait(self, timeout: float) -> None:
        # cleared first: if batch() raised (trio then drops the instrument), a stale start would
        # read as a loop hung for good and withhold this host's heartbeats for good
        began, self._began = self._began, None
        if began is None:
            return
        now = self._clock()
        self.batch(now - began, now)

    def batch(self, seconds: float, now: float) -> None:
        if self._hist is not None:
            self._hist.observe(seconds)
        if seconds > self.longest:
            self.longest = seconds
        if seconds <= self.warn:
            return
        self.stalls += 1
        self._unlogged += 1
        self._unlogged_max = max(self._unlogged_max, seconds)
        if now - self._logged_at >= 1.0:
            log.warning("loop_stalled", longest=round(self._unlogged_max, 3), batches=self._unlogged)
            self._logged_at, self._unlogged, self._unlogged_max = now, 0, 0.0

    def start_gc_watch(self) -> None:
        gc.callbacks.append(self._gc)

    def stop_gc_watch(self) -> None:
        if self._gc in gc.callbacks:
            gc.callbacks.remove(self._gc)

    def _gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_began = self._clock()
            return
        seconds = self._clock() - self._gc_began
        self.gc_longest = max(self.gc_longest, seconds)
        if self._gc_hist is not None:
            self._gc_hist.labels(str(info.get("generation", "?"))).observe(seconds)
        if seconds > self.warn:
            log.warning("gc_paused", seconds=round(seconds, 3), generation=info.get("generation"),
                        collected=info.get("collected"))


class TaskTimes(trio.abc.Instrument):
    """Which tasks a long batch spent its time in (a diagnostic: `VIPD_LOOP_TASKS=1` in vipd's
    environment, `bench/scale.py --loop-tasks`; it times every task step). For the longest batch
    past `warn` in each second it logs `loop_stalled_tasks` with the tasks that took most of it,
    as `name=seconds/steps`: e.g. `Controller.run=0.935/10000` is 10,000 unit tasks stepped in
    one batch. What found the host-wide deliveries that vipd/pacing.py now spreads."""

    TOP = 6

    def __init__(self, warn: float, clock: Callable[[], float] = time.perf_counter) -> None:
        self.warn = warn
        self._clock = clock
        self._began: float | None = None
        self._step_began = 0.0
        self._tasks: dict[str, list[float]] = {}
        self._worst: tuple[float, dict[str, list[float]]] | None = None
        self._logged_at = -float("inf")

    def after_io_wait(self, timeout: float) -> None:
        self._began = self._clock()
        self._tasks = {}

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._step_began = self._clock()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._began is None:
            return
        name = ".".join(str(task.name).rsplit(".", 2)[-2:])
        t = self._tasks.get(name)
        if t is None:
            t = self._tasks[name] = [0.0, 0]
        t[0] += self._clock() - self._step_began
        t[1] += 1

    def before_io_wait(self, timeout: float) -> None:
        if self._began is None:
            return
        now = self._clock()
        seconds, self._began = now - self._began, None
        if seconds > self.warn and (self._worst is None or seconds > self._worst[0]):
            self._worst = (seconds, self._tasks)
        if self._worst is not None and now - self._logged_at >= 1.0:
            worst, tasks = self._worst
            top = sorted(tasks.items(), key=lambda kv: -kv[1][0])[:self.TOP]
            log.warning("loop_stalled_tasks", seconds=round(worst, 3),
                        top=";".join(f"{n}={v[0]:.3f}/{int(v[1])}" for n, v in top))
            self._worst, self._logged_at = None, now

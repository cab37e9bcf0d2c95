"""How long the trio loop goes without looking at its sockets and timers.

Trio runs every runnable task once per scheduler batch, then polls for I/O. While a batch runs no
datagram is read and no timer fires, so the longest batch bounds how late the daemon answers
anything on its loop (an etcd keepalive reply, a kernel event). The watch records each batch's
length (Prometheus histogram `vipd_loop_batch_seconds`) and logs `loop_stalled` for batches
longer than `warn` (at most once per second, with how many there were since the last line).
"""

from __future__ import annotations

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
        self._hist = (Histogram("vipd_loop_batch_seconds", "Length of one trio scheduler batch (no I/O is "
                                "read while one runs)", buckets=BUCKETS, registry=registry)
                      if registry is not None else None)

    def after_io_wait(self, timeout: float) -> None:
        self._began = self._clock()

    def before_io_wait(self, timeout: float) -> None:
        if self._began is None:
            return
        now = self._clock()
        self.batch(now - self._began, now)
        self._began = None

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

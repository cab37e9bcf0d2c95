"""The cyclic collector around the daemon's startup: held while the daemon loads and builds what
lives for the whole run, then that is frozen (gc.freeze) out of every later collection.

Its own module, loading only `gc`: `vipd run` holds full collections while the config and the
modules load, pyroute2, trio, httpx and prometheus_client among them (vipd/cli.py); vipd/loopwatch.py loads
two of those itself.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator


@contextlib.contextmanager
def collector_held() -> Iterator[None]:
    """No collection while the daemon builds and starts its units (vipd/app.py; no etcd wait
    inside: bounded), then what was built is frozen (it
    lives for the whole run) and collection resumes. At 10,000 VIPs per host, full collections ran
    every ~0.5-1 s while the units were built, each walking the growing heap again for 0.2-0.35 s,
    every thread stopped: the heartbeats too, so the peers suspected a host that was only starting.
    `bench/scale.py --host-vips 0 --no-footprint --cluster-vips 10000 --runs 1 --no-crash
    --settle-timeout 60`, `loop_stalls` -> `gc_pauses_before_ready` (collections past 70 ms): 8-10
    per host before, 0 since."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was:
            gc.enable()


@contextlib.contextmanager
def full_collections_held() -> Iterator[None]:
    """No full collection while `vipd run` loads the config and the modules (the young ones go on,
    so the load's own garbage is freed as it goes), then what was loaded is frozen and the
    thresholds are restored. Holding every collection here (collector_held) left more resident
    (the load's garbage piled up before anything freed it), and idle RSS at 10 VIPs sits right at
    its 50 MiB bound. `bench/scale.py --host-vips 0 --cluster-vips 0 --runs 3`, three times each,
    alternated (5aeb4b3 nothing held / c7d031f all held / 6c2ae1c full ones held): start to ready,
    median of 9, 0.456 / 0.420 / 0.42 s; idle RSS 49.6-49.8 / 50.3-50.5 / 49.6-49.7 MiB."""
    threshold = gc.get_threshold()
    gc.set_threshold(threshold[0], threshold[1], 1 << 30)
    try:
        yield
    finally:
        gc.freeze()
        gc.set_threshold(*threshold)


# Collections of the middle generation before the collector considers a full one (Python's default
# is 10). A full collection stops every thread, the heartbeats too: at 3,000 VIPs on 3 hosts such
# pauses (not logged under 70 ms) are the likely cause of echoes late by L/2, after which a peer
# renames every unit this host succeeds. Measured at rest (bench/scale.py --host-vips 0 --no-footprint
# --cluster-vips 3000 --steady 20 --runs 1 --no-crash, 6 runs each, alternated): successor renames
# median ~4,000 -> ~1,500 per window, etcd storms (> 20 requests/s) 2 -> 0 of 6; RSS unchanged.
OLDEST_AFTER = 1000


def freeze_heap() -> int:
    """Take every object alive now out of the collector's sight (gc.freeze), and consider full
    collections 100 times less often from now on (OLDEST_AFTER); returns how many were frozen.

    Called once, when the daemon is ready (frozen three times before: what `vipd run` loaded, by
    `full_collections_held`; what the daemon built and its units started, by `collector_held`):
    the config, every unit, its controller and
    the imported modules live for the whole run, and every full collection walked them all again,
    each stopping the heartbeat thread too (1,000 + 1,000 VIPs, the collector's share of a core at
    rest: 0.44-0.51 % -> 0.29-0.32 %, `bench/scale.py --host-vips 1000 --cluster-vips 0
    --no-footprint --steady 60 --stall 0`, "steady garbage collection").
    Cost, bounded: an object frozen here that later becomes cyclic garbage (a unit a reload
    removes) is never collected; at most what was alive at these four points of the startup,
    since nothing is frozen afterwards. Cyclic garbage waits longer for a full collection: RSS
    was unchanged (1,000 + 1,000 VIPs: 96.4 MiB over 60 s; 3,000 in the cluster: 110-123 MiB
    both ways); a soak of hours is not measured."""
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, OLDEST_AFTER)
    return gc.get_freeze_count()

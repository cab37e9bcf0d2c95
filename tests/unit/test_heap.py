"""The collector around the startup (vipd/heap.py): held while `vipd run` loads and the daemon
builds, what was built frozen out of every later collection."""

from __future__ import annotations

import gc
import json
import subprocess
import sys

from vipd.heap import OLDEST_AFTER, collector_held, freeze_heap, full_collections_held


def test_freeze_heap_takes_what_is_alive_out_of_every_collection() -> None:
    kept = [[i] for i in range(1000)]  # alive at "ready"
    threshold = gc.get_threshold()
    try:
        frozen = freeze_heap()
        assert frozen >= len(kept) and gc.get_freeze_count() == frozen
        collected = {id(o) for g in (0, 1, 2) for o in gc.get_objects(generation=g)}
        assert all(gc.is_tracked(x) and id(x) not in collected for x in kept)
        assert gc.get_threshold() == (*threshold[:2], OLDEST_AFTER)  # full collections far rarer
    finally:
        gc.unfreeze()  # (the test process goes on collecting as before)
        gc.set_threshold(*threshold)


def test_collector_held_collects_nothing_inside_then_freezes_what_was_built_and_resumes() -> None:
    runs: list[int] = []
    count = lambda phase, info: runs.append(info["generation"]) if phase == "start" else None  # noqa: E731
    gc.callbacks.append(count)
    try:
        assert gc.isenabled()
        with collector_held():
            assert not gc.isenabled()
            built = [[i] for i in range(50_000)]  # far past the young generation's threshold
        assert runs == [] and gc.isenabled()
        collected = {id(o) for g in (0, 1, 2) for o in gc.get_objects(generation=g)}
        assert not any(id(x) in collected for x in built[::997])  # frozen: out of every collection
        gc.disable()
        with collector_held():  # the state it found is the state it leaves
            pass
        assert not gc.isenabled()
    finally:
        gc.callbacks.remove(count)
        gc.enable()
        gc.unfreeze()


def test_full_collections_held_lets_young_ones_run_then_freezes_and_restores() -> None:
    runs: list[int] = []
    count = lambda phase, info: runs.append(info["generation"]) if phase == "start" else None  # noqa: E731
    threshold = gc.get_threshold()
    gc.callbacks.append(count)
    try:
        with full_collections_held():
            built = [[i] for i in range(200_000)]  # past the young and middle thresholds many times
        assert runs and 2 not in runs  # the young ones ran (the load's garbage is freed), no full one
        assert gc.get_threshold() == threshold
        collected = {id(o) for g in (0, 1, 2) for o in gc.get_objects(generation=g)}
        assert not any(id(x) in collected for x in built[::997])  # frozen: out of every collection
    finally:
        gc.callbacks.remove(count)
        gc.set_threshold(*threshold)
        gc.unfreeze()


def test_run_loads_the_daemon_without_a_full_collection_then_freezes_what_it_loaded() -> None:
    """`vipd run` loads the config and the run path's modules (vipd.app, pyroute2, httpx,
    prometheus_client: ~0.25 s, two full collections of the growing heap) with full collections
    held, then freezes them. In a fresh interpreter: trio.run is replaced, the host is not touched."""
    code = """if True:
        import gc, json, os, sys, types
        from vipd import cli, heap, instance, log, signals
        heavy = sorted(m for m in ('trio', 'pyroute2', 'httpx', 'prometheus_client') if m in sys.modules)
        import trio
        runs = []
        gc.callbacks.append(lambda phase, info: runs.append(info['generation']) if phase == 'start' else None)
        cfg = types.SimpleNamespace(state_dir='/nonexistent', metrics_listen=None, log_level='info')
        cli._load = lambda args, **kw: (cfg, [])
        instance.acquire = lambda *a: os.open(os.devnull, os.O_RDONLY)
        signals.catch_early = log.setup = lambda *a: None
        seen = {}
        def run(fn, *args):
            seen.update(runs=list(runs), enabled=gc.isenabled(), frozen=gc.get_freeze_count(),
                        loaded=[m in sys.modules for m in ('vipd.app', 'pyroute2', 'httpx', 'prometheus_client')])
        trio.run = run
        cli.cmd_run(types.SimpleNamespace(config='x.toml'))
        print(json.dumps(dict(seen, heavy=heavy)))
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seen = json.loads(out.stdout)
    assert seen["heavy"] == []  # vipd.cli and vipd.heap load none of them before the hold
    assert seen["loaded"] == [True] * 4
    assert 2 not in seen["runs"] and seen["enabled"] and seen["frozen"] > 0

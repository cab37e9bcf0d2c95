import time
from pathlib import Path

import trio
from prometheus_client import CollectorRegistry

from vipd.lab.scale import loop_stalls
from vipd.loopwatch import LoopWatch, freeze_heap


def test_a_blocking_task_is_one_long_batch() -> None:
    reg = CollectorRegistry()
    watch = LoopWatch(reg, warn=0.05)

    async def main() -> None:
        trio.lowlevel.add_instrument(watch)
        await trio.sleep(0.01)
        time.sleep(0.12)  # the loop polls nothing meanwhile
        await trio.sleep(0.01)

    trio.run(main)
    assert watch.stalls == 1 and 0.12 <= watch.longest < 1.0
    assert reg.get_sample_value("vipd_loop_batch_seconds_count") >= 3
    assert reg.get_sample_value("vipd_loop_batch_seconds_bucket", {"le": "0.1"}) == \
        reg.get_sample_value("vipd_loop_batch_seconds_count") - 1


def test_stall_lines_are_throttled_and_parsed_back(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    watch = LoopWatch(warn=0.1)
    for seconds, now in [(0.05, 0.0), (0.3, 10.0), (0.2, 10.5), (0.4, 11.2), (0.11, 11.3)]:
        watch.batch(seconds, now)
    assert (watch.stalls, watch.longest) == (4, 0.4)
    log = tmp_path / "vipd.log"
    log.write_text("2026-12-06T00:00:00.000Z WARNING event=loop_stalled longest=0.3 batches=1\n"
                   "2026-12-06T00:00:01.000Z WARNING event=loop_stalled longest=0.4 batches=2\n"
                   "2026-12-06T00:00:01.000Z WARNING event=gc_paused seconds=0.25 generation=2 collected=0\n"
                   "2026-12-06T00:00:01.000Z INFO event=ready node=h1\n"
                   "2026-12-06T00:00:02.000Z WARNING event=gc_paused seconds=0.15 generation=2 collected=0\n")
    assert loop_stalls(log) == {"batches": 3, "longest_s": 0.4, "gc_pauses": 2, "gc_longest_s": 0.25,
                                "gc_pauses_before_ready": 1}
    assert loop_stalls(tmp_path / "absent.log") == {"batches": 0, "longest_s": 0.0, "gc_pauses": 0, "gc_longest_s": 0.0,
                                                    "gc_pauses_before_ready": 0}


def test_gc_pauses_are_timed_until_the_watch_stops() -> None:
    import gc
    reg = CollectorRegistry()
    watch = LoopWatch(reg, warn=10.0)
    watch.start_gc_watch()
    try:
        gc.collect()
    finally:
        watch.stop_gc_watch()
    assert watch.gc_longest > 0
    assert reg.get_sample_value("vipd_gc_pause_seconds_count", {"generation": "2"}) == 1
    gc.collect()
    assert reg.get_sample_value("vipd_gc_pause_seconds_count", {"generation": "2"}) == 1


def test_freeze_heap_takes_what_is_alive_out_of_every_collection() -> None:
    import gc
    from vipd.loopwatch import OLDEST_AFTER
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
    import gc

    from vipd.loopwatch import collector_held
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

import time
from pathlib import Path

import trio
from prometheus_client import CollectorRegistry

from vipd.lab.scale import loop_stalls
from vipd.loopwatch import LoopWatch


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


def test_busy_since_is_the_running_batchs_start_and_none_while_waiting_for_io() -> None:
    """What the heartbeat thread reads (vipd/peers/transport.py): a batch blocked past its stall
    allowance shows its start; a loop waiting for I/O shows None, also after a batch whose
    accounting raised (trio drops the instrument then: a stale start would read as hung for good)."""
    watch = LoopWatch(None, warn=10.0)
    seen: list[float | None] = []

    async def main() -> None:
        trio.lowlevel.add_instrument(watch)
        await trio.sleep(0.01)
        began = time.perf_counter()
        time.sleep(0.05)
        since = watch.busy_since()
        assert since is not None and since <= began
        await trio.to_thread.run_sync(lambda: (time.sleep(0.05), seen.append(watch.busy_since())))

    trio.run(main)
    assert seen == [None]  # read by another thread while the loop waited for it

    def broken(seconds: float, now: float) -> None:
        raise RuntimeError("accounting failed")

    watch.batch = broken  # type: ignore[method-assign]
    watch.after_io_wait(0.0)
    try:
        watch.before_io_wait(0.0)
    except RuntimeError:
        pass
    assert watch.busy_since() is None


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


def test_task_times_names_the_tasks_a_long_batch_spent_its_time_in(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """The diagnostic (VIPD_LOOP_TASKS=1): for batches past `warn`, the tasks that took them, as
    name=seconds/steps; at most a line a second, with the longest batch since the last line;
    parsed back by bench/scale.py."""
    from vipd.lab.scale import loop_tasks
    from vipd.loopwatch import TaskTimes

    class Task:
        def __init__(self, name: str) -> None:
            self.name = name

    now = [0.0]
    tt = TaskTimes(0.1, clock=lambda: now[0])

    def batch(at: float, steps: list[tuple[str, float]]) -> None:
        now[0] = at
        tt.after_io_wait(0)
        for name, seconds in steps:
            tt.before_task_step(Task(name))  # type: ignore[arg-type]
            now[0] += seconds
            tt.after_task_step(Task(name))  # type: ignore[arg-type]
        tt.before_io_wait(0)

    batch(0.0, [("vipd.ownership.controller.Controller.run", 0.001)] * 300 + [("vipd.app.Daemon.x", 0.05)])
    batch(5.0, [("a.Fast.run", 0.01)])  # short: no line
    batch(5.5, [("b.Slow.run", 0.2)])  # a second after the last line: logged at once
    batch(5.8, [("b.Slow.run", 0.3)])  # 0.4 s after it: kept, the worst so far
    batch(5.9, [("b.Slow.run", 0.15)])  # not the worst: forgotten
    batch(7.0, [("c.Quick.run", 0.001)])  # short, but a second has passed: the kept worst goes out
    lines = [r.getMessage() for r in caplog.records if "loop_stalled_tasks" in r.getMessage()]
    assert len(lines) == 3, lines
    assert 'top="Controller.run=0.300/300;Daemon.x=0.050/1"' in lines[0] and "seconds=0.35" in lines[0]
    assert 'top="Slow.run=0.200/1"' in lines[1] and 'top="Slow.run=0.300/1"' in lines[2]
    log = tmp_path / "vipd.log"
    log.write_text("\n".join(f"2026-12-07T00:00:00.000Z WARNING {line}" for line in lines) + "\n")
    assert loop_tasks(log) == {"Slow.run": {"longest_in": 2, "seconds": 0.5},
                               "Controller.run": {"longest_in": 1, "seconds": 0.3},
                               "Daemon.x": {"longest_in": 0, "seconds": 0.05}}

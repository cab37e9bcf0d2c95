"""A planned stop is bounded (vipd/shutdown.py): a unit that does not let go in time is named in one
line and the lease is not revoked (the lease path); when all let go, the lease is revoked."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import trio

from vipd import shutdown
from vipd.model import State
from vipd.ownership.state import Sub


def unit(name: str, stopped: bool, sub: Sub = Sub.REMOVING) -> SimpleNamespace:
    ev = trio.Event()
    if stopped:
        ev.set()
    return SimpleNamespace(name=name, stopped=ev, state=SimpleNamespace(state=State.RELEASING, sub=sub),
                           address_gone=stopped or sub is not Sub.REMOVING)


async def test_a_hung_release_is_named_within_the_grace(autojump_clock, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, logger="vipd")
    t0 = trio.current_time()
    hung = await shutdown.wait_stopped([unit("a", True), unit("b", False)])
    assert [c.name for c in hung] == ["b"]
    assert trio.current_time() - t0 == shutdown.SHUTDOWN_GRACE
    assert "shutdown_grace_exceeded" in caplog.text and "b:releasing/removing" in caplog.text


async def test_thousands_hung_are_counted_and_only_the_first_named(autojump_clock, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, logger="vipd")
    hung = await shutdown.wait_stopped([unit(f"v{i}", False) for i in range(5000)])
    assert len(hung) == 5000
    line = [r.getMessage() for r in caplog.records if "shutdown_grace_exceeded" in r.getMessage()][0]
    assert "units=5000" in line and "v19:releasing/removing" in line and "v20:" not in line
    assert f"({5000 - shutdown.LOG_UNITS} more)" in line and len(line) < 2000


async def test_revoke_only_runs_bounded(autojump_clock) -> None:  # type: ignore[no-untyped-def]
    revoked: list[int] = []
    forgot: list[bool] = []

    async def fast(lease: int) -> None:
        revoked.append(lease)

    async def hangs(lease: int) -> None:
        await trio.sleep_forever()

    await shutdown.revoke(fast, 7, 1.0, lambda: forgot.append(True))
    assert revoked == [7] and forgot == [True]
    t0 = trio.current_time()
    await shutdown.revoke(hangs, 8, 1.0, lambda: forgot.append(True))
    assert trio.current_time() - t0 == 1.0 and forgot == [True]
    assert shutdown.stop_bound(1.0) < 10  # inside the unit's TimeoutStopSec


async def test_units_left_with_their_keys_only_do_not_hold_the_revoke_back(autojump_clock, caplog) -> None:  # type: ignore[no-untyped-def]
    """Past the grace, units whose addresses are gone (marking their keys) are not hung: the revoke
    deletes their keys; one unit still removing its address holds it back."""
    caplog.set_level(logging.INFO, logger="vipd")
    marking = [unit(f"k{i}", False, Sub.DELETING) for i in range(3)]
    assert await shutdown.wait_stopped([unit("a", True), *marking]) == []
    assert "shutdown_keys_left_to_revoke" in caplog.text and "units=3" in caplog.text
    assert "shutdown_grace_exceeded" not in caplog.text
    removing = unit("r", False)
    assert await shutdown.wait_stopped([*marking, removing]) == [removing]
    assert "shutdown_grace_exceeded" in caplog.text and "r:releasing/removing" in caplog.text


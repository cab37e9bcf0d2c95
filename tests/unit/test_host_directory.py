"""The host directory (vipd/election/hosts.py): host keys in, placements out."""

from __future__ import annotations

import ipaddress
from typing import Any, AsyncGenerator

import trio

import vipd.election.hosts as hosts_mod
from vipd.election.etcd import KeyValue, WatchBatch, WatchEvent
from vipd.election.hosts import HostDirectory, HostInfo
from vipd.model import Unit, VipSpec

PREFIX = "/vipd/"


class Keys:
    """Host keys as etcd's watch delivers them: an empty listing, then what the test sends."""

    def __init__(self) -> None:
        self.send, self._recv = trio.open_memory_channel[WatchBatch](10)
        self.revision = 1

    async def get_prefix(self, prefix: str) -> tuple[list[Any], int]:
        return [], 1

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncGenerator[WatchBatch, None]:
        async for batch in self._recv:
            yield batch

    async def put(self, node: str) -> None:
        self.revision += 1
        kv = KeyValue(f"{PREFIX}hosts/{node}", HostInfo(node).to_json(), self.revision, self.revision, 1)
        await self.send.send(WatchBatch(self.revision, (WatchEvent("PUT", kv),)))


async def started(nursery: trio.Nursery, keys: Keys) -> tuple[HostDirectory, list[tuple[str, tuple[str, ...]]]]:
    """A directory of 3 units following `keys`, and what it told the units: h1 came, was placed."""
    told: list[tuple[str, tuple[str, ...]]] = []
    directory = HostDirectory(keys, PREFIX, units(3), lambda u, order: told.append((u, order)))
    await nursery.start(directory.run)
    await keys.put("h1")
    with trio.fail_after(5):
        while directory.placement.get("v0") != ("h1",):  # placed in the worker thread
            await trio.sleep(0.01)
    assert ("v0", ("h1",)) in told
    return directory, told


def units(n: int) -> list[Unit]:
    return [Unit(f"v{i}", (VipSpec(f"v{i}", ipaddress.ip_interface(f"10.9.0.{i + 1}/32"), "lo"),))
            for i in range(n)]


async def test_a_stopping_host_places_no_host_key_change_but_still_follows_them(monkeypatch):
    passes: list[tuple[str, ...]] = []
    real = hosts_mod.placements

    def counted(units: Any, hosts: Any, memo: Any = None) -> Any:
        passes.append(tuple(sorted(hosts)))
        return real(units, hosts, memo)

    monkeypatch.setattr(hosts_mod, "placements", counted)
    keys = Keys()
    async with trio.open_nursery() as nursery:
        directory, told = await started(nursery, keys)
        assert ("h1",) in passes

        directory.stop_placing()
        before = (list(passes), list(told))
        await keys.put("h2")
        with trio.fail_after(5):
            while "h2" not in directory.hosts:
                await trio.sleep(0.01)
        await trio.sleep(0.2)  # (a pass would run in the worker thread meanwhile)
        assert (passes, told) == before  # no pass over the units, nothing placed
        assert directory.placement["v0"] == ("h1",)
        nursery.cancel_scope.cancel()


async def test_an_answer_computed_when_the_stop_began_is_not_delivered(monkeypatch):
    """A pass in the worker thread when the stop begins: its answer changes nothing and reaches
    no unit (before, the daemon dropped such Placements itself, with a flag of its own)."""
    import threading

    real = hosts_mod.placements
    release, entered = threading.Event(), threading.Event()

    def held(units: Any, hosts: Any, memo: Any = None) -> Any:
        if "h2" in hosts:  # (the second pass: held in the worker thread until the stop began)
            entered.set()
            release.wait(5)
        return real(units, hosts, memo)

    monkeypatch.setattr(hosts_mod, "placements", held)
    keys = Keys()
    async with trio.open_nursery() as nursery:
        directory, told = await started(nursery, keys)
        before, placed = list(told), dict(directory.placement)
        await keys.put("h2")
        with trio.fail_after(5):
            while not entered.is_set():
                await trio.sleep(0.01)
        directory.stop_placing()
        release.set()
        await trio.sleep(0.2)  # (the worker thread returns its answer meanwhile)
        assert told == before and directory.placement == placed
        nursery.cancel_scope.cancel()

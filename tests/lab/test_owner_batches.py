"""Owner keys batched per host (OwnerKeys over a real etcd): many concurrent campaigns and releases
go out as a few nested transactions, and each unit's compare still decides only its own key."""

from __future__ import annotations

from contextlib import aclosing
from typing import Any

import trio

from vipd.election.etcd import EtcdClient
from vipd.election.owners import RELEASED, TXN_BATCH, OwnerKeys, owner_value
from vipd.lab.etcd import EtcdServer

PREFIX = "/vipd/vtbatch/"


async def campaign_all(keys: OwnerKeys, names: list[str], lease: int) -> dict[str, Any]:
    results: dict[str, Any] = {}

    async def one(name: str) -> None:
        results[name] = await keys.campaign(name, lease)

    async with trio.open_nursery() as nursery:
        for name in names:
            nursery.start_soon(one, name)
    return results


async def held_by_a(c: EtcdClient, names: list[str]) -> tuple[int, OwnerKeys, dict[str, Any], int]:
    """Host a, on a fresh lease, owns every key of `names`: (lease, a's OwnerKeys, the campaign
    results, the revision right after)."""
    lease, _ = await c.grant(30)
    a = OwnerKeys(c, PREFIX, "a")
    won = await campaign_all(a, names, lease)
    _, start = await c.get_prefix(a.prefix)
    return lease, a, won, start


async def test_concurrent_campaigns_are_batched_and_exclusive(etcd_server: EtcdServer) -> None:
    names = [f"v{i}" for i in range(300)]
    async with EtcdClient([etcd_server.endpoint], timeout=2.0) as c:
        lease_a, _ = await c.grant(30)
        lease_b, _ = await c.grant(30)
        a, b = OwnerKeys(c, PREFIX, "a"), OwnerKeys(c, PREFIX, "b")
        await c.put(a.key("v7"), "b", lease_b)  # one key already held by b: a must lose exactly that one
        won = await campaign_all(a, names, lease_a)
        assert a.batches <= 2 * (len(names) // TXN_BATCH + 1)  # not one request per VIP
        assert [n for n, (ok, _) in won.items() if not ok] == ["v7"]
        assert won["v7"][1].node == "b"
        epochs = {n: rec.epoch for n, (ok, rec) in won.items() if ok}
        kvs, _ = await c.get_prefix(a.prefix)
        stored = {a.vip_of(kv.key): kv for kv in kvs}
        assert {n: kv.create_revision for n, kv in stored.items() if kv.value == "a"} == epochs
        assert all(kv.lease == lease_a for n, kv in stored.items() if n != "v7")
        # b campaigns for all of them now: loses every one, and sees a as the owner with a's epoch
        lost = await campaign_all(b, names, lease_b)
        assert {n for n, (ok, _) in lost.items() if ok} == {"v7"}  # b's own key on b's lease: reported won
        assert all(rec.node == "a" and rec.epoch == epochs[n] for n, (ok, rec) in lost.items() if n != "v7")


async def test_batched_releases_delete_only_our_epoch(etcd_server: EtcdServer) -> None:
    names = [f"v{i}" for i in range(200)]
    async with EtcdClient([etcd_server.endpoint], timeout=2.0) as c:
        lease, a, won, start = await held_by_a(c, names)
        results: dict[str, bool] = {}

        async def release(name: str, epoch: int, clean: bool) -> None:
            results[name] = await a.release(name, epoch, lease if clean else 0)

        async with trio.open_nursery() as nursery:
            for i, name in enumerate(names):
                epoch = won[name][1].epoch + (1 if i % 10 == 0 else 0)  # every 10th: a stale epoch
                nursery.start_soon(release, name, epoch, i % 2 == 0)
        assert {n for n, ok in results.items() if not ok} == {names[i] for i in range(0, 200, 10)}
        kvs, _ = await c.get_prefix(a.prefix)
        assert sorted(a.vip_of(kv.key) or "" for kv in kvs) == sorted(names[i] for i in range(0, 200, 10))
        # clean releases were marked "<node> released" before their delete (what the next owner reads)
        _, now = await c.get_prefix(a.prefix)
        seen: dict[str, list[str]] = {}
        for ev in await _events(c, a.prefix, start + 1, now):
            seen.setdefault(a.vip_of(ev.kv.key) or "", []).append("DELETE" if ev.type == "DELETE" else ev.kv.value)
        for i, name in enumerate(names):
            marked = owner_value("a", released=True, epoch=won[name][1].epoch)
            assert marked.startswith(f"a {RELEASED}")
            expected = [] if i % 10 == 0 else [marked, "DELETE"] if i % 2 == 0 else ["DELETE"]
            assert seen.get(name, []) == expected, name


async def test_a_stop_marks_keys_released_and_the_revoke_deletes_them_at_once(etcd_server: EtcdServer) -> None:
    """release(leave=True), as a daemon stop does: each key of our epoch is only marked released
    (in batches), a stale epoch is untouched, and the lease's revoke then deletes every key in one
    revision, so a watcher sees every "released" mark before any deletion."""
    names = [f"s{i}" for i in range(250)]
    async with EtcdClient([etcd_server.endpoint], timeout=2.0) as c:
        lease, a, won, start = await held_by_a(c, names)
        results: dict[str, bool] = {}

        async def release(name: str, epoch: int) -> None:
            results[name] = await a.release(name, epoch, lease, leave=True)

        before = a.batches
        async with trio.open_nursery() as nursery:
            for i, name in enumerate(names):
                nursery.start_soon(release, name, won[name][1].epoch + (1 if i == 3 else 0))
        assert {n for n, ok in results.items() if not ok} == {"s3"}
        assert a.batches - before <= len(names) // TXN_BATCH + 2  # one marking transaction per batch, no deletes
        kvs, _ = await c.get_prefix(a.prefix)
        values = {a.vip_of(kv.key): kv.value for kv in kvs}
        assert sorted(values) == sorted(names)  # every key still there, on the lease
        assert all(v == owner_value("a", released=True, epoch=won[n][1].epoch) for n, v in values.items() if n != "s3")
        assert values["s3"] == "a"
        await c.revoke(lease)
        kvs, now = await c.get_prefix(a.prefix)
        assert kvs == []
        events = await _events(c, a.prefix, start + 1, now)
        deletes = [ev for ev in events if ev.type == "DELETE"]
        assert len(deletes) == len(names) and len({ev.kv.mod_revision for ev in deletes}) == 1
        assert events[:len(names) - 1] == [ev for ev in events if ev.type != "DELETE"]  # every mark first


async def test_concurrent_takeovers_are_batched_and_each_compares_its_own_record(etcd_server: EtcdServer) -> None:
    """b owns 250 keys naming a as successor; a takes all over at once: a few transactions, each
    key replaced only if it still has the record a saw, and one whose reason no longer holds when
    its batch goes out (`still`) is not sent at all."""
    names = [f"t{i}" for i in range(250)]
    async with EtcdClient([etcd_server.endpoint], timeout=2.0) as c:
        lease_a, _ = await c.grant(30)
        lease_b, _ = await c.grant(30)
        a, b = OwnerKeys(c, PREFIX, "a"), OwnerKeys(c, PREFIX, "b")
        won = await campaign_all(b, names, lease_b)
        records = {n: rec for n, (_, rec) in won.items()}
        await c.put(b.key("t5"), owner_value("b", epoch=records["t5"].epoch), lease_b)  # t5 moved on since
        results: dict[str, Any] = {}

        async def take(name: str) -> None:
            results[name] = await a.take_over(name, records[name], lease_a, lambda: name != "t9")

        before = a._takeovers.batches
        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(take, name)
        assert a._takeovers.batches - before <= len(names) // TXN_BATCH + 2  # not one request per VIP
        assert {n for n, (ok, _) in results.items() if not ok} == {"t5", "t9"}
        assert results["t9"] == (False, records["t9"]) and results["t5"][1].node == "b"
        kvs, _ = await c.get_prefix(a.prefix)
        values = {a.vip_of(kv.key): (kv.value, kv.lease) for kv in kvs}
        for n in names:
            if n in ("t5", "t9"):
                assert values[n][1] == lease_b
            else:
                assert values[n] == (owner_value("a", epoch=records[n].revision + 1), lease_a)
                assert results[n][1].epoch == records[n].revision + 1


async def _events(c: EtcdClient, prefix: str, start: int, until: int) -> list[Any]:
    out: list[Any] = []
    async with aclosing(c.watch_prefix(prefix, start)) as batches:
        async for batch in batches:
            out.extend(batch.events)
            if batch.revision >= until:
                return out
    return out


async def test_a_hand_back_whose_mark_landed_unanswered_is_still_deleted(etcd_server: EtcdServer) -> None:
    """The first attempt's "released" mark reached etcd but its answer was lost (a timeout): the
    retry's mark fails its compare (the key changed under our record), and the delete still goes,
    for our own mark of that epoch only; another epoch's mark and another node's key stay."""
    names = ["m0", "m1", "m2"]
    async with EtcdClient([etcd_server.endpoint], timeout=2.0) as c:
        lease, a, won, _ = await held_by_a(c, names)
        epochs = {n: won[n][1].epoch for n in names}
        for n in names:  # the mark an earlier attempt left (m1: of another epoch)
            epoch = epochs[n] + (1 if n == "m1" else 0)
            await c.put(a.key(n), owner_value("a", released=True, epoch=epoch), lease)
        lease_b, _ = await c.grant(30)
        await c.put(a.key("m2"), "b", lease_b)  # m2 is b's now
        assert await a.release("m0", epochs["m0"], lease) is True
        assert await a.release("m1", epochs["m1"], lease) is False
        assert await a.release("m2", epochs["m2"], lease) is False
        kvs, _ = await c.get_prefix(a.prefix)
        left = {a.vip_of(kv.key): kv.value for kv in kvs}
        assert left == {"m1": owner_value("a", released=True, epoch=epochs["m1"] + 1), "m2": "b"}

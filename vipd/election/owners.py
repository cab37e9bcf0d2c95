"""Owner keys: `<prefix>vips/<name>/owner` = node, attached to the owner's host lease.

Created only by a transaction requiring create_revision == 0; that create_revision is the ownership
epoch (the fencing token). One watch on `<prefix>vips/` feeds every controller.

Campaigns and releases are batched per host: the calls that many controllers make in the same moment
(start, a host leaving, shutdown) go to etcd as the nested transactions of a few transactions (at
most TXN_BATCH each, PARALLEL_TXNS in flight), not one request per VIP. Each unit's compare still
decides only its own key, so a batch changes nothing about who wins.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Callable, Protocol, Sequence, TypeVar, Union

import trio

from vipd.coalesce import Coalescer
from vipd.election.etcd import EtcdClient
from vipd.election.follow import follow
from vipd.model import OwnerRecord

T = TypeVar("T")
# etcd checks a nested txn against --max-txn-ops minus its parent's op count (default 128: measured,
# 127 nested creates or 124 nested two-level deletes fit in one transaction): 100 leaves room
TXN_BATCH = 100
PARALLEL_TXNS = 2  # batched transactions in flight at once: the keepalive must never queue behind them


class KeyValueLike(Protocol):
    @property
    def key(self) -> str: ...
    @property
    def value(self) -> str: ...
    @property
    def create_revision(self) -> int: ...
    @property
    def mod_revision(self) -> int: ...
    @property
    def lease(self) -> int: ...


class OwnersClient(Protocol):
    async def txn_each(self, ops: list[dict[str, Any]]) -> tuple[list[tuple[bool, list[dict[str, Any]]]], int]: ...
    async def get_prefix(self, prefix: str) -> tuple[Sequence[KeyValueLike], int]: ...
    def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator: ...


RELEASED = "released"


class OwnerKeys:
    def __init__(self, client: OwnersClient, prefix: str, node: str) -> None:
        self._client = client
        self.prefix = prefix + "vips/"
        self.node = node
        self._campaigns: Coalescer[tuple[str, int], tuple[bool, OwnerRecord]] = Coalescer(
            self._campaign_batch, max_batch=TXN_BATCH, parallel=PARALLEL_TXNS)
        self._releases: Coalescer[tuple[str, int, int], bool] = Coalescer(
            self._release_batch, max_batch=TXN_BATCH, parallel=PARALLEL_TXNS)

    def key(self, vip: str) -> str:
        return f"{self.prefix}{vip}/owner"

    def vip_of(self, key: str) -> str | None:
        if key.startswith(self.prefix) and key.endswith("/owner"):
            return key[len(self.prefix):-len("/owner")]
        return None

    @staticmethod
    def record(kv: KeyValueLike, revision: int | None = None) -> OwnerRecord:
        node, _, mark = (kv.value or "").partition(" ")
        return OwnerRecord(node or None, kv.create_revision, kv.lease,
                           revision if revision is not None else kv.mod_revision, mark == RELEASED)

    async def campaign(self, vip: str, lease: int) -> tuple[bool, OwnerRecord]:
        """Create our owner key for ``vip`` on ``lease`` if there is none: (won, the key's record)."""
        return await self._campaigns.submit((vip, lease))

    async def release(self, vip: str, epoch: int, lease: int = 0) -> bool:
        """Delete our owner key for this epoch; never someone else's. With `lease` (a clean hand-back:
        our address is already gone), first mark the value `<node> released` so the next owner knows
        no stray copy of the address can answer and may skip its conflict probe."""
        return await self._releases.submit((vip, epoch, lease))

    @property
    def batches(self) -> int:
        """etcd transactions sent for campaigns and releases so far."""
        return self._campaigns.batches + self._releases.batches

    async def _campaign_batch(self, items: list[tuple[str, int]]) -> list[Union[tuple[bool, OwnerRecord], BaseException]]:
        done: dict[int, tuple[bool, OwnerRecord]] = {}
        for part in _unique_keys(items, lambda i: i[0]):  # one write per key and transaction
            ops = [EtcdClient.create_op(self.key(vip), self.node, lease) for _, (vip, lease) in part]
            results, revision = await self._client.txn_each(ops)
            for (n, (vip, lease)), (ok, responses) in zip(part, results):
                won, kv = EtcdClient.create_result(self.key(vip), self.node, lease, ok, responses, revision)
                done[n] = (won, self.record(kv))
        return [done[n] for n in range(len(items))]

    async def _release_batch(self, items: list[tuple[str, int, int]]) -> list[Union[bool, BaseException]]:
        marked = f"{self.node} {RELEASED}"
        done: dict[int, bool] = {}
        for part in _unique_keys(items, lambda i: i[0]):
            clean = [(vip, epoch, lease) for _, (vip, epoch, lease) in part if lease]
            if clean:  # first mark the clean hand-backs (their watchers see "released" before the delete)
                await self._client.txn_each([
                    EtcdClient.if_value_op(self.key(vip), self.node, epoch,
                                           EtcdClient.put_request(self.key(vip), marked, lease))
                    for vip, epoch, lease in clean])
            ops = []
            for _, (vip, epoch, lease) in part:
                key = self.key(vip)
                plain = EtcdClient.if_value_op(key, self.node, epoch, EtcdClient.delete_request(key))
                ops.append(EtcdClient.if_value_op(key, marked, epoch, EtcdClient.delete_request(key),
                                                  otherwise={"request_txn": plain}) if lease else plain)
            results, _ = await self._client.txn_each(ops)
            for (n, _), (ok, responses) in zip(part, results):
                inner = responses[0].get("response_txn", {}) if responses and not ok else {}
                done[n] = ok or bool(inner.get("succeeded", False))
        return [done[n] for n in range(len(items))]

    async def list(self) -> tuple[dict[str, OwnerRecord], int]:
        kvs, revision = await self._client.get_prefix(self.prefix)
        out = {}
        for kv in kvs:
            name = self.vip_of(kv.key)
            if name is not None:
                out[name] = self.record(kv)
        return out, revision

    async def watch(self, names: Sequence[str], deliver: Callable[[str, OwnerRecord], None],
                    *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """deliver(name, record) for every configured unit after each listing (absent keys as
        OwnerRecord(None, revision=listing revision)) and for every change after it; forever."""
        wanted: set[str | None] = set(names)

        def snapshot(kvs: Sequence[KeyValueLike], revision: int) -> None:
            current = {self.vip_of(kv.key): self.record(kv) for kv in kvs}  # type: ignore[misc]
            for name in names:
                deliver(name, current.get(name, OwnerRecord(None, revision=revision)))

        def event(ev: Any) -> None:
            name = self.vip_of(ev.kv.key)
            if name is not None and name in wanted:
                deliver(name, OwnerRecord(None, revision=ev.kv.mod_revision) if ev.type == "DELETE"
                        else self.record(ev.kv))

        await follow(self._client, self.prefix, snapshot, event, task_status=task_status)  # type: ignore[arg-type]


def _unique_keys(items: list[T], key: Callable[[T], str]) -> list[list[tuple[int, T]]]:
    """Split (index, item) pairs into parts in which no key repeats (etcd refuses two writes to one
    key in a transaction); almost always one part."""
    parts: list[list[tuple[int, T]]] = []
    seen: list[set[str]] = []
    for item in enumerate(items):
        k = key(item[1])
        for part, keys in zip(parts, seen):
            if k not in keys:
                part.append(item)
                keys.add(k)
                break
        else:
            parts.append([item])
            seen.append({k})
    return parts

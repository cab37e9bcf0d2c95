"""Owner keys: `<prefix>vips/<name>/owner` = node, attached to the owner's host lease.

Created only by a transaction requiring create_revision == 0; that create_revision is the ownership
epoch (the fencing token). One watch on `<prefix>vips/` feeds every controller.
"""

from __future__ import annotations

import contextlib
from typing import AsyncIterator, Callable, Protocol

import trio

from vipd import log
from vipd.errors import EtcdAuthError, EtcdCompacted, EtcdError, EtcdWatchIdle
from vipd.model import OwnerRecord


class KeyValueLike(Protocol):
    key: str
    value: str
    create_revision: int
    mod_revision: int
    lease: int


class OwnersClient(Protocol):
    async def create(self, key: str, value: str, lease_id: int) -> tuple[bool, KeyValueLike]: ...
    async def delete_if(self, key: str, value: str, create_revision: int) -> bool: ...
    async def get_prefix(self, prefix: str) -> tuple[list[KeyValueLike], int]: ...
    def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator: ...


class OwnerKeys:
    def __init__(self, client: OwnersClient, prefix: str, node: str) -> None:
        self._client = client
        self.prefix = prefix + "vips/"
        self.node = node

    def key(self, vip: str) -> str:
        return f"{self.prefix}{vip}/owner"

    def vip_of(self, key: str) -> str | None:
        if key.startswith(self.prefix) and key.endswith("/owner"):
            return key[len(self.prefix):-len("/owner")]
        return None

    @staticmethod
    def record(kv: KeyValueLike, revision: int | None = None) -> OwnerRecord:
        return OwnerRecord(kv.value or None, kv.create_revision, kv.lease,
                           revision if revision is not None else kv.mod_revision)

    async def campaign(self, vip: str, lease: int) -> tuple[bool, OwnerRecord]:
        won, kv = await self._client.create(self.key(vip), self.node, lease)
        return won, self.record(kv)

    async def release(self, vip: str, epoch: int) -> bool:
        """Delete our owner key for this epoch; never someone else's."""
        return await self._client.delete_if(self.key(vip), self.node, epoch)

    async def list(self) -> tuple[dict[str, OwnerRecord], int]:
        kvs, revision = await self._client.get_prefix(self.prefix)
        out = {}
        for kv in kvs:
            name = self.vip_of(kv.key)
            if name is not None:
                out[name] = self.record(kv)
        return out, revision

    async def watch(self, names: list[str], deliver: Callable[[str, OwnerRecord], None],
                    *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """List, then watch, forever; re-list after any stream failure (level-triggered).

        deliver(name, record) is called for every configured VIP after each listing (absent keys as
        OwnerRecord(None, revision=listing revision)) and for every change after it."""
        wanted = set(names)
        backoff = 0.1
        started = failed = False
        while True:
            try:
                current, revision = await self.list()
                if failed:
                    log.info("watch_restored", prefix=self.prefix, revision=revision)
                    failed = False
                for name in names:
                    deliver(name, current.get(name, OwnerRecord(None, revision=revision)))
                if not started:
                    started = True
                    task_status.started()
                backoff = 0.1
                async with contextlib.aclosing(self._client.watch_prefix(self.prefix, revision + 1)) as batches:
                    async for batch in batches:
                        for ev in batch.events:
                            name = self.vip_of(ev.kv.key)
                            if name not in wanted:
                                continue
                            if ev.type == "DELETE":
                                deliver(name, OwnerRecord(None, revision=ev.kv.mod_revision))
                            else:
                                deliver(name, self.record(ev.kv))
            except EtcdAuthError:
                raise
            except EtcdCompacted:
                log.info("watch_compacted", prefix=self.prefix)
            except EtcdWatchIdle:
                # etcd without --experimental-watch-progress-notify-interval sends no progress on a quiet
                # stream; a re-list + re-watch is cheap and proves the stream (level-triggered).
                log.debug("watch_refreshed", prefix=self.prefix)
            except EtcdError as e:
                if not failed:
                    log.warning("watch_failed", prefix=self.prefix, error=e)
                failed = True
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 0.5)  # backups must see owner changes soon after etcd returns

"""Owner keys: `<prefix>vips/<name>/owner` = node, attached to the owner's host lease.

Created only by a transaction requiring create_revision == 0; that create_revision is the ownership
epoch (the fencing token). One watch on `<prefix>vips/` feeds every controller.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Callable, Protocol, Sequence

import trio

from vipd.election.follow import follow
from vipd.model import OwnerRecord


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
    async def create(self, key: str, value: str, lease_id: int) -> tuple[bool, KeyValueLike]: ...
    async def delete_if(self, key: str, value: str, create_revision: int) -> bool: ...
    async def replace_if(self, key: str, old: str, new: str, create_revision: int, lease_id: int) -> bool: ...
    async def get_prefix(self, prefix: str) -> tuple[Sequence[KeyValueLike], int]: ...
    def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator: ...


RELEASED = "released"


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
        node, _, mark = (kv.value or "").partition(" ")
        return OwnerRecord(node or None, kv.create_revision, kv.lease,
                           revision if revision is not None else kv.mod_revision, mark == RELEASED)

    async def campaign(self, vip: str, lease: int) -> tuple[bool, OwnerRecord]:
        won, kv = await self._client.create(self.key(vip), self.node, lease)
        return won, self.record(kv)

    async def release(self, vip: str, epoch: int, lease: int = 0) -> bool:
        """Delete our owner key for this epoch; never someone else's. With `lease` (a clean hand-back:
        our address is already gone), first mark the value `<node> released` so the next owner knows
        no stray copy of the address can answer and may skip its conflict probe."""
        marked = f"{self.node} {RELEASED}"
        if lease:
            await self._client.replace_if(self.key(vip), self.node, marked, epoch, lease)
            if await self._client.delete_if(self.key(vip), marked, epoch):
                return True
        return await self._client.delete_if(self.key(vip), self.node, epoch)

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
            current = {self.vip_of(kv.key): self.record(kv) for kv in kvs}
            for name in names:
                deliver(name, current.get(name, OwnerRecord(None, revision=revision)))

        def event(ev: Any) -> None:
            name = self.vip_of(ev.kv.key)
            if name is not None and name in wanted:
                deliver(name, OwnerRecord(None, revision=ev.kv.mod_revision) if ev.type == "DELETE"
                        else self.record(ev.kv))

        await follow(self._client, self.prefix, snapshot, event, task_status=task_status)  # type: ignore[arg-type]

"""Owner keys: `<prefix>vips/<name>/owner`, attached to the owner's host lease.

The value is `<node>[ released][ epoch=<N>][ successor=<node>]`. A key is created only by a
transaction requiring create_revision == 0; that create_revision is the ownership epoch (the
fencing token) unless the value names one. Every later write is a transaction comparing the key's
mod revision with the one the writer last saw, so each change of owner or successor is linearised
on this one key (vipd/succession.py builds its safety argument on that):
- the owner names its successor (`rename`), keeping its epoch;
- the named successor replaces the owner (`take_over`, fast takeover) with epoch = the replaced
  mod revision + 1, which exceeds every earlier epoch of the key and is below every later one;
- the owner gives it back (`release`).
One watch on `<prefix>vips/` feeds every controller.

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
from vipd.errors import CampaignWithdrawn
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


def owner_value(node: str, *, released: bool = False, epoch: int | None = None, successor: str | None = None) -> str:
    parts = [node] + ([RELEASED] if released else []) + ([f"epoch={epoch}"] if epoch is not None else [])
    return " ".join(parts + ([f"successor={successor}"] if successor else []))


def parse_value(value: str) -> tuple[str | None, bool, int | None, str | None]:
    """(node, released, epoch if named, successor): unknown tokens are ignored (newer writers)."""
    tokens = (value or "").split()
    node = tokens[0] if tokens else None
    epoch: int | None = None
    successor: str | None = None
    for t in tokens[1:]:
        name, _, arg = t.partition("=")
        if name == "epoch" and arg.isdigit():
            epoch = int(arg)
        elif name == "successor" and arg:
            successor = arg
    return node, RELEASED in tokens[1:], epoch, successor


class OwnerKeys:
    def __init__(self, client: OwnersClient, prefix: str, node: str) -> None:
        self._client = client
        self.prefix = prefix + "vips/"
        self.node = node
        self._campaigns: Coalescer[tuple[str, int, Callable[[], bool]], tuple[bool, OwnerRecord]] = Coalescer(
            self._campaign_batch, max_batch=TXN_BATCH, parallel=PARALLEL_TXNS)
        self._takeovers: Coalescer[tuple[str, OwnerRecord, int, Callable[[], bool]], tuple[bool, OwnerRecord]] = (
            Coalescer(self._take_over_batch, max_batch=TXN_BATCH, parallel=PARALLEL_TXNS))
        self._releases: Coalescer[tuple[str, int, int, bool], bool] = Coalescer(
            self._release_batch, max_batch=TXN_BATCH, parallel=PARALLEL_TXNS)
        # our own keys: name -> (epoch, mod revision last written or seen): later writes compare it
        self.held: dict[str, tuple[int, int]] = {}
        self.listeners: list[Callable[[str, OwnerRecord], None]] = []  # told every record learnt

    def key(self, vip: str) -> str:
        return f"{self.prefix}{vip}/owner"

    def vip_of(self, key: str) -> str | None:
        if key.startswith(self.prefix) and key.endswith("/owner"):
            return key[len(self.prefix):-len("/owner")]
        return None

    @staticmethod
    def record(kv: KeyValueLike, revision: int | None = None) -> OwnerRecord:
        node, released, epoch, successor = parse_value(kv.value)
        return OwnerRecord(node, epoch if epoch is not None else kv.create_revision, kv.lease,
                           revision if revision is not None else kv.mod_revision, released, successor)

    def _saw(self, name: str, record: OwnerRecord) -> None:
        for listener in self.listeners:
            listener(name, record)
        if record.node == self.node and not record.released:
            held = self.held.get(name)
            if held is None or held[0] != record.epoch or held[1] < record.revision:
                self.held[name] = (record.epoch, record.revision)
        elif record.node != self.node:
            self.held.pop(name, None)

    async def take_over(self, vip: str, record: OwnerRecord, lease: int,
                        still: Callable[[], bool] = lambda: True) -> tuple[bool, OwnerRecord]:
        """Replace `record` (a peer's key naming us successor) with ours on `lease`, only if the key
        still has record's mod revision: (won, the key's record now). Takeovers that many units ask
        for at once (a host lost) share transactions; `still()` is asked again right before the
        transaction goes out, and an item for which it no longer holds is not sent (lost, record
        unchanged): a takeover must be sent while its reason holds (vipd/succession.py)."""
        return await self._takeovers.submit((vip, record, lease, still))

    async def _take_over_batch(self, items: list[tuple[str, OwnerRecord, int, Callable[[], bool]]],
                               ) -> list[Union[tuple[bool, OwnerRecord], BaseException]]:
        done: dict[int, tuple[bool, OwnerRecord]] = {}
        for part in _unique_keys(items, lambda i: i[0]):
            send = [(n, vip, record, lease) for n, (vip, record, lease, still) in part if still()]
            for n, (_, record, _, _) in part:
                done.setdefault(n, (False, record))  # (replaced below when sent)
            if not send:
                continue
            ops = []
            for _, vip, record, lease in send:  # (no await between still() and the request)
                key = self.key(vip)
                ops.append(EtcdClient.if_mod_op(key, record.revision, EtcdClient.put_request(
                    key, owner_value(self.node, epoch=record.revision + 1), lease),
                    otherwise={"request_range": {"key": EtcdClient.b64(key)}}))
            results, revision = await self._client.txn_each(ops)
            for (n, vip, record, lease), (ok, responses) in zip(send, results):
                if ok:
                    won = OwnerRecord(self.node, record.revision + 1, lease, revision)
                    self._saw(vip, won)
                    done[n] = (True, won)
                else:
                    done[n] = (False, self._current(responses, revision))
        return [done[n] for n in range(len(items))]

    async def rename(self, items: Sequence[tuple[str, OwnerRecord, str | None]]) -> dict[str, tuple[bool, OwnerRecord]]:
        """For each (name, our record, successor): rewrite our key naming `successor` (None: nobody),
        only if it still has the record's mod revision. One transaction (callers keep it under
        TXN_BATCH). Returns name -> (succeeded, the key's record now)."""
        ops = []
        for name, rec, successor in items:
            key = self.key(name)
            value = owner_value(self.node, epoch=rec.epoch, successor=successor)
            ops.append(EtcdClient.if_mod_op(key, rec.revision, EtcdClient.put_request(key, value, rec.lease),
                                            otherwise={"request_range": {"key": EtcdClient.b64(key)}}))
        results, revision = await self._client.txn_each(ops)
        out = {}
        for (name, rec, successor), (ok, responses) in zip(items, results):
            now = (OwnerRecord(self.node, rec.epoch, rec.lease, revision, successor=successor) if ok
                   else self._current(responses, revision))
            self._saw(name, now)
            out[name] = (ok, now)
        return out

    def _current(self, responses: list[dict[str, Any]], revision: int) -> OwnerRecord:
        kvs = responses[0].get("response_range", {}).get("kvs", []) if responses else []
        return self.record(EtcdClient.kv(kvs[0])) if kvs else OwnerRecord(None, revision=revision)

    def rank_campaigns(self, rank: Callable[[str], int]) -> None:
        """Campaigns queued together go lowest `rank(vip)` first (units that probe before claiming)."""
        self._campaigns.rank = lambda item: rank(item[0])

    async def campaign(self, vip: str, lease: int, still: Callable[[], bool] = lambda: True) -> tuple[bool, OwnerRecord]:
        """Create our owner key for ``vip`` on ``lease`` if there is none: (won, the key's record).
        `still()` is asked again right before the transaction goes out: a host starting thousands
        of campaigns sends them over seconds, and a host that joined meanwhile may be the better
        place for many of them. Not sent: CampaignWithdrawn."""
        return await self._campaigns.submit((vip, lease, still))

    async def release(self, vip: str, epoch: int, lease: int = 0, leave: bool = False) -> bool:
        """Delete our owner key for this epoch; never someone else's. With `lease` (a clean hand-back:
        our address is already gone), first mark the value `<node> released` so the next owner knows
        no stray copy of the address can answer and may skip its conflict probe. With `leave` as
        well, only mark it: the caller revokes the lease next, which deletes every key at once."""
        return await self._releases.submit((vip, epoch, lease, leave and bool(lease)))

    @property
    def batches(self) -> int:
        """etcd transactions sent for campaigns and releases so far."""
        return self._campaigns.batches + self._releases.batches

    async def _campaign_batch(self, items: list[tuple[str, int, Callable[[], bool]]],
                              ) -> list[Union[tuple[bool, OwnerRecord], BaseException]]:
        done: dict[int, Union[tuple[bool, OwnerRecord], BaseException]] = {}
        for part in _unique_keys(items, lambda i: i[0]):  # one write per key and transaction
            send = []
            for n, (vip, lease, still) in part:
                if still():
                    send.append((n, (vip, lease)))
                else:
                    done[n] = CampaignWithdrawn(vip)
            if not send:
                continue
            ops = [EtcdClient.create_op(self.key(vip), self.node, lease) for _, (vip, lease) in send]
            results, revision = await self._client.txn_each(ops)
            for (n, (vip, lease)), (ok, responses) in zip(send, results):
                won, kv = EtcdClient.create_result(self.key(vip), self.node, lease, ok, responses, revision)
                done[n] = (won, self.record(kv))
                if won:
                    self._saw(vip, self.record(kv))
        return [done[n] for n in range(len(items))]

    async def _release_batch(self, items: list[tuple[str, int, int, bool]]) -> list[Union[bool, BaseException]]:
        done: dict[int, bool] = {}
        for part in _unique_keys(items, lambda i: i[0]):
            clean = [(n, vip, epoch, lease) for n, (vip, epoch, lease, _) in part if lease]
            unmarked: set[int] = set()  # clean hand-backs whose mark found the key changed
            if clean:  # first mark the clean hand-backs (their watchers see "released" before the delete)
                results, revision = await self._client.txn_each([
                    self._if_ours(vip, epoch, EtcdClient.put_request(
                        self.key(vip), owner_value(self.node, released=True, epoch=epoch), lease))
                    for _, vip, epoch, lease in clean])
                for (n, vip, epoch, _), (ok, _) in zip(clean, results):
                    if ok:
                        self.held[vip] = (epoch, revision)
                    else:
                        unmarked.add(n)
                    if items[n][3]:
                        done[n] = ok  # left to the lease's revoke: marked is done
            rest = [(n, (vip, epoch)) for n, (vip, epoch, _, leave) in part if not leave]
            if not rest:
                continue
            ops = [self._if_marked(vip, epoch, EtcdClient.delete_request(self.key(vip))) if n in unmarked
                   else self._if_ours(vip, epoch, EtcdClient.delete_request(self.key(vip))) for n, (vip, epoch) in rest]
            results, _ = await self._client.txn_each(ops)
            for (n, (vip, _)), (ok, _) in zip(rest, results):
                done[n] = ok
                if ok:
                    self.held.pop(vip, None)
        return [done[n] for n in range(len(items))]

    def _if_marked(self, vip: str, epoch: int, then: dict[str, Any]) -> dict[str, Any]:
        """`then` only if the key holds our own "released" mark of `epoch`. A mark whose answer was
        lost (etcd applied it, the request timed out: a handover wave at 3,000 VIPs) changed the key
        under our record of it, so the retry's mark fails its compare; the delete must still go,
        or the marked key stays on our live lease, no other host campaigns, and the VIP has no
        holder until this host stops (bench/scale.py: 19 VIPs for two minutes)."""
        return EtcdClient.if_value_op(self.key(vip), owner_value(self.node, released=True, epoch=epoch), epoch, then)

    def _if_ours(self, vip: str, epoch: int, then: dict[str, Any]) -> dict[str, Any]:
        """`then` only if the key is still ours for `epoch`: its mod revision is the one we last
        wrote or saw; a key we never saw written (a previous run's) by its plain value and epoch."""
        held = self.held.get(vip)
        if held is not None and held[0] == epoch:
            return EtcdClient.if_mod_op(self.key(vip), held[1], then)
        return EtcdClient.if_value_op(self.key(vip), self.node, epoch, then)

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
                rec = current.get(name, OwnerRecord(None, revision=revision))
                self._saw(name, rec)
                deliver(name, rec)

        def event(ev: Any) -> None:
            name = self.vip_of(ev.kv.key)
            if name is not None and name in wanted:
                rec = (OwnerRecord(None, revision=ev.kv.mod_revision) if ev.type == "DELETE"
                       else self.record(ev.kv))
                self._saw(name, rec)
                deliver(name, rec)

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

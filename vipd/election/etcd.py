"""etcd v3 client over etcd's JSON gateway (/v3/...), for trio. Knows nothing about IPs.

Every call goes to the last endpoint that worked and is hedged to the others when that one fails or
is slow; each attempt is bounded by `timeout` with a trio cancel scope, so a blackholed endpoint
cannot hang a call (that and TLS, auth tokens and error decoding: vipd.election.etcd_transport and
vipd.election.endpoints). Gateway quirks: keys and
values are base64, int64 fields are strings, default values are omitted.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, AsyncGenerator, AsyncIterator, Literal

import httpx
import trio

from vipd.config import EtcdConfig
from vipd.election.etcd_transport import (EndpointFailed, EtcdTransport, TokenInvalid, close_response,
                                          raise_etcd_error)
from vipd.errors import EtcdCompacted, EtcdRequestError, EtcdUnavailable, EtcdWatchIdle, LeaseLost

MAX_TXN_OPS = 128  # etcd's --max-txn-ops default: ops per level of one transaction


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: str
    create_revision: int
    mod_revision: int
    lease: int


@dataclass(frozen=True)
class WatchEvent:
    type: Literal["PUT", "DELETE"]
    kv: KeyValue  # for DELETE: value "" and the deletion's mod_revision


@dataclass(frozen=True)
class WatchBatch:
    """Everything under the prefix up to `revision` has been delivered; resume at revision + 1.

    `revision` is the last event's mod_revision, or the header revision of a progress notification
    (then events == ()).
    """

    revision: int
    events: tuple[WatchEvent, ...]


@dataclass(frozen=True)
class _Created:
    revision: int  # the member's revision when the watch was created


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def _unb64(s: str) -> str:
    return base64.b64decode(s).decode()


def _prefix_end(prefix: str) -> str:
    """base64 of the smallest key greater than every key starting with prefix."""
    b = bytearray(prefix.encode())
    while b and b[-1] == 0xFF:
        b.pop()
    if not b:
        return _b64(b"\0")  # every key
    b[-1] += 1
    return _b64(bytes(b))


def _kv(d: dict[str, Any]) -> KeyValue:
    return KeyValue(_unb64(d["key"]), _unb64(d.get("value", "")), int(d.get("create_revision", 0)),
                    int(d.get("mod_revision", 0)), int(d.get("lease", 0)))


class EtcdClient(EtcdTransport):
    """A small etcd v3 client: leases, transactions, ranges and prefix watches."""

    @classmethod
    def from_config(cls, cfg: EtcdConfig) -> "EtcdClient":
        return cls(cfg.endpoints, timeout=cfg.request_timeout, ca_file=cfg.ca_file, cert_file=cfg.cert_file,
                   key_file=cfg.key_file, username=cfg.username, password=cfg.password)

    # --- leases --------------------------------------------------------------------------------

    async def grant(self, ttl: int) -> tuple[int, int]:
        """A new lease: (lease_id, TTL granted by etcd, which may exceed ttl)."""
        data = await self._call("/v3/lease/grant", {"TTL": str(ttl)})
        return int(data["ID"]), int(data["TTL"])

    async def keepalive(self, lease_id: int) -> int:
        """One keepalive round trip; the refreshed TTL. LeaseLost when the lease is gone."""

        async def attempt(ep: str) -> dict[str, Any]:
            try:
                async with self._client().stream("POST", ep + "/v3/lease/keepalive", json={"ID": str(lease_id)},
                                                 headers=self._headers()) as resp:
                    lines = resp.aiter_lines()
                    async for line in lines:
                        if line.strip():
                            data = self._decode(resp.status_code, line)
                            # etcd ends the stream after one answer: read to its end so that the
                            # connection is reused (else a new TCP/TLS connection per keepalive)
                            with trio.move_on_after(self.timeout / 2):
                                async for _ in lines:
                                    pass
                            return data
            except httpx.HTTPError as e:
                raise await self._transport_failure(ep, e) from e
            raise EndpointFailed("keepalive stream closed without an answer")

        data = await self._authenticated(attempt)
        ttl = int(data.get("result", {}).get("TTL", 0))
        if ttl <= 0:
            raise LeaseLost(f"lease {lease_id:x} is gone")
        return ttl

    async def revoke(self, lease_id: int) -> None:
        """Revoke a lease (its keys are deleted). A lease that is already gone is fine."""
        try:
            await self._call("/v3/lease/revoke", {"ID": str(lease_id)})
        except LeaseLost:
            pass

    async def time_to_live(self, lease_id: int) -> int:
        """Remaining whole seconds of a lease (rounded down: 0 means under a second), -1 when gone."""
        data = await self._call("/v3/lease/timetolive", {"ID": str(lease_id)})
        return int(data.get("TTL", 0))  # etcd sends "-1" for a gone lease; an absent field is 0

    # --- keys ----------------------------------------------------------------------------------

    async def create(self, key: str, value: str, lease_id: int) -> tuple[bool, KeyValue]:
        """Create key only if absent, in one txn. (True, our kv) or (False, the existing kv).

        Its create_revision is the ownership epoch. A key found attached to lease_id with our value is
        reported as ours: that is what a retry sees after an attempt whose answer was lost.
        """
        data = await self._call("/v3/kv/txn", self.create_op(key, value, lease_id))
        responses = data.get("responses", [])
        return self.create_result(key, value, lease_id, bool(data.get("succeeded", False)), responses,
                                  int(data["header"]["revision"]))

    async def get(self, key: str) -> KeyValue | None:
        data = await self._call("/v3/kv/range", {"key": _b64(key)})
        kvs = data.get("kvs", [])
        return _kv(kvs[0]) if kvs else None

    async def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """All keys under prefix and the revision they were read at."""
        data = await self._call("/v3/kv/range", {"key": _b64(prefix), "range_end": _prefix_end(prefix)})
        return [_kv(d) for d in data.get("kvs", [])], int(data["header"]["revision"])

    async def put(self, key: str, value: str, lease_id: int = 0) -> int:
        """Unconditional put; returns the new revision. LeaseLost if lease_id is gone."""
        data = await self._call("/v3/kv/put", {"key": _b64(key), "value": _b64(value), "lease": str(lease_id)})
        return int(data["header"]["revision"])

    async def delete_if(self, key: str, value: str, create_revision: int) -> bool:
        """Delete key only if it still holds value and create_revision (never someone else's key)."""
        k = _b64(key)
        data = await self._call("/v3/kv/txn", {
            "compare": [{"key": k, "target": "VALUE", "result": "EQUAL", "value": _b64(value)},
                        {"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": str(create_revision)}],
            "success": [{"request_delete_range": {"key": k}}],
        })
        return bool(data.get("succeeded", False))

    async def replace_if(self, key: str, old: str, new: str, create_revision: int, lease_id: int) -> bool:
        """Overwrite key's value (keeping it on lease_id) only if it still holds old and create_revision."""
        k = _b64(key)
        data = await self._call("/v3/kv/txn", {
            "compare": [{"key": k, "target": "VALUE", "result": "EQUAL", "value": _b64(old)},
                        {"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": str(create_revision)}],
            "success": [{"request_put": {"key": k, "value": _b64(new), "lease": str(lease_id)}}],
        })
        return bool(data.get("succeeded", False))

    # --- many independent conditional requests in one round trip ------------------------------

    async def txn_each(self, ops: list[dict[str, Any]]) -> tuple[list[tuple[bool, list[dict[str, Any]]]], int]:
        """Run independent transactions (each a txn body: compare / success / failure, in the JSON
        gateway's form) as the nested transactions of ONE etcd transaction (etcd >= 3.3): one round
        trip, one revision. Each op's compares decide only its own branch. etcd refuses a txn with
        two writes to one key, or with more ops than --max-txn-ops (MAX_TXN_OPS by default) where a
        nested txn's allowance is the limit minus its parent's op count: callers stay well under it
        and send one op per key. Returns ((succeeded, responses) per op, the
        revision)."""
        if not ops:
            return [], 0
        data = await self._call("/v3/kv/txn", {"success": [{"request_txn": op} for op in ops]})
        responses = data.get("responses", [])
        if len(responses) != len(ops):
            raise EtcdRequestError(f"txn of {len(ops)} ops answered {len(responses)} responses")
        out = []
        for r in responses:
            t = r.get("response_txn", {})
            out.append((bool(t.get("succeeded", False)), list(t.get("responses", []))))
        return out, int(data["header"]["revision"])

    @staticmethod
    def create_op(key: str, value: str, lease_id: int) -> dict[str, Any]:
        """A txn body for txn_each: put key (on lease_id) only if absent, else read it."""
        k = _b64(key)
        return {"compare": [{"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}],
                "success": [{"request_put": {"key": k, "value": _b64(value), "lease": str(lease_id)}}],
                "failure": [{"request_range": {"key": k}}]}

    @staticmethod
    def create_result(key: str, value: str, lease_id: int, succeeded: bool, responses: list[dict[str, Any]],
                      revision: int) -> tuple[bool, KeyValue]:
        """create_op's outcome, as create() reports it."""
        if succeeded:
            return True, KeyValue(key, value, revision, revision, lease_id)
        kvs = responses[0].get("response_range", {}).get("kvs", []) if responses else []
        if not kvs:
            raise EtcdRequestError(f"create {key!r}: compare failed but the key is absent")
        kv = _kv(kvs[0])
        return (lease_id != 0 and kv.lease == lease_id and kv.value == value), kv

    @staticmethod
    def if_value_op(key: str, value: str, create_revision: int, then: dict[str, Any],
                    otherwise: dict[str, Any] | None = None) -> dict[str, Any]:
        """A txn body for txn_each: ``then`` (a request op) only if key holds value and
        create_revision; else ``otherwise`` (a request op, e.g. another such txn) if given."""
        k = _b64(key)
        op: dict[str, Any] = {
            "compare": [{"key": k, "target": "VALUE", "result": "EQUAL", "value": _b64(value)},
                        {"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": str(create_revision)}],
            "success": [then]}
        if otherwise is not None:
            op["failure"] = [otherwise]
        return op

    @staticmethod
    def if_mod_op(key: str, mod_revision: int, then: dict[str, Any],
                  otherwise: dict[str, Any] | None = None) -> dict[str, Any]:
        """A txn body for txn_each: ``then`` only if key's mod revision is ``mod_revision``."""
        op: dict[str, Any] = {
            "compare": [{"key": _b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(mod_revision)}],
            "success": [then]}
        if otherwise is not None:
            op["failure"] = [otherwise]
        return op

    @staticmethod
    def b64(s: str) -> str:
        return _b64(s)

    @staticmethod
    def kv(d: dict[str, Any]) -> KeyValue:
        return _kv(d)

    @staticmethod
    def put_request(key: str, value: str, lease_id: int) -> dict[str, Any]:
        return {"request_put": {"key": _b64(key), "value": _b64(value), "lease": str(lease_id)}}

    @staticmethod
    def delete_request(key: str) -> dict[str, Any]:
        return {"request_delete_range": {"key": _b64(key)}}

    # --- watch ---------------------------------------------------------------------------------

    async def watch_prefix(self, prefix: str, start_revision: int, *,
                           progress_interval: float = 1.0) -> AsyncGenerator[WatchBatch, None]:
        """Batches of events under prefix from start_revision on, in order, plus progress batches.

        Needs etcd to send progress notifications at least every progress_interval
        (`--experimental-watch-progress-notify-interval`, default 10 min): a stream silent for
        3 * progress_interval + timeout raises EtcdUnavailable, as does any stream error.
        EtcdCompacted: start_revision was compacted (re-list, then watch again).
        The stream opens on the first iteration. Close it when done:
        `async with contextlib.aclosing(client.watch_prefix(...)) as batches: async for b in batches: ...`
        """
        body = {"create_request": {"key": _b64(prefix), "range_end": _prefix_end(prefix),
                                   "start_revision": str(start_revision), "progress_notify": True}}
        silence = 3 * progress_interval + self.timeout
        resp: httpx.Response | None = None

        async def attempt(ep: str) -> tuple[str, httpx.Response, AsyncIterator[str]]:
            request = self._client().build_request("POST", ep + "/v3/watch", json=body, headers=self._headers(),
                                                   timeout=httpx.Timeout(self.timeout, read=None))
            r: httpx.Response | None = None
            try:
                r = await self._client().send(request, stream=True)
                lines = r.aiter_lines()
                if r.status_code != 200:
                    self._decode(r.status_code, (await r.aread()).decode(errors="replace"))
                created = await self._watch_message(lines)  # expect "created" (or a cancellation)
                if not isinstance(created, _Created):
                    raise EndpointFailed("watch answered without confirming its creation")
                if created.revision < start_revision - 1:  # a store that went back (restored, wiped)
                    raise EtcdCompacted(f"etcd is at revision {created.revision}, before the watch's "
                                        f"start {start_revision}: re-list")
                return ep, r, lines
            except httpx.HTTPError as e:
                await close_response(r)
                raise await self._transport_failure(ep, e) from e
            except BaseException:
                await close_response(r)
                raise

        try:
            async def discard(opened: tuple[str, httpx.Response, AsyncIterator[str]]) -> None:
                await close_response(opened[1])

            ep, resp, lines = await self._authenticated(attempt, discard)  # type: ignore[arg-type]
            last = trio.current_time()  # when the last message arrived
            while True:
                # silence counts from the last message, not from this call (the consumer may be slow);
                # the floor lets a slow consumer read what is already buffered
                with trio.move_on_at(max(last + silence, trio.current_time() + self.timeout)) as scope:
                    try:
                        batch = await self._watch_message(lines)
                    except (httpx.HTTPError, EndpointFailed, TokenInvalid) as e:
                        self._endpoint_broke(ep)  # resume on another member
                        raise EtcdUnavailable(f"watch on {ep} broke: {e}") from e
                if scope.cancelled_caught:
                    self._endpoint_broke(ep)
                    raise EtcdWatchIdle(f"watch on {ep}: no event or progress notification "
                                          f"for {trio.current_time() - last:.1f}s")
                last = trio.current_time()
                if isinstance(batch, WatchBatch):
                    yield batch
        finally:
            await close_response(resp)

    @staticmethod
    async def _watch_message(lines: AsyncIterator[str]) -> WatchBatch | _Created:
        """Read one watch message: a batch, or the "created" confirmation."""
        async for line in lines:
            if line.strip():
                break
        else:
            raise EndpointFailed("watch stream closed by etcd")
        try:
            msg = json.loads(line)
        except ValueError:
            raise EndpointFailed(f"not a watch message: {line[:80]!r}") from None
        if "error" in msg:
            raise_etcd_error(200, msg)
        r = msg.get("result", {})
        if r.get("canceled"):
            if int(r.get("compact_revision", 0)):
                raise EtcdCompacted(f"watch start revision compacted (etcd compacted up to {r['compact_revision']})")
            raise_etcd_error(200, {"error": r.get("cancel_reason", "watch canceled by etcd")})
        if r.get("created"):
            return _Created(int(r.get("header", {}).get("revision", 0)))
        events = tuple(WatchEvent(e.get("type", "PUT"), _kv(e["kv"])) for e in r.get("events", []))
        revision = events[-1].kv.mod_revision if events else int(r["header"]["revision"])
        return WatchBatch(revision, events)

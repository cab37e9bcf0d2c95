"""etcd v3 client over etcd's JSON gateway (/v3/...), for trio. Knows nothing about IPs.

Every call tries the endpoints in turn, starting with the last one that worked; each attempt is
bounded by `timeout` with a trio cancel scope, so a blackholed endpoint cannot hang a call. Gateway
quirks: keys and values are base64, int64 fields are strings, default values are omitted.
"""

from __future__ import annotations

import base64
import json
import ssl
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Literal, Sequence, TypeVar

import httpx
import trio

from vipd.config import EtcdConfig
from vipd.errors import (EtcdAuthError, EtcdCompacted, EtcdRequestError, EtcdUnavailable, EtcdWatchIdle,
                         LeaseLost)

T = TypeVar("T")
_RETRY_CODES = {4, 14}  # gRPC DeadlineExceeded, Unavailable: this member cannot serve, try the next
_TLS_AUTH_WORDS = ("CERTIFICATE", "UNKNOWN_CA", "BAD_CERT", "HANDSHAKE_FAILURE", "ACCESS_DENIED")


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


class _EndpointFailed(Exception):
    """This endpoint did not serve the request; the next one may. auth=True: TLS rejected us."""

    def __init__(self, message: str, auth: bool = False) -> None:
        super().__init__(message)
        self.auth = auth


class _TokenInvalid(Exception):
    """etcd no longer accepts our auth token: authenticate again and retry once."""


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


def _tls_rejection(exc: BaseException) -> str | None:
    """Why a TLS handshake failed over certificates (theirs or ours), or None for other failures."""
    e: BaseException | None = exc
    for _ in range(10):  # the __cause__/__context__ chain; bounded
        if e is None:
            break
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"server certificate not trusted ({e.verify_message}); check ca_file"
        if isinstance(e, ssl.SSLError) and any(w in str(e).upper() for w in _TLS_AUTH_WORDS):
            return f"TLS handshake rejected ({e.reason or e}): etcd does not accept our client certificate"
        e = e.__cause__ or e.__context__
    return None


async def _close(resp: httpx.Response | None) -> None:
    """Close a streamed response even while being cancelled (closing the socket is quick)."""
    if resp is not None:
        with trio.CancelScope(shield=True, deadline=trio.current_time() + 1):
            await resp.aclose()


def _raise_etcd_error(status: int, data: Any) -> None:
    """Turn a gateway error body ({"error", "code"} or, mid-stream, {"error": {...}}) into our exceptions."""
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):  # grpc-gateway streaming error
        message, code = str(err.get("message", err)), err.get("grpc_code")
    elif err is not None:
        message, code = str(err), data.get("code")
    else:
        raise _EndpointFailed(f"HTTP {status} without an etcd error body")
    if code in _RETRY_CODES or "no leader" in message:
        raise _EndpointFailed(message)
    if code == 16 or "invalid auth token" in message or "user name is empty" in message:
        raise _TokenInvalid(message)
    if code == 7 or "authentication failed" in message or "permission denied" in message:
        raise EtcdAuthError(message)
    if "requested lease not found" in message:
        raise LeaseLost(message)
    raise EtcdRequestError(message, code)


class EtcdClient:
    """A small etcd v3 client: leases, transactions, ranges and prefix watches."""

    def __init__(self, endpoints: Sequence[str], *, timeout: float = 0.5, ca_file: str | None = None,
                 cert_file: str | None = None, key_file: str | None = None, username: str | None = None,
                 password: str | None = None) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self._endpoints = tuple(e.rstrip("/") for e in endpoints)
        self._idx = 0
        self.timeout = timeout
        self._has_cert = cert_file is not None
        self._ssl: ssl.SSLContext | None = None
        if any(e.startswith("https:") for e in self._endpoints):
            self._ssl = ssl.create_default_context(cafile=ca_file)
            if cert_file:
                self._ssl.load_cert_chain(cert_file, key_file)
        self._username, self._password = username, password
        self._token: str | None = None
        self._http: httpx.AsyncClient | None = None

    @classmethod
    def from_config(cls, cfg: EtcdConfig) -> "EtcdClient":
        return cls(cfg.endpoints, timeout=cfg.request_timeout, ca_file=cfg.ca_file, cert_file=cfg.cert_file,
                   key_file=cfg.key_file, username=cfg.username, password=cfg.password)

    @property
    def endpoint(self) -> str:
        """The endpoint last used successfully (the first one before any call)."""
        return self._endpoints[self._idx]

    async def __aenter__(self) -> "EtcdClient":
        self._http = httpx.AsyncClient(verify=self._ssl or False, timeout=self.timeout, trust_env=False)
        try:
            if self._username is not None:
                await self._authenticate()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._http is not None:
            http, self._http = self._http, None
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 1):
                await http.aclose()

    # --- transport -----------------------------------------------------------------------------

    async def _each_endpoint(self, attempt: Callable[[str], Awaitable[T]]) -> T:
        """Run attempt(endpoint) on each endpoint in turn, each bounded by timeout; first success wins."""
        errors: list[str] = []
        auth_error: str | None = None
        n = len(self._endpoints)
        for i in range(n):
            idx = (self._idx + i) % n
            ep = self._endpoints[idx]
            with trio.move_on_after(self.timeout) as scope:
                try:
                    result = await attempt(ep)
                except _EndpointFailed as e:
                    errors.append(f"{ep}: {e}")
                    auth_error = auth_error or (f"{ep}: {e}" if e.auth else None)
                    continue
                self._idx = idx
                return result
            if scope.cancelled_caught:
                errors.append(f"{ep}: no answer within {self.timeout}s")
        if auth_error:
            raise EtcdAuthError(f"etcd refused the TLS connection: {auth_error}")
        raise EtcdUnavailable(f"no etcd endpoint answered: {'; '.join(errors)}")

    async def _authenticated(self, attempt: Callable[[str], Awaitable[T]]) -> T:
        """_each_endpoint, re-authenticating once if etcd rejects our token."""
        try:
            return await self._each_endpoint(attempt)
        except _TokenInvalid as e:
            if self._username is None:
                raise EtcdAuthError(f"etcd requires authentication and no username is configured ({e})") from None
        await self._authenticate()
        try:
            return await self._each_endpoint(attempt)
        except _TokenInvalid as e:
            raise EtcdAuthError(f"etcd rejected the token of user {self._username!r} ({e})") from None

    async def _authenticate(self) -> None:
        async def attempt(ep: str) -> dict[str, Any]:
            try:
                return await self._post(ep, "/v3/auth/authenticate",
                                        {"name": self._username, "password": self._password}, token=False)
            except EtcdRequestError as e:
                if "authentication is not enabled" in str(e):
                    return {}
                raise
            except (EtcdAuthError, _TokenInvalid) as e:  # etcd's answer, not a TLS failure
                raise EtcdAuthError(f"etcd rejected user {self._username!r}: authentication failed ({e})") from None

        self._token = (await self._each_endpoint(attempt)).get("token")

    def _headers(self, token: bool = True) -> dict[str, str]:
        return {"Authorization": self._token} if token and self._token else {}

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            raise RuntimeError("EtcdClient used outside 'async with'")
        return self._http
    async def _post(self, ep: str, path: str, body: dict[str, Any], token: bool = True) -> dict[str, Any]:
        """One POST to one endpoint: the decoded answer, or _EndpointFailed / an etcd error."""
        try:
            resp = await self._client().post(ep + path, json=body, headers=self._headers(token))
        except httpx.HTTPError as e:
            raise await self._transport_failure(ep, e) from e
        return self._decode(resp.status_code, resp.text)

    async def _transport_failure(self, ep: str, e: Exception) -> _EndpointFailed:
        """Describe a failed connection; certificate rejections are marked auth=True.

        With TLS 1.3 a server rejects the client certificate only after the handshake, and the reset
        caused by our already-sent request usually destroys its alert: so after a broken https
        connection, handshake once more without sending anything and read the server's verdict.
        """
        reason = _tls_rejection(e)
        if reason is None and ep.startswith("https:") and isinstance(e, (httpx.ReadError, httpx.RemoteProtocolError)):
            reason = await self._tls_probe(ep)
        if reason is not None:
            if not self._has_cert and "server certificate" not in reason:
                reason += "; no client certificate is configured (cert_file/key_file)"
            return _EndpointFailed(reason, auth=True)
        detail = str(e) or repr(e.__cause__)
        return _EndpointFailed(f"{type(e).__name__}: {detail}")

    async def _tls_probe(self, ep: str) -> str | None:
        url = httpx.URL(ep)
        try:
            stream = await trio.open_ssl_over_tcp_stream(url.host, url.port or 443, ssl_context=self._ssl)
            async with stream:
                with trio.move_on_after(self.timeout / 2):
                    await stream.receive_some()  # an accepted client hears nothing here
        except (OSError, trio.BrokenResourceError) as e:
            return _tls_rejection(e)
        return None

    @staticmethod
    def _decode(status: int, text: str) -> dict[str, Any]:
        try:
            data = json.loads(text)
        except ValueError:
            raise _EndpointFailed(f"HTTP {status}, not an etcd gateway answer: {text[:80]!r}") from None
        if status != 200 or (isinstance(data, dict) and "error" in data):
            _raise_etcd_error(status, data)
        if not isinstance(data, dict):
            raise _EndpointFailed(f"unexpected answer {text[:80]!r}")
        return data

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._authenticated(lambda ep: self._post(ep, path, body))

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
            raise _EndpointFailed("keepalive stream closed without an answer")

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
        k = _b64(key)
        data = await self._call("/v3/kv/txn", {
            "compare": [{"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}],
            "success": [{"request_put": {"key": k, "value": _b64(value), "lease": str(lease_id)}}],
            "failure": [{"request_range": {"key": k}}],
        })
        rev = int(data["header"]["revision"])
        if data.get("succeeded", False):
            return True, KeyValue(key, value, rev, rev, lease_id)
        kvs = data["responses"][0]["response_range"].get("kvs", [])
        if not kvs:  # cannot happen: the compare failed, so the key existed in this same txn
            raise EtcdRequestError(f"create {key!r}: compare failed but the key is absent")
        kv = _kv(kvs[0])
        return (lease_id != 0 and kv.lease == lease_id and kv.value == value), kv

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

    # --- watch ---------------------------------------------------------------------------------

    async def watch_prefix(self, prefix: str, start_revision: int, *,
                           progress_interval: float = 1.0) -> AsyncIterator[WatchBatch]:
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

        async def attempt(ep: str) -> tuple[httpx.Response, AsyncIterator[str]]:
            request = self._client().build_request("POST", ep + "/v3/watch", json=body, headers=self._headers(),
                                                   timeout=httpx.Timeout(self.timeout, read=None))
            r: httpx.Response | None = None
            try:
                r = await self._client().send(request, stream=True)
                lines = r.aiter_lines()
                if r.status_code != 200:
                    self._decode(r.status_code, (await r.aread()).decode(errors="replace"))
                if await self._watch_message(lines) is not None:  # expect "created" (or a cancellation)
                    raise _EndpointFailed("watch answered without confirming its creation")
                return r, lines
            except httpx.HTTPError as e:
                await _close(r)
                raise await self._transport_failure(ep, e) from e
            except BaseException:
                await _close(r)
                raise

        try:
            resp, lines = await self._authenticated(attempt)
            last = trio.current_time()  # when the last message arrived
            while True:
                # silence counts from the last message, not from this call (the consumer may be slow);
                # the floor lets a slow consumer read what is already buffered
                with trio.move_on_at(max(last + silence, trio.current_time() + self.timeout)) as scope:
                    try:
                        batch = await self._watch_message(lines)
                    except (httpx.HTTPError, _EndpointFailed, _TokenInvalid) as e:
                        raise EtcdUnavailable(f"watch on {self.endpoint} broke: {e}") from e
                if scope.cancelled_caught:
                    raise EtcdWatchIdle(f"watch on {self.endpoint}: no event or progress notification "
                                          f"for {trio.current_time() - last:.1f}s")
                last = trio.current_time()
                if batch is not None:
                    yield batch
        finally:
            await _close(resp)

    @staticmethod
    async def _watch_message(lines: AsyncIterator[str]) -> WatchBatch | None:
        """Read one watch message: a batch, or None for the "created" confirmation."""
        async for line in lines:
            if line.strip():
                break
        else:
            raise _EndpointFailed("watch stream closed by etcd")
        try:
            msg = json.loads(line)
        except ValueError:
            raise _EndpointFailed(f"not a watch message: {line[:80]!r}") from None
        if "error" in msg:
            _raise_etcd_error(200, msg)
        r = msg.get("result", {})
        if r.get("canceled"):
            if int(r.get("compact_revision", 0)):
                raise EtcdCompacted(f"watch start revision compacted (etcd compacted up to {r['compact_revision']})")
            _raise_etcd_error(200, {"error": r.get("cancel_reason", "watch canceled by etcd")})
        if r.get("created"):
            return None
        events = tuple(WatchEvent(e.get("type", "PUT"), _kv(e["kv"])) for e in r.get("events", []))
        revision = events[-1].kv.mod_revision if events else int(r["header"]["revision"])
        return WatchBatch(revision, events)

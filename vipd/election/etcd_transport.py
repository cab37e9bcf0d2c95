"""The transport under vipd.election.etcd's client: endpoint choice, TLS, auth tokens, decoding.

Every call goes to the last endpoint that worked and is hedged to the others when that one fails or
is slow (vipd.election.endpoints); each attempt is bounded by `timeout` with a trio cancel scope, so
a blackholed endpoint cannot hang a call. Every request carries gRPC metadata `hasleader` (the
gateway passes `Grpc-Metadata-*` headers on): a member that knows no leader answers "no leader" at
once instead of holding the request for etcd's 7 s request timeout, and cancels a watch when it
loses its leader. A certificate rejection is reported as EtcdAuthError, an invalid token is
renewed once.
"""

from __future__ import annotations

import json
import ssl
from typing import Any, Awaitable, Callable, Sequence, TypeVar

import httpx
import trio

from vipd.election.endpoints import AllFailed, EndpointFailed, EndpointPool, hedged
from vipd.hostchecks import tls_context
from vipd.errors import EtcdAuthError, EtcdRequestError, EtcdUnavailable, LeaseLost

__all__ = ["EndpointFailed", "EtcdTransport", "TokenInvalid", "close_response", "raise_etcd_error"]

T = TypeVar("T")
_S = TypeVar("_S", bound="EtcdTransport")
_RETRY_CODES = {4, 14}  # gRPC DeadlineExceeded, Unavailable: this member cannot serve, try the next
_TLS_AUTH_WORDS = ("CERTIFICATE", "UNKNOWN_CA", "BAD_CERT", "HANDSHAKE_FAILURE", "ACCESS_DENIED")
_REQUIRE_LEADER = {"Grpc-Metadata-Hasleader": "true"}  # etcd's rpctypes.MetadataRequireLeaderKey


class TokenInvalid(Exception):
    """etcd no longer accepts our auth token: authenticate again and retry once."""


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


def _root_cause(exc: BaseException, ep: str) -> str:
    """The deepest useful reason in an exception chain (httpx wraps trio wraps ssl/OSError), with a
    hint for the usual mistakes: https:// to a plain-http member, and the reverse."""
    e: BaseException | None = exc
    last = exc
    for _ in range(10):  # bounded walk of __cause__/__context__
        if e is None:
            break
        if isinstance(e, ssl.SSLError) and "WRONG_VERSION_NUMBER" in str(e).upper():
            return f"{ep} does not speak TLS (is it a plain http:// member?)"
        if isinstance(e, ssl.SSLError) and "UNEXPECTED_EOF" in str(e).upper():
            return f"{ep} closed the connection in the TLS handshake: it does not speak TLS (is it a plain " \
                   "http:// member?) or drops this client"
        if ep.startswith("https:") and isinstance(exc, httpx.ConnectError) and isinstance(e, ConnectionResetError):
            # (a plain-http member answers a ClientHello with a 400 or a reset, as its timing goes)
            return f"{ep} reset the connection in the TLS handshake: it does not speak TLS (is it a plain " \
                   "http:// member?) or drops this client"
        if str(e):
            last = e
        group = getattr(e, "exceptions", None)  # trio's "all attempts to connect ... failed": the first why
        e = group[0] if group else (e.__cause__ or e.__context__)
    text = str(last) or repr(last)
    if ep.startswith("http:") and isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)):  # closed or reset
        text += " (a TLS member closes plain-HTTP connections: if it has TLS, use https:// endpoints)"
    return text


async def close_response(resp: httpx.Response | None) -> None:
    """Close a streamed response even while being cancelled (closing the socket is quick)."""
    if resp is not None:
        with trio.CancelScope(shield=True, deadline=trio.current_time() + 1):
            await resp.aclose()


def raise_etcd_error(status: int, data: Any) -> None:
    """Turn a gateway error body ({"error", "code"} or, mid-stream, {"error": {...}}) into our exceptions."""
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):  # grpc-gateway streaming error
        message, code = str(err.get("message", err)), err.get("grpc_code")
    elif err is not None:
        message, code = str(err), data.get("code")
    else:
        raise EndpointFailed(f"HTTP {status} without an etcd error body")
    if code in _RETRY_CODES or "no leader" in message:
        raise EndpointFailed(message)
    if code == 16 or "invalid auth token" in message or "user name is empty" in message:
        raise TokenInvalid(message)
    if code == 7 or "authentication failed" in message or "permission denied" in message:
        raise EtcdAuthError(message)
    if "requested lease not found" in message:
        raise LeaseLost(message)
    raise EtcdRequestError(message, code)


class EtcdTransport:
    """Endpoints, TLS and authentication, and one decoded POST; the base of EtcdClient."""

    def __init__(self, endpoints: Sequence[str], *, timeout: float = 0.5, ca_file: str | None = None,
                 cert_file: str | None = None, key_file: str | None = None, username: str | None = None,
                 password: str | None = None) -> None:
        self._pool = EndpointPool([e.rstrip("/") for e in endpoints])
        self._endpoints = self._pool.endpoints
        self.timeout = timeout
        self.hedge_after = timeout / 2
        self._has_cert = cert_file is not None
        self._ssl: ssl.SSLContext | None = None
        if any(e.startswith("https:") for e in self._endpoints):  # ConfigError naming the file, not a traceback
            self._ssl = tls_context(ca_file, cert_file, key_file, "etcd")
        self._username, self._password = username, password
        self._token: str | None = None
        self._http: httpx.AsyncClient | None = None

    @property
    def endpoint(self) -> str:
        """The endpoint last used successfully (the first one before any call)."""
        return self._pool.preferred

    async def __aenter__(self: _S) -> _S:
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

    # --- one request, hedged over the endpoints ----------------------------------------------

    async def _each_endpoint(self, attempt: Callable[[str], Awaitable[T]],
                             discard: Callable[[T], Awaitable[None]] | None = None) -> T:
        """attempt(endpoint) on the preferred endpoint, hedged to the others (first success wins)."""
        try:
            return await hedged(self._pool, attempt, timeout=self.timeout, hedge_after=self.hedge_after,
                                discard=discard)
        except AllFailed as e:
            if e.auth:
                raise EtcdAuthError(f"etcd refused the TLS connection: {e.auth}") from None
            raise EtcdUnavailable(f"no etcd endpoint answered: {e}") from None

    def _endpoint_broke(self, ep: str) -> None:
        """A stream on ep broke (watch): ask the others first for a while."""
        self._pool.failed(ep, trio.current_time())

    async def _authenticated(self, attempt: Callable[[str], Awaitable[T]],
                             discard: Callable[[T], Awaitable[None]] | None = None) -> T:
        """_each_endpoint, re-authenticating once if etcd rejects our token."""
        try:
            return await self._each_endpoint(attempt, discard)
        except TokenInvalid as e:
            if self._username is None:
                raise EtcdAuthError(f"etcd requires authentication and no username is configured ({e})") from None
        await self._authenticate()
        try:
            return await self._each_endpoint(attempt, discard)
        except TokenInvalid as e:
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
            except (EtcdAuthError, TokenInvalid) as e:  # etcd's answer, not a TLS failure
                raise EtcdAuthError(f"etcd rejected user {self._username!r}: authentication failed ({e})") from None

        self._token = (await self._each_endpoint(attempt)).get("token")

    def _headers(self, token: bool = True) -> dict[str, str]:
        return {**_REQUIRE_LEADER, "Authorization": self._token} if token and self._token else dict(_REQUIRE_LEADER)

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            raise RuntimeError("EtcdClient used outside 'async with'")
        return self._http

    async def _post(self, ep: str, path: str, body: dict[str, Any], token: bool = True) -> dict[str, Any]:
        """One POST to one endpoint: the decoded answer, or EndpointFailed / an etcd error."""
        try:
            resp = await self._client().post(ep + path, json=body, headers=self._headers(token))
        except httpx.HTTPError as e:
            raise await self._transport_failure(ep, e) from e
        return self._decode(resp.status_code, resp.text)

    async def _transport_failure(self, ep: str, e: Exception) -> EndpointFailed:
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
            return EndpointFailed(reason, auth=True)
        return EndpointFailed(f"{type(e).__name__}: {_root_cause(e, ep)}")

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
            raise EndpointFailed(f"HTTP {status}, not an etcd gateway answer: {text[:80]!r}") from None
        if status != 200 or (isinstance(data, dict) and "error" in data):
            raise_etcd_error(status, data)
        if not isinstance(data, dict):
            raise EndpointFailed(f"unexpected answer {text[:80]!r}")
        return data

    async def get_json(self, path: str) -> dict[str, Any]:
        """GET a JSON document that etcd serves outside the v3 gateway (/version, /debug/vars), from the
        endpoints in turn. EtcdUnavailable when none answers with JSON."""

        async def attempt(ep: str) -> dict[str, Any]:
            try:
                resp = await self._client().get(ep + path, headers=self._headers())
            except httpx.HTTPError as e:
                raise await self._transport_failure(ep, e) from e
            try:
                data = json.loads(resp.text)
            except ValueError:
                raise EndpointFailed(f"HTTP {resp.status_code}, not JSON: {resp.text[:80]!r}") from None
            if resp.status_code != 200 or not isinstance(data, dict):
                raise EndpointFailed(f"HTTP {resp.status_code}: {resp.text[:80]!r}")
            return data

        return await self._each_endpoint(attempt)

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._authenticated(lambda ep: self._post(ep, path, body))

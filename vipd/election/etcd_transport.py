"""The transport under vipd.election.etcd's client: endpoints in turn, TLS, auth tokens, decoding.

Every call tries the endpoints in turn, starting with the last one that worked; each attempt is
bounded by `timeout` with a trio cancel scope, so a blackholed endpoint cannot hang a call. A
certificate rejection is reported as EtcdAuthError, an invalid token is renewed once.
"""

from __future__ import annotations

import json
import ssl
from typing import Any, Awaitable, Callable, Sequence, TypeVar

import httpx
import trio

from vipd.errors import EtcdAuthError, EtcdRequestError, EtcdUnavailable, LeaseLost

T = TypeVar("T")
_S = TypeVar("_S", bound="EtcdTransport")
_RETRY_CODES = {4, 14}  # gRPC DeadlineExceeded, Unavailable: this member cannot serve, try the next
_TLS_AUTH_WORDS = ("CERTIFICATE", "UNKNOWN_CA", "BAD_CERT", "HANDSHAKE_FAILURE", "ACCESS_DENIED")


class EndpointFailed(Exception):
    """This endpoint did not serve the request; the next one may. auth=True: TLS rejected us."""

    def __init__(self, message: str, auth: bool = False) -> None:
        super().__init__(message)
        self.auth = auth


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

    @property
    def endpoint(self) -> str:
        """The endpoint last used successfully (the first one before any call)."""
        return self._endpoints[self._idx]

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

    # --- one request, on each endpoint in turn ------------------------------------------------

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
                except EndpointFailed as e:
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
        except TokenInvalid as e:
            if self._username is None:
                raise EtcdAuthError(f"etcd requires authentication and no username is configured ({e})") from None
        await self._authenticate()
        try:
            return await self._each_endpoint(attempt)
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
        return {"Authorization": self._token} if token and self._token else {}

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
        detail = str(e) or repr(e.__cause__)
        return EndpointFailed(f"{type(e).__name__}: {detail}")

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

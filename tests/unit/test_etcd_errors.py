"""How a failed etcd request is named (vipd/election/etcd_transport.py `_root_cause`): the usual
scheme mistakes get their hint whichever way the kernel reports them."""

from __future__ import annotations

import httpx

from vipd.election.etcd_transport import _root_cause


def connect_error(cause: BaseException) -> httpx.ConnectError:
    try:
        try:
            raise cause
        except BaseException as inner:
            raise httpx.ConnectError(str(inner)) from inner
    except httpx.ConnectError as e:
        return e


def test_a_reset_in_the_tls_handshake_is_named_as_a_plain_http_member() -> None:
    """A plain-http member sometimes resets a ClientHello instead of answering it (CI saw both)."""
    why = _root_cause(connect_error(ConnectionResetError(104, "Connection reset by peer")), "https://10.0.0.1:2379")
    assert "does not speak TLS (is it a plain http:// member?)" in why


def test_a_reset_of_a_plain_http_connect_keeps_its_own_words() -> None:
    why = _root_cause(connect_error(ConnectionResetError(104, "Connection reset by peer")), "http://10.0.0.1:2379")
    assert "Connection reset by peer" in why and "does not speak TLS" not in why

"""Running one health check: a TCP connect, an HTTP(S) GET, a command, an interface's carrier.

:func:`run_check` runs a spec once, bounded by its timeout, and raises :class:`CheckFailed` with a
one-line reason when it fails; a check that outlives its timeout is cancelled and counts as failed
(a command's whole process group is killed).
"""

from __future__ import annotations

import os
import ssl
import sys
from typing import TYPE_CHECKING, Any

import httpx
import trio

from vipd.errors import DataplaneError, VipdError
from vipd.health.spec import CarrierCheck, CheckSpec, CommandCheck, HttpCheck, TcpCheck
from vipd.procs import run_command

if sys.version_info < (3, 11):  # pragma: no cover - trio depends on exceptiongroup there
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:  # keep pyroute2 out of config parsing
    from vipd.dataplane.netlink import Netlink


class CheckFailed(VipdError):
    """One run of a health check failed (refused, wrong status, exit status, no carrier, timeout)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ------------------------------------------------------------------------------- probes

_ssl_cache: dict[tuple[Any, ...], ssl.SSLContext] = {}


def _mtime(path: str | None) -> float | None:
    try:
        return os.stat(path).st_mtime if path else None
    except OSError:
        return None


def _build_ssl_context(spec: HttpCheck) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=spec.ca_file)
    if spec.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if spec.cert_file:
        ctx.load_cert_chain(spec.cert_file, spec.key_file)
    return ctx


async def ssl_context(spec: HttpCheck) -> ssl.SSLContext:
    """Built once per (files, their mtimes), so a rotated certificate is picked up; built in a
    worker thread (loading the system CA bundle takes ~30 ms)."""
    key = (spec.ca_file, spec.cert_file, spec.key_file, spec.insecure,
           _mtime(spec.ca_file), _mtime(spec.cert_file), _mtime(spec.key_file))
    ctx = _ssl_cache.get(key)
    if ctx is None:
        try:
            ctx = await trio.to_thread.run_sync(_build_ssl_context, spec)
        except (OSError, ssl.SSLError) as e:
            raise CheckFailed(f"TLS setup: {e}") from None
        if len(_ssl_cache) > 64:
            _ssl_cache.clear()
        _ssl_cache[key] = ctx
    return ctx


def _os_error_text(e: OSError) -> str:
    """trio's 'all attempts to connect failed' keeps the real errors in its cause: show them."""
    inner = e.__cause__
    if isinstance(inner, BaseExceptionGroup):
        texts = dict.fromkeys(x.strerror or str(x) for x in inner.exceptions if isinstance(x, OSError))
        if texts:
            return "; ".join(texts)
    return e.strerror or str(e)


async def _tcp(spec: TcpCheck, nl: Netlink | None) -> None:
    try:
        stream = await trio.open_tcp_stream(spec.host, spec.port)
    except OSError as e:
        raise CheckFailed(f"connect {spec.host}:{spec.port}: {_os_error_text(e)}") from None
    await stream.aclose()


def _http_error(e: Exception) -> str:
    cause: BaseException | None = e
    while cause is not None:  # the useful part is deep inside: a TLS verdict, or the OS errors
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"certificate not trusted ({cause.verify_message})"
        if isinstance(cause, OSError) and isinstance(cause.__cause__, BaseExceptionGroup):
            return _os_error_text(cause)
        cause = cause.__cause__ or cause.__context__
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


async def _http(spec: HttpCheck, nl: Netlink | None) -> None:
    verify = await ssl_context(spec)  # cached; unused for http:, but spares httpx building one per run
    try:
        async with httpx.AsyncClient(verify=verify, trust_env=False, timeout=None, follow_redirects=False) as client:
            async with client.stream("GET", spec.url, headers={"user-agent": "vipd-health"}) as resp:
                status = resp.status_code  # the body is not read: a large or endless one is fine
    except (httpx.HTTPError, OSError, ssl.SSLError) as e:
        raise CheckFailed(f"GET {spec.url}: {_http_error(e)}") from None
    if status != spec.expect_status:
        raise CheckFailed(f"GET {spec.url}: status {status}, expected {spec.expect_status}")


async def _command(spec: CommandCheck, nl: Netlink | None) -> None:
    try:
        res = await run_command(spec.argv, timeout=spec.timeout, keep=512)
    except OSError as e:
        raise CheckFailed(f"cannot run {spec.argv[0]}: {e.strerror or e}") from None
    if res.timed_out:
        raise CheckFailed(f"timed out after {spec.timeout:g}s (killed)")
    if res.returncode != 0:
        last = res.output.strip().splitlines()[-1:] or [""]
        how = f"killed by signal {-res.returncode}" if res.returncode and res.returncode < 0 else \
            f"exit status {res.returncode}"
        raise CheckFailed(f"{how}{': ' + last[0][:200] if last[0] else ''}")


async def _carrier(spec: CarrierCheck, nl: Netlink | None) -> None:
    if nl is not None:
        try:
            link = await nl.link(spec.interface)
        except DataplaneError as e:
            raise CheckFailed(str(e)) from None
        if not link.up:
            raise CheckFailed(f"{spec.interface}: down or no carrier")
        return
    try:  # a sysfs read does not block; EINVAL means administratively down
        with open(f"/sys/class/net/{spec.interface}/carrier") as f:
            carrier = f.read().strip()
    except FileNotFoundError:
        raise CheckFailed(f"no interface {spec.interface!r}") from None
    except OSError as e:
        raise CheckFailed(f"{spec.interface}: administratively down ({e.strerror})") from None
    if carrier != "1":
        raise CheckFailed(f"{spec.interface}: no carrier")


_RUN = {TcpCheck: _tcp, HttpCheck: _http, CommandCheck: _command, CarrierCheck: _carrier}


async def run_check(spec: CheckSpec, *, nl: Netlink | None = None) -> None:
    """Run ``spec`` once, bounded by ``spec.timeout``; CheckFailed(reason) if it fails.

    ``nl``: for carrier checks, ask this Netlink (its netns) instead of reading /sys.
    """
    try:
        with trio.fail_after(spec.timeout):
            await _RUN[type(spec)](spec, nl)  # type: ignore[operator]
    except trio.TooSlowError:
        raise CheckFailed(f"timed out after {spec.timeout:g}s") from None

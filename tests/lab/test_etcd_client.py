"""EtcdClient against a real etcd (fast timing: lease TTL minimum 1 s, progress every second)."""

from __future__ import annotations

import socket
import statistics
from contextlib import aclosing
from typing import Any, Callable

import pytest
import trio

from tests.etcd_fixtures import ETCD_PASSWORD, ETCD_USER
from vipd.config import EtcdConfig
from vipd.election.etcd import EtcdClient, KeyValue, WatchBatch
from vipd.errors import EtcdAuthError, EtcdCompacted, EtcdUnavailable, LeaseLost
from vipd.lab.certs import TlsFiles
from vipd.lab.etcd import PROGRESS_NOTIFY_INTERVAL, EtcdServer

TIMEOUT = 0.3


def client(server: EtcdServer, **kwargs: Any) -> EtcdClient:
    return EtcdClient([server.endpoint], timeout=TIMEOUT, **kwargs)


async def next_batch(batches: Any, timeout: float = 3.0) -> WatchBatch:
    with trio.fail_after(timeout):
        return await batches.__anext__()


async def wait_deleted(c: EtcdClient, key: str, start_revision: int, timeout: float) -> float:
    """Wait (via a watch, not polling) until key is deleted; returns the time waited."""
    t0 = trio.current_time()
    async with aclosing(c.watch_prefix(key, start_revision)) as batches:
        while True:
            batch = await next_batch(batches, timeout)
            if any(e.type == "DELETE" and e.kv.key == key for e in batch.events):
                return trio.current_time() - t0


# --- leases ---------------------------------------------------------------------------------


async def test_grant_returns_the_ttl_etcd_granted(etcd_server: EtcdServer,
                                                  etcd_factory: Callable[..., EtcdServer]) -> None:
    async with client(etcd_server) as c:
        assert (await c.grant(1))[1] == 1  # fast timing: minimum ceil(1.5 * 500 ms) = 1 s
        assert (await c.grant(7))[1] == 7
    # Default timing (heartbeat 100 ms, election 1 s): etcd raises 1 s to ceil(1.5 * 1 s) = 2 s.
    async with client(etcd_factory(fast=False)) as c:
        assert (await c.grant(1))[1] == 2


async def test_keepalive_keeps_a_key_past_its_ttl(etcd_server: EtcdServer) -> None:
    async with client(etcd_server) as c:
        lease, ttl = await c.grant(1)
        await c.put("/t/alive", "x", lease)
        round_trips = []
        end = trio.current_time() + 2.5
        while trio.current_time() < end:
            t0 = trio.current_time()
            assert await c.keepalive(lease) == ttl
            round_trips.append(trio.current_time() - t0)
            await trio.sleep(0.25)
        assert (await c.get("/t/alive")) is not None
        assert 0 <= await c.time_to_live(lease) <= ttl  # whole seconds, rounded down
        assert statistics.median(round_trips) < 0.05  # ~1-2 ms measured on loopback


async def test_lease_not_kept_alive_expires_with_its_keys(etcd_server: EtcdServer) -> None:
    async with client(etcd_server) as c:
        lease, _ = await c.grant(1)
        rev = await c.put("/t/expiring", "x", lease)
        waited = await wait_deleted(c, "/t/expiring", rev + 1, timeout=4.0)
        assert 0.5 < waited < 3.0  # ~1-1.5 s with fast timing
        assert await c.get("/t/expiring") is None
        assert await c.time_to_live(lease) == -1
        with pytest.raises(LeaseLost):
            await c.keepalive(lease)


async def test_revoke_deletes_keys_and_is_idempotent(etcd_server: EtcdServer) -> None:
    async with client(etcd_server) as c:
        lease, _ = await c.grant(5)
        await c.put("/t/a", "1", lease)
        await c.put("/t/b", "2", lease)
        await c.revoke(lease)
        assert (await c.get_prefix("/t/"))[0] == []
        assert await c.time_to_live(lease) == -1
        await c.revoke(lease)  # already gone: not an error
        with pytest.raises(LeaseLost):
            await c.keepalive(lease)
        with pytest.raises(LeaseLost):
            await c.put("/t/a", "1", lease)
        with pytest.raises(LeaseLost):
            await c.create("/t/a", "1", lease)


# --- keys -----------------------------------------------------------------------------------


async def test_create_is_exclusive_and_create_revision_is_the_epoch(etcd_server: EtcdServer) -> None:
    async with client(etcd_server) as a, client(etcd_server) as b:
        la, _ = await a.grant(5)
        lb, _ = await b.grant(5)
        ok, mine = await a.create("/t/owner", "node-a", la)
        assert ok and mine.value == "node-a" and mine.lease == la
        assert mine.create_revision == mine.mod_revision > 0
        ok, theirs = await b.create("/t/owner", "node-b", lb)
        assert not ok
        assert theirs == KeyValue("/t/owner", "node-a", mine.create_revision, mine.mod_revision, la)
        assert await a.get("/t/owner") == theirs
        # A retry by the holder (its first answer lost) finds its own key and reports it as ours.
        assert await a.create("/t/owner", "node-a", la) == (True, theirs)
        # Once the holder's lease is gone, the next creator wins with a newer epoch.
        await a.revoke(la)
        ok, new = await b.create("/t/owner", "node-b", lb)
        assert ok and new.create_revision > mine.create_revision


async def test_delete_if_never_deletes_someone_elses_key(etcd_server: EtcdServer) -> None:
    async with client(etcd_server) as c:
        lease, _ = await c.grant(5)
        ok, kv = await c.create("/t/owner", "node-a", lease)
        assert ok
        assert not await c.delete_if("/t/owner", "node-b", kv.create_revision)
        assert not await c.delete_if("/t/owner", "node-a", kv.create_revision + 100)
        assert await c.get("/t/owner") == kv
        assert await c.delete_if("/t/owner", "node-a", kv.create_revision)
        assert await c.get("/t/owner") is None
        assert not await c.delete_if("/t/owner", "node-a", kv.create_revision)


async def test_get_prefix_and_put(etcd_server: EtcdServer) -> None:
    async with client(etcd_server) as c:
        await c.put("/p/a", "1")
        await c.put("/p/b/c", "2")
        rev = await c.put("/p0", "outside")  # next key after the prefix "/p/" is "/p0"
        await c.put("/p", "outside")
        kvs, at = await c.get_prefix("/p/")
        assert [(kv.key, kv.value) for kv in kvs] == [("/p/a", "1"), ("/p/b/c", "2")]
        assert at == rev + 1
        assert await c.get("/nope") is None
        assert (await c.get("/p/a")).value == "1"  # type: ignore[union-attr]


# --- watch ----------------------------------------------------------------------------------


async def test_watch_delivers_puts_and_deletes_in_order_then_progress(etcd_server: EtcdServer) -> None:
    async with client(etcd_server) as c:
        first = await c.put("/w/a", "1")  # before the watch starts: replayed from start_revision
        await c.put("/elsewhere", "x")
        async with aclosing(c.watch_prefix("/w/", first)) as batches:
            await c.put("/w/b", "2")
            await c.put("/w/a", "3")
            assert await c.delete_if("/w/a", "3", first)
            seen = []
            while len(seen) < 4:
                batch = await next_batch(batches)
                assert batch.events and batch.revision == batch.events[-1].kv.mod_revision
                seen += [(e.type, e.kv.key, e.kv.value) for e in batch.events]
            assert seen == [("PUT", "/w/a", "1"), ("PUT", "/w/b", "2"), ("PUT", "/w/a", "3"), ("DELETE", "/w/a", "")]
            last = batch.revision
            # A quiet stream gets progress notifications (needs etcd's progress-notify flag).
            progress = await next_batch(batches, 3 * PROGRESS_NOTIFY_INTERVAL)
            assert progress.events == () and progress.revision == last


async def test_watch_compacted_revision_raises(etcd_server: EtcdServer) -> None:
    async with client(etcd_server) as c:
        for i in range(5):
            rev = await c.put("/w/k", str(i))
        etcd_server.request("/v3/kv/compaction", {"revision": str(rev), "physical": True})
        with pytest.raises(EtcdCompacted):
            async with aclosing(c.watch_prefix("/w/", rev - 2)) as batches:
                await next_batch(batches)


# --- faults ---------------------------------------------------------------------------------


async def test_dead_etcd_raises_unavailable_promptly(etcd_server: EtcdServer) -> None:
    async with client(etcd_server) as c:
        rev = await c.put("/w/a", "1")
        async with aclosing(c.watch_prefix("/w/", rev)) as batches:
            assert (await next_batch(batches)).revision == rev
            etcd_server.kill()
            with trio.fail_after(1), pytest.raises(EtcdUnavailable):
                await batches.__anext__()
        for call in (c.get("/w/a"), c.grant(1), c.keepalive(1), c.put("/w/a", "2")):
            with trio.fail_after(TIMEOUT + 0.2), pytest.raises(EtcdUnavailable):
                await call
        with pytest.raises(EtcdUnavailable):
            async with aclosing(c.watch_prefix("/w/", 1)) as batches:
                await batches.__anext__()


async def test_hung_etcd_times_out_calls_and_watch(etcd_server: EtcdServer) -> None:
    async with client(etcd_server) as c:
        rev = await c.put("/w/a", "1")
        async with aclosing(c.watch_prefix("/w/", rev)) as batches:
            assert (await next_batch(batches)).revision == rev  # the stream opens on first iteration
            etcd_server.pause()  # SIGSTOP: connections are accepted by the kernel, nothing answers
            t0 = trio.current_time()
            with trio.fail_after(TIMEOUT + 0.2), pytest.raises(EtcdUnavailable, match="no answer within"):
                await c.get("/w/a")
            with pytest.raises(EtcdUnavailable, match="no event or progress"):
                with trio.fail_after(5):
                    await batches.__anext__()
            waited = trio.current_time() - t0
            assert 3 * PROGRESS_NOTIFY_INTERVAL <= waited <= 3 * PROGRESS_NOTIFY_INTERVAL + TIMEOUT + 0.3
        etcd_server.resume()
        assert (await c.get("/w/a")).value == "1"  # type: ignore[union-attr]


async def test_cancelled_call_returns_promptly(etcd_server: EtcdServer) -> None:
    async with client(etcd_server) as c:
        await c.put("/w/a", "1")
        etcd_server.pause()
        t0 = trio.current_time()
        with trio.move_on_after(0.05):
            await c.get("/w/a")
        with trio.move_on_after(0.05):
            async with aclosing(c.watch_prefix("/w/", 1)) as batches:
                await batches.__anext__()
        assert trio.current_time() - t0 < 0.2
        etcd_server.resume()


async def test_second_endpoint_used_when_first_is_dead_or_blackholed(etcd_server: EtcdServer) -> None:
    with socket.socket() as dead, socket.socket() as hole:
        dead.bind(("127.0.0.1", 0))  # bound, not listening: connection refused
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)  # the kernel accepts connections nobody serves: requests time out
        for sock, first_call_max in ((dead, 0.1), (hole, TIMEOUT + 0.1)):
            bad = f"http://127.0.0.1:{sock.getsockname()[1]}"
            async with EtcdClient([bad, etcd_server.endpoint], timeout=TIMEOUT) as c:
                assert c.endpoint == bad
                t0 = trio.current_time()
                await c.put("/e/k", "v")
                assert trio.current_time() - t0 < first_call_max
                assert c.endpoint == etcd_server.endpoint
                t0 = trio.current_time()
                assert (await c.get("/e/k")).value == "v"  # type: ignore[union-attr]
                assert trio.current_time() - t0 < 0.05  # sticks to the endpoint that worked
        async with EtcdClient([f"http://127.0.0.1:{dead.getsockname()[1]}"], timeout=TIMEOUT) as c:
            with pytest.raises(EtcdUnavailable, match="127.0.0.1"):
                await c.get("/e/k")


# --- TLS and auth ---------------------------------------------------------------------------


def tls_kwargs(tls: TlsFiles, *, good_cert: bool = True, cert: bool = True, ca: str | None = None) -> dict[str, str]:
    kw = {"ca_file": ca or str(tls.ca)}
    if cert:
        kw["cert_file"] = str(tls.client_cert if good_cert else tls.bad_client_cert)
        kw["key_file"] = str(tls.client_key if good_cert else tls.bad_client_key)
    return kw


async def test_tls_client_certificates(etcd_tls: EtcdServer, tls_files: TlsFiles) -> None:
    async with client(etcd_tls, **tls_kwargs(tls_files)) as c:
        assert c.endpoint.startswith("https://")
        await c.put("/tls/k", "v")
        assert (await c.get("/tls/k")).value == "v"  # type: ignore[union-attr]
    cases = {
        "certificate from another CA": (tls_kwargs(tls_files, good_cert=False), "client certificate"),
        "no client certificate": (tls_kwargs(tls_files, cert=False), "no client certificate is configured"),
        "server not trusted": (tls_kwargs(tls_files, ca=str(tls_files.other_ca)), "server certificate not trusted"),
    }
    for name, (kw, message) in cases.items():
        async with client(etcd_tls, **kw) as c:
            with pytest.raises(EtcdAuthError, match=message):
                await c.get("/tls/k")
    etcd_tls.stop()
    async with client(etcd_tls, **tls_kwargs(tls_files)) as c:
        with pytest.raises(EtcdUnavailable):  # connection refused is not an auth problem
            await c.get("/tls/k")


async def test_auth_password(etcd_auth: EtcdServer) -> None:
    async with client(etcd_auth, username=ETCD_USER, password=ETCD_PASSWORD) as c:
        await c.put("/auth/k", "v")
        etcd_auth.restart()  # simple tokens live in memory: ours is now invalid
        assert (await c.get("/auth/k")).value == "v"  # type: ignore[union-attr]  # re-authenticated
        async with aclosing(c.watch_prefix("/auth/", 1)) as batches:
            assert (await next_batch(batches)).events[0].kv.key == "/auth/k"
    with pytest.raises(EtcdAuthError, match=f"rejected user '{ETCD_USER}'"):
        async with client(etcd_auth, username=ETCD_USER, password="wrong"):
            pass
    async with client(etcd_auth) as c:
        with pytest.raises(EtcdAuthError, match="no username"):
            await c.get("/auth/k")


async def test_from_config(etcd_server: EtcdServer) -> None:
    cfg = EtcdConfig(endpoints=(etcd_server.endpoint,), request_timeout=0.25)
    c = EtcdClient.from_config(cfg)
    assert c.timeout == 0.25 and c.endpoint == etcd_server.endpoint
    async with c:
        await c.put("/cfg", "1")
    etcd_auth_cfg = EtcdConfig(endpoints=(etcd_server.endpoint,), username="u", password="p")
    assert EtcdClient.from_config(etcd_auth_cfg)._username == "u"


async def test_scheme_mismatch_is_named(etcd_server: EtcdServer, etcd_tls: EtcdServer, tls_files: TlsFiles) -> None:
    """https:// to a plain-http member, and http:// to a TLS member: the error says which (it used to
    say only ConnectError(BrokenResourceError()))."""
    plain_as_https = etcd_server.endpoint.replace("http://", "https://")
    async with EtcdClient([plain_as_https], timeout=1.0, ca_file=str(tls_files.ca)) as c:
        with pytest.raises(EtcdUnavailable, match=r"does not speak TLS \(is it a plain http:// member\?\)"):
            await c.get("/k")
    tls_as_http = etcd_tls.endpoint.replace("https://", "http://")
    async with EtcdClient([tls_as_http], timeout=1.0) as c:
        with pytest.raises(EtcdUnavailable, match="if it has TLS, use https:// endpoints"):
            await c.get("/k")

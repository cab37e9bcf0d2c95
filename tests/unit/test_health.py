"""Health checks: hysteresis (exhaustively), each check type against real loopback servers and real
processes, the monitor's concurrency (a hung check never delays another), config parsing."""

from __future__ import annotations

import functools
import itertools
import socket
import ssl
from pathlib import Path
from typing import AsyncIterator, Iterator

import pytest
import trio

from vipd.dataplane.netlink import Netlink
from vipd.errors import ConfigError
from vipd.health import (CarrierCheck, CheckFailed, CheckSpec, CommandCheck, HealthMonitor, HttpCheck, Hysteresis,
                         TcpCheck, check_host, check_name, parse_check, run_check)
from vipd.lab.certs import TlsFiles, make_tls

# ------------------------------------------------------------------------------- hysteresis


def reference(rise: int, fall: int, initial: bool | None, seq: tuple[bool, ...]) -> list[bool | None]:
    """The definition: the state flips to X once the last k observations since the previous flip are
    all X (k = rise for healthy, fall for unhealthy) and X differs from the state."""
    state, since_flip, out = initial, [], []
    for ok in seq:
        since_flip.append(ok)
        k = rise if ok else fall
        if ok is not state and len(since_flip) >= k and all(x is ok for x in since_flip[-k:]):
            state, since_flip = ok, []
            out.append(ok)
        else:
            out.append(None)
    return out


def test_hysteresis_exhaustive() -> None:
    for rise, fall, initial in itertools.product(range(1, 5), range(1, 5), (False, True, None)):
        for n in range(1, 11):
            for seq in itertools.product((False, True), repeat=n):
                h = Hysteresis(rise, fall, initial)
                got = [h.observe(ok) for ok in seq]
                assert got == reference(rise, fall, initial, seq), (rise, fall, initial, seq)


def test_hysteresis_examples() -> None:
    h = Hysteresis(rise=2, fall=3)  # starts unhealthy
    assert [h.observe(x) for x in (True, False, True, True)] == [None, None, None, True]
    assert [h.observe(x) for x in (False, False, True, False, False, False)] == [None] * 5 + [False]
    u = Hysteresis(rise=2, fall=2, initial=None)  # unknown: whichever run completes first
    assert [u.observe(x) for x in (True, False, False)] == [None, None, False]
    one = Hysteresis(1, 1, initial=True)
    assert [one.observe(x) for x in (True, False, False, True)] == [None, False, None, True]
    with pytest.raises(ValueError):
        Hysteresis(0, 1)


# ------------------------------------------------------------------------------- servers


@pytest.fixture
def listener() -> Iterator[int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield s.getsockname()[1]
    s.close()


@pytest.fixture
def hung_listener() -> Iterator[int]:
    """A listener that never accepts, with its backlog full: new connects get no SYN-ACK."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(0)
    port = s.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port), timeout=1)  # takes the one backlog slot
    yield port
    filler.close()
    s.close()


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def _http_handler(stream: trio.abc.Stream) -> None:
    """/ok -> 200, /fail -> 500, /hang -> headers never come."""
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            data += chunk
        path = data.split(b" ", 2)[1]
        if path == b"/hang":
            await trio.sleep_forever()
        status = b"200 OK" if path == b"/ok" else b"500 Internal Server Error"
        await stream.send_all(b"HTTP/1.1 " + status + b"\r\ncontent-length: 2\r\nconnection: close\r\n\r\nhi")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        with trio.move_on_after(0.5):
            await stream.aclose()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture
async def http_server(nursery: trio.Nursery) -> AsyncIterator[int]:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, _http_handler, 0, host="127.0.0.1"))
    yield listeners[0].socket.getsockname()[1]


@pytest.fixture
async def https_server(nursery: trio.Nursery, tls: TlsFiles) -> AsyncIterator[int]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls.ca))
    ctx.load_cert_chain(str(tls.server_cert), str(tls.server_key))
    ctx.verify_mode = ssl.CERT_OPTIONAL  # a client certificate, when sent, must be from our CA
    listeners = await nursery.start(functools.partial(trio.serve_ssl_over_tcp, _http_handler, 0, ctx,
                                                      host="127.0.0.1"))
    yield listeners[0].transport_listener.socket.getsockname()[1]


async def fails(spec: CheckSpec, match: str) -> float:
    t0 = trio.current_time()
    with pytest.raises(CheckFailed, match=match):
        await run_check(spec)
    return trio.current_time() - t0


# ------------------------------------------------------------------------------- checks


async def test_tcp_ok_refused_hung(listener: int, hung_listener: int) -> None:
    await run_check(TcpCheck("127.0.0.1", listener, timeout=0.5))
    await fails(TcpCheck("127.0.0.1", free_port(), timeout=0.5), "refused")
    elapsed = await fails(TcpCheck("127.0.0.1", hung_listener, timeout=0.3), "timed out after 0.3s")
    assert 0.3 <= elapsed < 0.5


async def test_http_status_and_hang(http_server: int) -> None:
    base = f"http://127.0.0.1:{http_server}"
    await run_check(HttpCheck(f"{base}/ok", timeout=1))
    await fails(HttpCheck(f"{base}/fail", timeout=1), "status 500, expected 200")
    await run_check(HttpCheck(f"{base}/fail", expect_status=500, timeout=1))
    elapsed = await fails(HttpCheck(f"{base}/hang", timeout=0.3), "timed out")
    assert 0.3 <= elapsed < 0.5
    await fails(HttpCheck(f"http://127.0.0.1:{free_port()}/ok", timeout=1), "Connection refused")


async def test_https_ca_insecure_and_client_cert(https_server: int, tls: TlsFiles) -> None:
    url = f"https://127.0.0.1:{https_server}/ok"
    await run_check(HttpCheck(url, ca_file=str(tls.ca), timeout=2))
    await run_check(HttpCheck(f"https://localhost:{https_server}/ok", ca_file=str(tls.ca), timeout=2))
    await fails(HttpCheck(url, timeout=2), "certificate not trusted")  # system CAs do not know it
    await fails(HttpCheck(url, ca_file=str(tls.other_ca), timeout=2), "certificate not trusted")
    await run_check(HttpCheck(url, insecure=True, timeout=2))
    await run_check(HttpCheck(url, ca_file=str(tls.ca), cert_file=str(tls.client_cert),
                              key_file=str(tls.client_key), timeout=2))
    # a client certificate from a CA the server does not trust is refused in the handshake
    await fails(HttpCheck(url, ca_file=str(tls.ca), cert_file=str(tls.bad_client_cert),
                          key_file=str(tls.bad_client_key), timeout=2), "GET")
    await fails(HttpCheck(url, ca_file="/nonexistent/ca.pem", timeout=2), "TLS setup")


async def test_command_exit_status_and_kill_at_timeout(tmp_path: Path) -> None:
    await run_check(CommandCheck(("true",)))
    await fails(CommandCheck(("sh", "-c", "echo not ready; exit 1")), "exit status 1: not ready")
    pidfile = tmp_path / "pid"
    elapsed = await fails(CommandCheck(("sh", "-c", f'echo $$ > "{pidfile}"; exec sleep 10'), timeout=0.3),
                          "timed out")
    assert 0.3 <= elapsed < 0.6
    pid = int(pidfile.read_text())
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]
    await fails(CommandCheck(("/nonexistent/check",)), "cannot run")


async def test_carrier() -> None:
    await run_check(CarrierCheck("lo"))
    await fails(CarrierCheck("vthnone0"), "no interface")
    async with Netlink() as nl:  # the netlink way (what a daemon in a named netns needs)
        await run_check(CarrierCheck("lo"), nl=nl)
        with pytest.raises(CheckFailed, match="vthnone0"):
            await run_check(CarrierCheck("vthnone0"), nl=nl)


# ------------------------------------------------------------------------------- monitor


async def test_hung_check_never_delays_another(listener: int) -> None:
    changes: list[tuple[float, str, bool, str]] = []
    t0 = trio.current_time()
    checks = [("hung", CommandCheck(("sleep", "10"), interval=0.6, timeout=0.6, rise=1, fall=1)),
              ("fast", TcpCheck("127.0.0.1", listener, interval=0.05, timeout=0.05, rise=2, fall=2))]
    mon = HealthMonitor(checks, lambda n, h, r: changes.append((trio.current_time() - t0, n, h, r)))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mon.run)
        with trio.fail_after(2):
            while not any(n == "hung" for _, n, _, _ in changes):
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    fast = [c for c in changes if c[1] == "fast"]
    hung = [c for c in changes if c[1] == "hung"]
    assert fast[0][2] is True and fast[0][0] < 0.3  # two 50 ms rounds, while "hung" is still running
    assert hung[0][2] is False and 0.6 <= hung[0][0] < 1.0 and "timed out" in hung[0][3]
    assert mon.healthy("fast") and not mon.healthy("hung") and not mon.healthy()


async def test_monitor_started_after_first_round(listener: int) -> None:
    mon = HealthMonitor([("up", TcpCheck("127.0.0.1", listener, rise=1, timeout=0.5)),
                         ("slow", CommandCheck(("sh", "-c", "sleep 0.2"), rise=1, timeout=0.5)),
                         ("down", TcpCheck("127.0.0.1", free_port(), rise=2, fall=2, timeout=0.5))])
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        await nursery.start(mon.run)
        assert trio.current_time() - t0 >= 0.2  # waited for the slow one's first result
        st = mon.status()
        assert st["up"].healthy is True and st["slow"].healthy is True
        assert st["down"].healthy is None and "refused" in st["down"].reason  # unknown after one failure
        assert mon.healthy("up", "slow") and not mon.healthy()
        nursery.cancel_scope.cancel()
    empty = HealthMonitor([])
    async with trio.open_nursery() as nursery:
        await nursery.start(empty.run)
        assert empty.healthy()
        nursery.cancel_scope.cancel()


async def test_monitor_hysteresis_and_timing(autojump_clock: trio.abc.Clock) -> None:
    script = iter([True, True, False, True, False, False, False, True, True] + [True] * 100)
    runs: list[float] = []

    async def runner(spec: CheckSpec) -> None:
        runs.append(trio.current_time())
        await trio.sleep(0.1)
        if not next(script):
            raise CheckFailed("scripted failure")

    changes: list[tuple[float, bool, str]] = []
    spec = TcpCheck("x", 1, interval=1.0, timeout=0.5, rise=2, fall=3)
    mon = HealthMonitor([("c", spec)], lambda n, h, r: changes.append((trio.current_time(), h, r)), runner=runner)
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        nursery.start_soon(mon.run)
        await trio.sleep(9.5)
        nursery.cancel_scope.cancel()
    # start to start: one run a second, whatever each one took
    assert [round(r - t0, 3) for r in runs] == [float(i) for i in range(10)]
    assert [(round(t - t0, 3), h, r) for t, h, r in changes] == [
        (1.1, True, "ok"), (6.1, False, "scripted failure"), (8.1, True, "ok")]
    assert mon.status()["c"].runs == 10


async def test_monitor_counts_a_crashing_check_as_failed() -> None:
    async def runner(spec: CheckSpec) -> None:
        raise RuntimeError("boom")

    mon = HealthMonitor([("c", TcpCheck("x", 1, rise=1, fall=1, timeout=0.1, interval=0.1))], runner=runner)
    async with trio.open_nursery() as nursery:
        await nursery.start(mon.run)
        assert mon.status()["c"].healthy is False and "boom" in mon.status()["c"].reason
        nursery.cancel_scope.cancel()


def test_duplicate_names_rejected() -> None:
    with pytest.raises(ValueError):
        HealthMonitor([("a", CarrierCheck("lo")), ("a", CarrierCheck("lo"))])


# ------------------------------------------------------------------------------- parsing


def test_parse_examples() -> None:
    assert parse_check({"type": "tcp", "host": "127.0.0.1", "port": 6443}, "check[0]") == TcpCheck("127.0.0.1", 6443)
    spec = parse_check({"type": "http", "url": "https://127.0.0.1:6443/readyz", "expect_status": 200,
                        "insecure": True, "interval": 1.0, "timeout": 0.5, "rise": 2, "fall": 3, "name": "api"}, "k")
    assert spec == HttpCheck("https://127.0.0.1:6443/readyz", insecure=True, interval=1.0, timeout=0.5, name="api")
    assert check_name(spec) == "api"
    spec = parse_check({"type": "command", "command": ["/bin/true", "-x"], "interval": 0.5}, "k")
    assert spec == CommandCheck(("/bin/true", "-x"), interval=0.5, timeout=0.5)
    assert check_name(spec) == "command:true"
    assert parse_check({"type": "carrier", "interface": "eth0"}, "k") == CarrierCheck("eth0")
    assert parse_check({"type": "http", "url": "https://[::1]:8443/", "insecure": True}, "k").insecure
    assert parse_check({"type": "http", "url": "https://h:1/", "cert_file": "/c", "key_file": "/k"}, "k").cert_file == "/c"


@pytest.mark.parametrize("table, key, words", [
    ({}, "vip[0].check[1].type", "required"),
    ({"type": "ping"}, "vip[0].check[1].type", "must be one of"),
    ({"type": 1}, "vip[0].check[1].type", "expected"),
    ({"type": "tcp", "host": "h", "port": 1, "color": "red"}, "vip[0].check[1].color", "unknown key"),
    ({"type": "tcp", "host": "h"}, "vip[0].check[1].port", "required"),
    ({"type": "tcp", "host": "h", "port": 0}, "vip[0].check[1].port", "between"),
    ({"type": "tcp", "host": "h", "port": "80"}, "vip[0].check[1].port", "integer"),
    ({"type": "tcp", "host": "", "port": 80}, "vip[0].check[1].host", "not a host"),
    ({"type": "tcp", "host": "h", "port": 1, "interval": 0}, "vip[0].check[1].interval", "> 0"),
    ({"type": "tcp", "host": "h", "port": 1, "interval": True}, "vip[0].check[1].interval", "number"),
    ({"type": "tcp", "host": "h", "port": 1, "interval": 1, "timeout": 2}, "vip[0].check[1].timeout", "exceed"),
    ({"type": "tcp", "host": "h", "port": 1, "rise": 0}, "vip[0].check[1].rise", "between"),
    ({"type": "tcp", "host": "h", "port": 1, "fall": 1.5}, "vip[0].check[1].fall", "integer"),
    ({"type": "tcp", "host": "h", "port": 1, "name": "a b"}, "vip[0].check[1].name", "valid name"),
    ({"type": "http", "url": "ftp://h/"}, "vip[0].check[1].url", "http(s)"),
    ({"type": "http", "url": "http://h:99999/"}, "vip[0].check[1].url", "port"),
    ({"type": "http", "url": "http://h/", "expect_status": 99}, "vip[0].check[1].expect_status", "between"),
    ({"type": "http", "url": "https://h/", "cert_file": "/c"}, "vip[0].check[1].key_file", "together"),
    ({"type": "http", "url": "http://h/", "ca_file": "/c"}, "vip[0].check[1].ca_file", "https"),
    ({"type": "http", "url": "https://10.0.0.1/", "insecure": True}, "vip[0].check[1].insecure", "loopback"),
    ({"type": "http", "url": "http://127.0.0.1/", "insecure": True}, "vip[0].check[1].insecure", "https"),
    ({"type": "http", "url": "https://localhost/", "insecure": True, "ca_file": "/c"}, "vip[0].check[1].insecure",
     "not both"),
    ({"type": "http", "url": "https://localhost/", "insecure": "yes"}, "vip[0].check[1].insecure", "boolean"),
    ({"type": "command", "command": []}, "vip[0].check[1].command", "program"),
    ({"type": "command", "command": "true"}, "vip[0].check[1].command", "list"),
    ({"type": "command", "command": ["true", 3]}, "vip[0].check[1].command[1]", "string"),
    ({"type": "carrier", "interface": "a/b"}, "vip[0].check[1].interface", "interface name"),
    ({"type": "carrier"}, "vip[0].check[1].interface", "required"),
])
def test_parse_errors(table: dict, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_check(table, "vip[0].check[1]")
    assert e.value.key == key and words in e.value.reason, e.value


def test_parse_not_a_table() -> None:
    with pytest.raises(ConfigError) as e:
        parse_check(["tcp"], "check[0]")
    assert e.value.key == "check[0]"


def test_check_host(tmp_path: Path) -> None:
    check_host(CarrierCheck("lo"), "k")
    check_host(CommandCheck(("true",)), "k")
    for spec, key in [(CarrierCheck("vthnone0"), "k.interface"), (CommandCheck((str(tmp_path / "x"),)), "k.command[0]"),
                      (HttpCheck("https://h/", ca_file=str(tmp_path / "ca")), "k.ca_file")]:
        with pytest.raises(ConfigError) as e:
            check_host(spec, "k")
        assert e.value.key == key

"""etcd fixtures: real etcd processes on free loopback ports, started only when a test runs.

Registered through `pytest_plugins` in tests/conftest.py, whose lab gate skips (or fails, with
VIPD_REQUIRE_LAB=1) lab tests before any of these fixtures is set up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from vipd.lab.certs import TlsFiles, make_tls
from vipd.lab.etcd import EtcdServer

ETCD_USER = "root"
ETCD_PASSWORD = "vipd-test-password"


@pytest.fixture
def etcd_factory(tmp_path: Path) -> Iterator[Callable[..., EtcdServer]]:
    """make(**EtcdServer kwargs) -> a started server; every server made is stopped at teardown."""
    servers: list[EtcdServer] = []

    def make(**kwargs: Any) -> EtcdServer:
        server = EtcdServer(tmp_path / f"etcd{len(servers)}", **kwargs)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def etcd_server(etcd_factory: Callable[..., EtcdServer]) -> EtcdServer:
    """A plain etcd with fast timing (lease TTL minimum 1 s), progress notifications every second."""
    return etcd_factory()


@pytest.fixture
def etcd_tls(etcd_factory: Callable[..., EtcdServer], tls_files: TlsFiles) -> EtcdServer:
    """etcd on https, requiring client certificates signed by tls_files.ca (server.tls holds the files)."""
    return etcd_factory(tls=tls_files, client_cert_auth=True)


@pytest.fixture
def etcd_auth(etcd_factory: Callable[..., EtcdServer]) -> EtcdServer:
    """etcd with auth enabled: user ETCD_USER, password ETCD_PASSWORD (also in server.auth)."""
    server = etcd_factory()
    server.enable_auth(ETCD_USER, ETCD_PASSWORD)
    return server

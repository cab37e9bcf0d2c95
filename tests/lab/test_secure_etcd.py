"""vipd against an etcd that requires TLS client certificates, and one that requires a password."""

from __future__ import annotations

import ipaddress

import pytest

from vipd.lab.certs import make_tls
from vipd.lab.cluster import VipDef
from vipd.lab.etcd import EtcdServer


def _wait_exit(proc, timeout: float = 15.0) -> int:  # type: ignore[no-untyped-def]
    return proc.wait(timeout)


@pytest.fixture
def tls_etcd(lab, tmp_path):  # type: ignore[no-untyped-def]
    tls = make_tls(tmp_path / "pki", server_ips=(str(lab.etcd_ip),))
    srv = EtcdServer(tmp_path / "etcd-tls", host=str(lab.etcd_ip), client_port=2479, peer_port=2480,
                     netns=lab.etcd_ns, tls=tls, client_cert_auth=True)
    srv.start()
    try:
        yield srv, tls
    finally:
        srv.stop()


@pytest.fixture
def auth_etcd(lab, tmp_path):  # type: ignore[no-untyped-def]
    srv = EtcdServer(tmp_path / "etcd-auth", host=str(lab.etcd_ip), client_port=2579, peer_port=2580,
                     netns=lab.etcd_ns)
    srv.start()
    srv.enable_auth("root", "s3cret-vt")
    try:
        yield srv
    finally:
        srv.stop()


def test_tls_client_certificates(lab, tls_etcd, make_cluster):
    srv, tls = tls_etcd
    c = make_cluster([VipDef("api", str(lab.vip4(0)))], endpoints=[srv.endpoint],
                     etcd_extra={"ca_file": str(tls.ca), "cert_file": str(tls.client_cert),
                                 "key_file": str(tls.client_key)})
    c.wait_owner(lab.vip4(0).ip)
    # a host presenting a certificate from another CA is refused with a clear startup error
    h = lab.hosts[0]
    c.procs[h.name].terminate()
    c.procs[h.name].wait(10)
    proc = c.start(h, cert_file=str(tls.bad_client_cert), key_file=str(tls.bad_client_key))
    assert _wait_exit(proc) == 1
    log = c.log_path(h).read_text()
    assert "etcd refused our credentials" in log, log[-2000:]


def test_password_auth(lab, auth_etcd, make_cluster):
    c = make_cluster([VipDef("api", str(lab.vip4(0)))], endpoints=[auth_etcd.endpoint],
                     etcd_extra={"username": "root", "password": "s3cret-vt"})
    c.wait_owner(lab.vip4(0).ip)
    h = lab.hosts[0]
    c.procs[h.name].terminate()
    c.procs[h.name].wait(10)
    proc = c.start(h, password="wrong")
    assert _wait_exit(proc) == 1
    log = c.log_path(h).read_text()
    assert "etcd refused our credentials" in log and "root" in log, log[-2000:]

"""Throw-away TLS material for tests and the lab, made with the `openssl` CLI.

Two independent CAs: the good one signs the etcd server certificate and a client certificate;
the other one signs a client certificate etcd must reject. EC P-256 keys, valid for two days.
"""

from __future__ import annotations

import ipaddress
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA etcd does not trust
    bad_client_cert: Path  # signed by other_ca
    bad_client_key: Path


def _openssl(*args: str | Path) -> None:
    proc = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {proc.stderr.strip()}")


def _make_ca(d: Path, name: str) -> tuple[Path, Path]:
    crt, key = d / f"{name}.crt", d / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", key, "-out", crt, "-days", "2", "-subj", f"/CN=vipd test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return crt, key


def _make_leaf(d: Path, name: str, cn: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    crt, key, csr, ext = (d / f"{name}.{s}" for s in ("crt", "key", "csr", "ext"))
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", key, "-out", csr, "-subj", f"/CN={cn}")
    ext.write_text("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                   "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n" + extensions)
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
             "-CAserial", d / f"{ca[0].stem}.srl", "-out", crt, "-days", "2", "-extfile", ext)
    csr.unlink()
    ext.unlink()
    return crt, key


def make_tls(directory: str | Path, *, server_ips: Sequence[str] = ("127.0.0.1",),
             client_cn: str = "root") -> TlsFiles:
    """Write a CA, an etcd server cert (IP SANs + localhost) and client certs into `directory`.

    The server cert also allows clientAuth: etcd's own gateway dials the server with it.
    The client CN is the etcd user name when etcd runs with auth and --client-cert-auth.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca = _make_ca(d, "ca")
    other = _make_ca(d, "other-ca")
    sans = ",".join([f"IP:{ipaddress.ip_address(ip)}" for ip in server_ips] + ["DNS:localhost"])
    server = _make_leaf(d, "server", "etcd", ca,
                        f"subjectAltName={sans}\nextendedKeyUsage=serverAuth,clientAuth\n")
    client = _make_leaf(d, "client", client_cn, ca, "extendedKeyUsage=clientAuth\n")
    bad = _make_leaf(d, "bad-client", client_cn, other, "extendedKeyUsage=clientAuth\n")
    for key in (ca[1], other[1], server[1], client[1], bad[1]):
        key.chmod(0o600)
    return TlsFiles(ca[0], server[0], server[1], client[0], client[1], other[0], bad[0], bad[1])

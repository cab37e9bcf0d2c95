"""Lab fixtures: a fresh namespace lab per test (prefix vt + random), an etcd in its own namespace,
vipd started on every host as systemd would, and an address monitor that fails the test on any
instant of dual ownership."""

from __future__ import annotations

import secrets
from typing import Callable, Iterator

import pytest

from vipd.lab.cluster import Cluster, VipDef
from vipd.lab.etcd import EtcdServer
from vipd.lab.etcd_cluster import EtcdCluster
from vipd.lab.monitor import AddressMonitor
from vipd.lab.topology import Lab


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab("vt" + secrets.token_hex(2), n_hosts=3) as lab:
        yield lab


@pytest.fixture
def lab_etcd(lab: Lab, tmp_path) -> Iterator[EtcdServer]:  # type: ignore[no-untyped-def]
    srv = EtcdServer(tmp_path / "etcd", host=str(lab.etcd_ip), client_port=2379, peer_port=2380,
                     netns=lab.etcd_ns)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def lab_etcd_cluster(lab: Lab, tmp_path) -> Iterator[EtcdCluster]:  # type: ignore[no-untyped-def]
    """Three etcd members (namespaces {prefix}x/y/z, 10.213.0.4-6) with etcd's default flags."""
    with EtcdCluster(lab, tmp_path / "etcd-cluster") as cluster:
        yield cluster


@pytest.fixture
def make_cluster(lab: Lab, lab_etcd: EtcdServer, tmp_path) -> Iterator[Callable[..., Cluster]]:  # type: ignore[no-untyped-def]
    made: list[Cluster] = []
    monitors: list[AddressMonitor] = []

    def make(vips: list[VipDef] | None = None, *, start: bool = True, monitor: bool = True, **kw) -> Cluster:  # type: ignore[no-untyped-def]
        vips = vips or [VipDef("api", str(lab.vip4(0))), VipDef("api6", str(lab.vip6(0)))]
        kw.setdefault("endpoints", [lab_etcd.endpoint])
        c = Cluster(lab, tmp_path / f"hosts{len(made)}", vips, **kw)
        made.append(c)
        if monitor:
            import ipaddress
            m = AddressMonitor(lab, [ipaddress.ip_interface(v.address).ip for v in vips])
            m.start()
            monitors.append(m)
            c.monitor = m  # type: ignore[attr-defined]
        if start:
            c.start_all()
        return c

    yield make
    for c in made:
        c.stop_all()
    for m in monitors:
        m.stop()
    # the invariant every lab test guards, checked even when the test body forgot to
    for i, m in enumerate(monitors):
        try:
            m.assert_never_dual()
        except AssertionError as e:
            path = _write_timelines(m, tmp_path / f"monitor{i}.txt")
            raise AssertionError(f"{e} (timelines: {path})") from None


def _write_timelines(m: AddressMonitor, path):  # type: ignore[no-untyped-def]
    """Every watched address's holders and address timelines, in monotonic and wall-clock time (to
    lay beside the vipd logs), so a dual ownership can be explained after the run."""
    import datetime
    import time
    offset = time.time() - time.monotonic()
    wall = lambda t: datetime.datetime.fromtimestamp(t + offset, datetime.timezone.utc).strftime("%H:%M:%S.%f")[:-3]  # noqa: E731
    lines = [m.summary()]
    for ip in m.ips:
        for kind, line in (("serving", m.holders_timeline(ip)), ("address", m.address_timeline(ip))):
            lines += [f"{ip} {kind} {t:.4f} {wall(t)} {','.join(sorted(h)) or '-'}" for t, h in line]  # type: ignore[union-attr]
    path.write_text("\n".join(lines) + "\n")
    return path

"""vipd against a real 3-member etcd cluster with etcd's default flags (heartbeat 100 ms, election 1 s)
and vipd's default timing: losing or disturbing any one member, the leader included, must cost no VIP.

One vipd cluster (3 hosts, every member as an endpoint), the address monitor (dual ownership fails the
test) and a client probe; the faults run in sequence, each followed by recovery: leader SIGKILL (and
restart), leader link cut (and rejoin: etcd 3.4 has no pre-vote, so it forces another election),
leader SIGSTOP for 3 s (and SIGCONT), follower SIGKILL (and restart). After each fault, every host
must have renewed its lease again before the next one starts.
"""

from __future__ import annotations

import ipaddress
import re
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import trio

from vipd.config import EtcdConfig, TimingConfig
from vipd.election.etcd import EtcdClient
from vipd.election.follow import follow
from vipd.errors import EtcdError, EtcdUnavailable
from vipd.lab.cluster import Cluster, VipDef
from vipd.lab import netns
from vipd.lab.etcd_cluster import FAULTS, EtcdCluster
from vipd.lab.monitor import AddressMonitor
from vipd.lab.probe import Probe
from vipd.lab.topology import Lab

PROBE_INTERVAL = 0.02


@pytest.fixture
def vipd_on_etcd_cluster(lab: Lab, lab_etcd_cluster: EtcdCluster,
                         tmp_path: Path) -> Iterator[Cluster]:
    """make_cluster's pattern on the 3-member cluster, with vipd's own defaults (not the lab's fast profile)."""
    vip = VipDef("api", str(lab.vip4(0)))
    e, t = EtcdConfig(), TimingConfig()
    c = Cluster(lab, tmp_path / "hosts", [vip], endpoints=lab_etcd_cluster.endpoints(), lease_ttl=e.lease_ttl,
                etcd_extra={"request_timeout": e.request_timeout},
                timing={"fence_margin": t.fence_margin, "keepalives_per_ttl": t.keepalives_per_ttl})
    monitor = AddressMonitor(lab, [ipaddress.ip_interface(vip.address).ip]).start()
    c.monitor = monitor  # type: ignore[attr-defined]
    c.start_all()
    try:
        yield c
    finally:
        c.stop_all()
        monitor.stop()
    monitor.assert_never_dual()


def transitions(c: Cluster) -> dict[str, int]:
    return {h.name: len(re.findall(r"event=transition ", c.log_path(h).read_text(errors="replace")))
            for h in c.lab.hosts}


def lease_validity(c: Cluster) -> dict[str, float]:
    out = {}
    for h in c.lab.hosts:
        m = re.search(r"^vipd_lease_validity_seconds ([0-9.]+)", c.metrics(h), re.M)
        out[h.name] = float(m.group(1)) if m else 0.0
    return out


def wait_renewed(c: Cluster, ttl: int, timeout: float = 20.0) -> None:
    """Until every host's lease was renewed within the last 2 s (validity above TTL - 2 s)."""
    deadline = time.monotonic() + timeout
    while (v := lease_validity(c)) and min(v.values()) < ttl - 2:
        assert time.monotonic() < deadline, f"leases not renewed: {v}\n{c.log_tail()}"
        time.sleep(0.2)


def test_member_faults_cost_no_vip(lab: Lab, lab_etcd_cluster: EtcdCluster, vipd_on_etcd_cluster: Cluster) -> None:
    c, ec = vipd_on_etcd_cluster, lab_etcd_cluster
    ip = ipaddress.ip_interface(c.vips[0].address).ip
    owner = c.wait_owner(ip, timeout=30)
    ttl = EtcdConfig().lease_ttl
    wait_renewed(c, ttl)
    before = transitions(c)
    steady = time.monotonic()
    with Probe(lab, ip, PROBE_INTERVAL) as probe:
        assert probe.wait_responder(owner, timeout=5)
        for name in FAULTS:
            t0 = time.monotonic()
            ec.inject(name, hold=3.0)
            assert ec.wait_for_leader(20) is not None, f"{name}: no leader after recovery\n{ec.log_tail()}"
            wait_renewed(c, ttl)
            assert probe.outages(since=t0) == [], f"{name}: client outage {probe.outages(since=t0)}\n{c.log_tail()}"
            assert transitions(c) == before, f"{name}: ownership changed\n{c.log_tail()}"
            moves = [ch for ch in c.monitor.owner_changes(ip) if ch[0] > steady]  # type: ignore[attr-defined]
            assert moves == [], f"{name}: holders changed {moves}"
            assert lab.holders(ip) == [owner], name


def test_watch_resumes_on_another_member_without_missing_events(lab: Lab, lab_etcd_cluster: EtcdCluster) -> None:
    """The member serving a watch dies while a key changes: the watch resumes elsewhere from the last
    delivered revision and every change arrives once, in order (the only writes in this cluster are
    ours, so the revisions seen must be contiguous). A keepalive rides through as well."""
    ec = lab_etcd_cluster
    found = ec.leader()
    assert found is not None
    lead = found
    # the leader first in the list: the watch and the keepalives use it until it dies
    eps = [lead.endpoint] + [e for e in ec.endpoints() if e != lead.endpoint]
    timeout = EtcdConfig().request_timeout

    async def run() -> list[tuple[int, str]]:
        seen: list[tuple[int, str]] = []
        async with EtcdClient(eps, timeout=timeout) as writer, EtcdClient(eps, timeout=timeout) as watcher:
            lease, ttl = await watcher.grant(10)
            rev = await writer.put("/w/k", "0")
            seen.append((rev, "0"))
            done = trio.Event()
            snapshots: list[int] = []

            def on_event(e: Any) -> None:
                seen.append((e.kv.mod_revision, e.kv.value))
                if e.kv.value == "20":
                    done.set()

            async with trio.open_nursery() as n:
                await n.start(follow, watcher, "/w/", lambda kvs, r: snapshots.append(r), on_event)
                for i in range(1, 21):
                    if i == 5:
                        await trio.to_thread.run_sync(ec.kill, lead)
                        while True:  # as HostLease does: retry until the new leader answers
                            try:
                                assert await watcher.keepalive(lease) == ttl  # the lease survived
                                break
                            except EtcdUnavailable:
                                await trio.sleep(0.1)
                    while True:  # writes during the election fail: retry until one lands
                        try:
                            await writer.put("/w/k", str(i))
                            break
                        except EtcdError:
                            await trio.sleep(0.1)
                await done.wait()
                n.cancel_scope.cancel()
            assert len(snapshots) == 1  # listed once; the broken watch resumed without a re-list
            assert watcher.endpoint != lead.endpoint
        return seen

    async def bounded() -> list[tuple[int, str]]:
        with trio.fail_after(60):
            return await run()

    seen = netns.call_in(lab.hosts[0].ns, lambda: trio.run(bounded))  # lab traffic only from a lab host
    revisions = [r for r, _ in seen]
    assert revisions == list(range(revisions[0], revisions[0] + len(seen))), seen  # none missed, none twice
    values = [v for i, (_, v) in enumerate(seen) if i == 0 or seen[i - 1][1] != v]  # a retried put may repeat
    assert values == [str(i) for i in range(21)], seen
    ec.start_member(lead)

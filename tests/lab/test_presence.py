"""One live vipd per node name: vipd.election.presence against a real etcd (lease TTL minimum 1 s),
then two lab hosts configured with the same node name."""

from __future__ import annotations

import ipaddress
import json
import time

import pytest
import trio

from vipd.election.etcd import EtcdClient
from vipd.election.presence import DuplicateNode, Presence
from vipd.lab.cluster import VipDef, vipd_argv
from vipd.lab.etcd import EtcdServer

KEY = "/vt/presence/hosts/n1"
INFO = json.dumps({"healthy": True, "weight": 1.0})


async def _keepalive(c: EtcdClient, lease: int) -> None:
    while True:
        await c.keepalive(lease)
        await trio.sleep(0.2)


async def test_a_live_holder_keeps_its_node_name(etcd_server: EtcdServer) -> None:
    async with EtcdClient([etcd_server.endpoint], timeout=0.5) as c, trio.open_nursery() as n:
        first = Presence(c, KEY, state_dir="/run/a", endpoint=etcd_server.endpoint)
        lease1, _ = await c.grant(3)
        n.start_soon(_keepalive, c, lease1)
        await first.claim(INFO, lease1)
        held = await c.get(KEY)
        assert held is not None and json.loads(held.value)["holder"]["instance"] == first.identity["instance"]

        second = Presence(c, KEY, state_dir="/run/b", endpoint=etcd_server.endpoint)  # another host, same name
        lease2, _ = await c.grant(1)
        with pytest.raises(DuplicateNode) as ei:
            await second.claim(INFO, lease2)
        assert ei.value.key == "node" and f"pid {first.identity['pid']}" in ei.value.reason
        after = await c.get(KEY)
        assert after is not None and (after.create_revision, after.value) == (held.create_revision, held.value)
        # and the first one's updates still land; the second one's cannot
        await first.update(json.dumps({"healthy": False, "weight": 1.0}), lease1)
        assert json.loads((await c.get(KEY)).value)["healthy"] is False  # type: ignore[union-attr]
        n.cancel_scope.cancel()


async def test_a_dead_holders_key_is_waited_out_and_our_own_is_taken_over(etcd_server: EtcdServer) -> None:
    async with EtcdClient([etcd_server.endpoint], timeout=0.5) as c:
        dead = Presence(c, KEY, state_dir="/run/a")
        lease, _ = await c.grant(1)
        await dead.claim(INFO, lease)  # nobody keeps this lease alive: the key expires
        other = Presence(c, KEY, state_dir="/run/b")
        mine, _ = await c.grant(5)
        await other.claim(INFO, mine)
        assert json.loads((await c.get(KEY)).value)["holder"]["state_dir"] == "/run/b"  # type: ignore[union-attr]
        # a restart of that daemon (same boot, same state_dir, new process) takes its key over at once
        restarted = Presence(c, KEY, state_dir="/run/b")
        lease3, _ = await c.grant(5)
        with trio.fail_after(0.9):  # no wait-out: the old lease (5 s) is still alive
            await restarted.claim(INFO, lease3)
        kv = await c.get(KEY)
        assert kv is not None and kv.lease == lease3


def test_two_hosts_with_the_same_node_name(lab, lab_etcd, make_cluster):  # type: ignore[no-untyped-def]
    """h2 configured as node "h1" while h1 runs: h2 exits 2 naming h1's pid and address, never
    campaigns; h1 keeps its VIP, owner key and presence untouched."""
    c = make_cluster([VipDef("api", str(lab.vip4(0)))], start=False)
    h1, h2 = lab.hosts[0], lab.hosts[1]
    c.start(h1)
    vip = ipaddress.ip_interface(c.vips[0].address).ip
    assert c.wait_owner(vip) == "h1"
    time.sleep(0.5)
    before = lab_etcd.request("/v3/kv/range", {"key": "Lw==", "range_end": "MA=="})["kvs"]
    path = c.write_config(h2)
    path.write_text(path.read_text().replace('node = "h2"', 'node = "h1"'))
    proc = lab.popen(h2.ns, [*vipd_argv(), "run", "-c", str(path)], log=c.log_path(h2))
    c.procs["h2"] = proc
    code = proc.wait(c.lease_ttl + 15)
    text = c.log_path(h2).read_text()
    assert code == 2, text
    line = [ln for ln in text.splitlines() if ln.startswith("vipd: ")]
    assert len(line) == 1 and "node: 'h1' is already in use by another live vipd" in line[0], text
    assert f"pid {c.procs['h1'].pid}" in line[0] and f"address {h1.ip.ip}" in line[0], line
    assert "Traceback" not in text
    assert lab.holders(vip) == ["h1"]
    after = lab_etcd.request("/v3/kv/range", {"key": "Lw==", "range_end": "MA=="})["kvs"]
    keep = lambda kvs: sorted((kv["key"], kv["create_revision"], kv.get("lease")) for kv in kvs)  # noqa: E731
    assert keep(after) == keep(before)
    assert c.procs["h1"].poll() is None

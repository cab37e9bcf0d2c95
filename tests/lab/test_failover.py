"""vipd end to end: real etcd, three host namespaces on a bridge, a client, vipd started as systemd
would. The make_cluster fixture's monitor fails any test during which two hosts held a VIP at once."""

from __future__ import annotations

import ipaddress
import re
import subprocess
import time

import pytest

from tests.lab.util import wait_for
from vipd.lab.cluster import VipDef


def ip_of(v: VipDef):  # type: ignore[no-untyped-def]
    return ipaddress.ip_interface(v.address).ip


def neigh_mac(ns: str, ip) -> str | None:  # type: ignore[no-untyped-def]
    out = subprocess.run(["ip", "-n", ns, "neigh", "show", str(ip)], capture_output=True, text=True).stdout
    m = re.search(r"lladdr ([0-9a-f:]{17})", out)
    return m.group(1) if m else None


def ping(ns: str, ip, count: int = 1) -> bool:  # type: ignore[no-untyped-def]
    return subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", str(count), "-W", "1", "-i", "0.2", str(ip)],
                          capture_output=True).returncode == 0


def test_exactly_one_owner_after_start_status_and_metrics(lab, make_cluster):
    c = make_cluster()
    owners = {v.name: c.wait_owner(ip_of(v)) for v in c.vips}
    time.sleep(1.5)  # several keepalive rounds: still exactly one holder each
    for v in c.vips:
        assert lab.holders(ip_of(v)) == [owners[v.name]]
    h = c.host(owners["api"])
    status = c.run_cli(h, "status")
    assert status.returncode == 0, status.stderr
    assert re.search(rf"^api\s+{re.escape(c.vips[0].address)}\s+{owners['api']}\s+\S+\s+\d+", status.stdout, re.M), status.stdout
    metrics = c.metrics(h)
    assert 'vipd_vip_owner{vip="api"} 1.0' in metrics
    assert "vipd_etcd_reachable 1.0" in metrics
    assert re.search(r"^vipd_lease_validity_seconds [0-9.]+", metrics, re.M)
    assert re.search(r'^vipd_announcements_total\{vip="api"\} [1-9]', metrics, re.M)
    assert "vipd_lease_keepalive_seconds_count" in metrics
    assert re.search(r'vipd_ownership_transitions_total\{from_state="acquiring",to_state="owner",vip="api"\} 1.0',
                     metrics)
    other = next(x for x in lab.hosts if x.name != owners["api"])
    assert 'vipd_vip_owner{vip="api"} 0.0' in c.metrics(other)


def test_sigterm_moves_vip_and_releases_lease(lab, make_cluster):
    c = make_cluster()
    v = c.vips[0]
    old = c.wait_owner(ip_of(v))
    t0 = time.monotonic()
    assert c.term(c.host(old)) == 0
    new = c.wait_owner(ip_of(v), exclude=[old], timeout=5)
    # a clean stop hands over at once (well inside one lease TTL), and leaves nothing behind
    assert time.monotonic() - t0 < c.lease_ttl
    assert old not in lab.holders(ip_of(v)) and old not in lab.holders(ip_of(c.vips[1]))
    assert "event=lease_revoked" in c.log_path(c.host(old)).read_text()
    assert new != old


def test_sigkill_owner_loses_vip_by_itself_and_another_takes_it(lab, make_cluster):
    c = make_cluster()
    v = c.vips[0]
    old = c.wait_owner(ip_of(v))
    t_kill = time.monotonic()
    c.kill(c.host(old))
    # nobody runs any code on the dead host: the kernel lifetime removes the VIP
    c.wait_holders(ip_of(v), lambda hs: old not in hs, timeout=c.lease_ttl + 1)
    gone_after = time.monotonic() - t_kill
    assert gone_after < c.lease_ttl, f"dead host kept the VIP {gone_after:.2f}s"
    new = c.wait_owner(ip_of(v), exclude=[old], timeout=c.lease_ttl + 3)
    assert new != old
    changes = c.monitor.owner_changes(ip_of(v))
    # the dead host's copy ended strictly before the new owner's began
    lost = [t for t, before, after in changes if old in before and old not in after]
    won = [t for t, before, after in changes if new in after and new not in before]
    assert lost and won and lost[-1] <= won[-1]


def test_link_cut_owner_drops_vip_before_new_owner_claims(lab, make_cluster):
    c = make_cluster()
    v = c.vips[0]
    old = c.wait_owner(ip_of(v))
    lab.cut(c.host(old))
    new = c.wait_owner(ip_of(v), exclude=[old], timeout=c.lease_ttl + 4)
    assert old not in lab.holders(ip_of(v))
    lab.restore(c.host(old))
    time.sleep(c.lease_ttl + 0.5)  # the old host comes back as a backup: still one owner
    assert lab.holders(ip_of(v)) == [new]
    assert "event=transition" in c.log_path(c.host(old)).read_text()
    assert re.search(r"from=owner to=fenced", c.log_path(c.host(old)).read_text())


def test_etcd_down_no_host_keeps_vip_past_lease_then_ownership_resumes(lab, lab_etcd, make_cluster):
    c = make_cluster()
    for v in c.vips:
        c.wait_owner(ip_of(v))
    t_stop = time.monotonic()
    lab_etcd.kill()
    for v in c.vips:
        c.wait_holders(ip_of(v), lambda hs: hs == [], timeout=c.lease_ttl + 1)
    assert time.monotonic() - t_stop < c.lease_ttl + 0.3
    time.sleep(0.5)
    assert all(lab.holders(ip_of(v)) == [] for v in c.vips)
    lab_etcd.start()
    for v in c.vips:
        c.wait_owner(ip_of(v), timeout=10)
    time.sleep(1.0)
    for v in c.vips:
        assert len(lab.holders(ip_of(v))) == 1


def test_stale_tagged_address_removed_untagged_left(lab, make_cluster):
    from pyroute2 import IPRoute

    from vipd.dataplane.address import VIPD_PROTO
    h = lab.hosts[0]
    stale, foreign = lab.vip4(5), lab.vip4(6)
    with IPRoute(netns=h.ns, flags=0) as ipr:
        idx = ipr.link_lookup(ifname=h.ifname)[0]
        ipr.addr("add", index=idx, address=str(stale.ip), prefixlen=stale.network.prefixlen, proto=VIPD_PROTO)
        ipr.addr("add", index=idx, address=str(foreign.ip), prefixlen=foreign.network.prefixlen)
    assert h.name in lab.holders(stale.ip)
    c = make_cluster()
    c.wait_owner(ip_of(c.vips[0]))
    wait_for(lambda: h.name not in lab.holders(stale.ip), 5, "stale tagged address removed")
    time.sleep(c.timing["reconcile_interval"] * 2)
    assert lab.holders(foreign.ip) == [h.name], "vipd touched an address it did not create"
    assert "stale_address_removed" in c.log_path(h).read_text()


def test_stray_tagged_address_added_while_running_goes_at_once(lab, make_cluster):
    """The kernel's notification starts the relist (vipd/kernel_view.py), not the backstop tick: with
    30 s ticks, the first relist by tick comes 30 s after the start, after this test."""
    from pyroute2 import IPRoute

    from vipd.dataplane.address import VIPD_PROTO
    c = make_cluster(start=False)
    c.timing["reconcile_interval"] = 30.0
    c.start_all()
    c.wait_owner(ip_of(c.vips[0]))
    h = lab.hosts[0]
    stray = lab.vip4(7)
    with IPRoute(netns=h.ns, flags=0) as ipr:
        idx = ipr.link_lookup(ifname=h.ifname)[0]
        ipr.addr("add", index=idx, address=str(stray.ip), prefixlen=stray.network.prefixlen, proto=VIPD_PROTO)
    wait_for(lambda: h.name not in lab.holders(stray.ip), 20, "stray tagged address removed")
    line = next(x for x in c.log_path(h).read_text().splitlines()
                if "event=stray_address_removed" in x and str(stray.ip) in x)
    assert "found_by=notification" in line, line


def test_client_neighbour_entry_follows_owner_mac(lab, make_cluster):
    c = make_cluster()
    v4, v6 = (ip_of(v) for v in c.vips)
    old = c.wait_owner(v4)
    old6 = c.wait_owner(v6)
    assert ping(lab.client.ns, v4) and ping(lab.client.ns, v6)
    assert neigh_mac(lab.client.ns, v4) == c.host(old).mac
    assert neigh_mac(lab.client.ns, v6) == c.host(old6).mac
    # planned handover of both; the client sends nothing: only our announcements can update it
    c.term(c.host(old))
    if old6 != old:
        c.term(c.host(old6))
    new = c.wait_owner(v4, exclude=[old])
    new6 = c.wait_owner(v6, exclude=[old6])
    wait_for(lambda: neigh_mac(lab.client.ns, v4) == c.host(new).mac, 3, "client ARP entry -> new owner")
    wait_for(lambda: neigh_mac(lab.client.ns, v6) == c.host(new6).mac, 3, "client ND entry -> new owner")
    assert ping(lab.client.ns, v4) and ping(lab.client.ns, v6)


def test_release_command_hands_vip_over(lab, make_cluster):
    c = make_cluster()
    v = c.vips[0]
    old = c.wait_owner(ip_of(v))
    r = c.run_cli(c.host(old), "release", "api")
    assert r.returncode == 0 and "releasing" in r.stdout, r.stdout + r.stderr
    new = c.wait_owner(ip_of(v), exclude=[old], timeout=3)
    assert new != old
    r = c.run_cli(c.host(old), "release", "nosuch")
    assert r.returncode == 1 and "no VIP named 'nosuch'" in r.stderr


def test_group_moves_together(lab, make_cluster):
    vips = [VipDef("web4", str(lab.vip4(1)), extra={"group": "web"}),
            VipDef("web6", str(lab.vip6(1)), extra={"group": "web"}),
            VipDef("api", str(lab.vip4(0)))]
    c = make_cluster(vips)
    old = c.wait_owner(ip_of(vips[0]))
    assert c.wait_owner(ip_of(vips[1])) == old
    status = c.run_cli(c.host(old), "status")
    assert re.search(rf"^web\s+{re.escape(vips[0].address)},{re.escape(vips[1].address)}\s+{old}\s", status.stdout,
                     re.M), status.stdout
    r = c.run_cli(c.host(old), "release", "web6")  # a member's name releases its whole group
    assert r.returncode == 0, r.stderr
    new = c.wait_owner(ip_of(vips[0]), exclude=[old], timeout=3)
    assert c.wait_owner(ip_of(vips[1]), exclude=[old], timeout=3) == new
    for t, before, after in c.monitor.owner_changes(ip_of(vips[1])):
        assert len(after) <= 1

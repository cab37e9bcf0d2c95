"""Health-gated ownership, placement of many VIPs, preemption, hooks and conflict detection, with
real etcd and namespaces. The make_cluster monitor fails any test that ever saw dual ownership."""

from __future__ import annotations

import collections
import functools
import ipaddress
import json
import re
import time
from pathlib import Path

import pytest

from tests.lab import util
from vipd.lab.cluster import VipDef
from vipd.lab.dsr import Capture


def ip_of(v: VipDef):  # type: ignore[no-untyped-def]
    return ipaddress.ip_interface(v.address).ip


def file_check(path: Path, fall: int = 2, rise: int = 2) -> dict:
    """A command check that passes while `path` exists: tests flip health by touching files."""
    return {"type": "command", "command": ["/usr/bin/test", "-e", str(path)], "interval": 0.2, "timeout": 0.2,
            "rise": rise, "fall": fall}


wait_for = functools.partial(util.wait_for, interval=0.05)  # these tests poll every 50 ms


def test_failing_check_moves_vip_and_host_returns_after_rise(lab, make_cluster, tmp_path):
    flags = {h.name: tmp_path / f"{h.name}.ok" for h in lab.hosts}
    for f in flags.values():
        f.touch()
    vips = [VipDef("api", str(lab.vip4(0)))]
    c = make_cluster(vips, start=False)  # each host checks its own flag file
    for h in lab.hosts:
        c.vips = [VipDef("api", str(lab.vip4(0)), extra={"check": [file_check(flags[h.name])]})]
        c.start(h)
    old = c.wait_owner(ip_of(vips[0]), timeout=10)
    t0 = time.monotonic()
    flags[old].unlink()  # the service behind the VIP dies on the owner; the host itself is fine
    new = c.wait_owner(ip_of(vips[0]), exclude=[old], timeout=5)
    assert time.monotonic() - t0 < 2.0
    log = c.log_path(c.host(old)).read_text()
    assert re.search(r'event=transition vip=api .*from=owner to=releasing reason="unhealthy', log), log[-1500:]
    status = c.run_cli(c.host(new), "status")
    assert re.search(rf"^{old}\s+healthy\s+1\s+-\s+api: .*exit status 1", status.stdout, re.M), status.stdout
    # back after `rise` passes: a candidate again (visible in status), but no preemption here
    flags[old].touch()
    wait_for(lambda: re.search(rf"^{old}\s+healthy\s+1\s+-\s+-$", c.run_cli(c.host(new), "status").stdout, re.M),
             5, "old owner a candidate again in status")
    assert lab.holders(ip_of(vips[0])) == [new]


def test_flapping_check_within_hysteresis_moves_nothing(lab, make_cluster, tmp_path):
    flags = {h.name: tmp_path / f"{h.name}.ok" for h in lab.hosts}
    for f in flags.values():
        f.touch()
    c = make_cluster([], start=False)
    for h in lab.hosts:
        c.vips = [VipDef("api", str(lab.vip4(0)), extra={"check": [file_check(flags[h.name], fall=4)]})]
        c.start(h)
    owner = c.wait_owner(lab.vip4(0).ip, timeout=10)
    for _ in range(4):  # fail one or two check runs (0.2 s apart), never four in a row
        flags[owner].unlink()
        time.sleep(0.25)
        flags[owner].touch()
        time.sleep(0.5)
    assert lab.holders(lab.vip4(0).ip) == [owner]
    assert "to=releasing" not in c.log_path(c.host(owner)).read_text()


def _spread(lab, vips) -> collections.Counter:  # type: ignore[no-untyped-def]
    owners = collections.Counter()
    for v in vips:
        hs = lab.holders(ip_of(v))
        owners[hs[0] if len(hs) == 1 else "?"] += 1
    return owners


def test_thirty_vips_spread_over_three_hosts_and_a_lost_host_spreads_its_share(lab, make_cluster):
    vips = [VipDef(f"v{i:02d}", f"{lab.vip4(0).network.network_address + 100 + i}/24",
                   extra={"conflict_check": False}) for i in range(30)]
    c = make_cluster(vips, monitor=False, placement={"preempt": True, "preempt_delay": 1.0})
    wait_for(lambda: all(8 <= _spread(lab, vips)[h.name] <= 12 for h in lab.hosts), 40,
             f"10 +- 2 VIPs per host")
    spread = _spread(lab, vips)
    print("placement spread with 3 hosts and 30 VIPs:", dict(spread))
    victim = lab.hosts[2]
    lost = [v for v in vips if lab.holders(ip_of(v)) == [victim.name]]

    def successors() -> set[str]:  # the victim's successors, as it names them (vipd status)
        out = c.run_cli(victim, "status", "--json")
        rows = json.loads(out.stdout)["vips"] if out.returncode == 0 else []
        return {r["successor"] for r in rows if r.get("owner") == victim.name and r.get("successor")}

    # successors spread by placement too, once the ranking settled (a successor named while the
    # others started is kept until a better-ranked one has been nameable for a second)
    wait_for(lambda: successors() == {lab.hosts[0].name, lab.hosts[1].name}, 15, "the victim's successors spread")
    lost = [v for v in vips if lab.holders(ip_of(v)) == [victim.name]]
    c.kill(victim)
    wait_for(lambda: all(len(lab.holders(ip_of(v))) == 1 and victim.name not in lab.holders(ip_of(v))
                         for v in vips), 15, "the lost host's VIPs taken over")
    moved = collections.Counter(lab.holders(ip_of(v))[0] for v in lost)
    assert set(moved) == {lab.hosts[0].name, lab.hosts[1].name}, moved  # spread, not dumped on one host
    assert _spread(lab, vips)[victim.name] == 0


@pytest.mark.parametrize("batch", [1, 256])
def test_returning_preferred_host_gets_vips_back_after_delay_in_batches(lab, make_cluster, batch):
    """After the delay; with `handover_batch = 1` each giving host hands over one VIP at a time, with
    the default (256) a host giving several hands them over together."""
    vips = [VipDef(f"p{i}", f"{lab.vip4(0).network.network_address + 120 + i}/24",
                   extra={"prefer": ["h3"], "conflict_check": False}) for i in range(4)]
    delay = 2.0
    c = make_cluster(vips, placement={"preempt": True, "preempt_delay": delay, "handover_batch": batch}, start=False)
    h3 = c.host("h3")
    for h in lab.hosts[:2]:
        c.start(h)
    for v in vips:
        c.wait_owner(ip_of(v), timeout=10)
    assert all(lab.holders(ip_of(v)) != ["h3"] for v in vips)
    c.start(h3)
    wait_for(lambda: "event=ready" in c.log_path(h3).read_text(), 10, "h3 ready")
    t_ready = time.monotonic()
    time.sleep(delay - 0.5)
    assert all(lab.holders(ip_of(v)) != ["h3"] for v in vips), "handed back before preempt_delay"
    wait_for(lambda: all(lab.holders(ip_of(v)) == ["h3"] for v in vips), 15, "all preferred VIPs on h3")
    arrivals = sorted(t for v in vips for t, before, after in c.monitor.owner_changes(ip_of(v))
                      if "h3" in after and "h3" not in before)
    assert arrivals[0] - t_ready >= delay - 0.3
    givers = collections.defaultdict(list)
    for h in lab.hosts[:2]:
        for line in c.log_path(h).read_text().splitlines():
            if "event=handover_to_preferred" in line:
                givers[h.name].append(line)
    assert sum(len(lines) for lines in givers.values()) == len(vips)
    overlapped = []  # hosts that started a second handover before the first finished
    for name, lines in givers.items():
        log = c.log_path(c.host(name)).read_text()
        starts = [m.start() for m in re.finditer("event=handover_to_preferred", log)]
        overlapped += [name for a, b in zip(starts, starts[1:]) if "to=backup" not in log[a:b]]
    if batch == 1:
        assert overlapped == [], f"{overlapped} started a second handover before the first finished"
    else:  # 4 VIPs on 2 hosts: one gave at least two, at once
        assert overlapped, givers


def test_foreign_machine_answering_arp_keeps_vip_unclaimed(lab, make_cluster):
    vip = lab.vip4(7)
    # the client namespace plays a foreign machine that already uses the address
    lab.ip(lab.client, "addr", "add", str(vip), "dev", lab.client.ifname)
    c = make_cluster([VipDef("api", str(vip))])
    h = lab.hosts[0]
    wait_for(lambda: "event=address_conflict" in c.log_path(h).read_text(), 10, "conflict logged")
    assert lab.holders(vip.ip) == []
    log = c.log_path(h).read_text()
    assert lab.client.mac in log, "the log must name the MAC that answered"
    assert re.search(r'vipd_address_conflicts_total\{vip="api"\} [1-9]', c.metrics(h))
    lab.ip(lab.client, "addr", "del", str(vip), "dev", lab.client.ifname)
    c.wait_owner(vip.ip, timeout=20)  # retried with back-off once the address is free


def test_a_starting_daemon_probes_each_free_nic_vip_once(lab, make_cluster, tmp_path):
    """The start probe through the daemon (vipd/dataplane/start_probe.py): one round at start
    probes every NIC VIP, and the claims take its answer instead of probing again. On the wire (the
    client's NIC, tcpdump): each IPv4 VIP's RFC 5227 probe ("tell 0.0.0.0") exactly twice, the
    round's two; a claim that probed too would make it four."""
    vips = [VipDef(f"v{i}", str(lab.vip4(20 + i))) for i in range(4)]
    cap = Capture(lab, lab.client, tmp_path, "arp")
    try:
        c = make_cluster(vips, start=False)
        h = lab.hosts[0]
        c.start(h)
        for v in vips:
            c.wait_owner(ipaddress.ip_interface(v.address).ip, timeout=15)
        time.sleep(0.5)  # (any later probe would be on the wire by now)
    finally:
        lines = cap.stop()
    assert re.search(r"event=start_probe interfaces=1 free=4 answered=0 ", c.log_path(h).read_text())
    for v in vips:
        ip = str(ipaddress.ip_interface(v.address).ip)
        probes = [line for line in lines if f"who-has {ip} tell 0.0.0.0" in line]
        assert len(probes) == 2, (ip, probes)


def test_hooks_run_with_vip_environment(lab, make_cluster, tmp_path):
    out = tmp_path / "hooks"
    out.mkdir()
    script = tmp_path / "hook.sh"
    script.write_text(f"#!/bin/sh\nenv | grep ^VIPD_ | sort > {out}/$VIPD_NODE.$VIPD_EVENT.$$\n")
    script.chmod(0o755)
    c = make_cluster([VipDef("api", str(lab.vip4(0)))],
                     top_extra={"hooks": {"owner": [str(script)], "backup": [str(script)], "timeout": 5}})
    old = c.wait_owner(lab.vip4(0).ip)
    path = wait_for(lambda: [p for p in out.glob(f"{old}.owner.*") if "VIPD_VIP=" in p.read_text()], 5,
                    "owner hook ran")[0]
    env = dict(line.split("=", 1) for line in path.read_text().splitlines())
    assert env["VIPD_VIP"] == "api" and env["VIPD_ADDRESS"] == str(lab.vip4(0).ip)
    assert env["VIPD_INTERFACE"] == c.host(old).ifname and env["VIPD_NODE"] == old
    assert int(env["VIPD_EPOCH"]) > 0
    c.run_cli(c.host(old), "release", "api")
    wait_for(lambda: list(out.glob(f"{old}.backup.*")), 5, "backup hook ran on the old owner")


def test_duplicate_responder_while_owning_raises_the_alarm(lab, make_cluster):
    c = make_cluster([VipDef("api", str(lab.vip4(0)))])
    owner = c.host(c.wait_owner(lab.vip4(0).ip))
    time.sleep(0.5)  # our own announcements are done
    assert "duplicate_responder" not in c.log_path(owner).read_text()
    lab.announce(lab.client, lab.vip4(0).ip)  # a foreign machine claims the VIP with a gratuitous ARP
    wait_for(lambda: "event=duplicate_responder" in c.log_path(owner).read_text(), 5, "duplicate responder alarm")
    line = next(x for x in c.log_path(owner).read_text().splitlines() if "duplicate_responder" in x)
    assert lab.client.mac in line
    assert re.search(r'vipd_address_conflicts_total\{vip="api"\} [1-9]', c.metrics(owner))
    for h in lab.hosts:  # peers never raise it for each other's announcements
        if h is not owner:
            assert "duplicate_responder" not in c.log_path(h).read_text()



def test_a_key_handed_back_by_a_host_now_gone_is_taken_over_at_once(lab, lab_etcd, make_cluster):
    """A key marked released (its owner removed its address first, then marked it: a stop leaves it
    so for its lease's revoke, a hand-back for its delete) is as free as a deleted one: the first
    candidate takes it over ("took over a handed-back key") instead of waiting for the delete. Here
    the mark is written by hand on a lease the test keeps alive, as from a host whose revoke never
    comes: without the takeover no host would serve the VIP until that lease ran out."""
    import base64

    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    v = VipDef("hb", f"{lab.vip4(0).network.network_address + 150}/24", extra={"conflict_check": False})
    c = make_cluster([v], start=False)
    lease = lab_etcd.request("/v3/lease/grant", {"TTL": 120})["ID"]
    key = f"{c.prefix}vips/hb/owner"
    put = lab_etcd.request("/v3/kv/put", {"key": b64(key), "value": b64("hx released epoch=7"), "lease": lease})
    marked_at = int(put["header"]["revision"])
    c.start_all()
    wait_for(lambda: len(lab.holders(ip_of(v))) == 1, 10, "the VIP held")
    holder = lab.holders(ip_of(v))[0]
    kvs = lab_etcd.request("/v3/kv/range", {"key": b64(key)}).get("kvs", [])
    value = base64.b64decode(kvs[0]["value"]).decode() if kvs else ""
    assert value.split()[0] == holder and f"epoch={marked_at + 1}" in value.split(), value
    assert kvs[0].get("lease") != lease  # on the holder's own lease now
    log = c.log_path(c.host(holder)).read_text()
    assert 'vip=hb' in log and 'reason="took over a handed-back key"' in log

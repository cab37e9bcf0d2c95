"""A voluntary release whose owner-key delete meets an etcd blip must still hand the VIP over.

The old core left such a unit in RELEASING for good (its retry timer was never armed): the key
stayed alive on the host lease, no other host campaigned, and the VIP was unserved until the
daemon restarted. Real etcd, real kernel; the blip is an nftables partition host <-> etcd."""

from __future__ import annotations

import re
import time

from tests.lab.test_placement import file_check, ip_of
from vipd.lab.cluster import VipDef


def test_health_release_retries_the_key_delete_after_an_etcd_blip(lab, make_cluster, tmp_path):
    flags = {h.name: tmp_path / f"{h.name}.ok" for h in lab.hosts}
    for f in flags.values():
        f.touch()
    vip = VipDef("api", str(lab.vip4(0)))
    c = make_cluster([vip], start=False)
    for h in lab.hosts:
        c.vips = [VipDef("api", str(lab.vip4(0)), extra={"check": [file_check(flags[h.name])]})]
        c.start(h)
    old = c.wait_owner(ip_of(vip), timeout=10)
    host = c.host(old)
    lab.partition(host, [lab.etcd])  # etcd unreachable from the owner ...
    flags[old].unlink()  # ... just as its service fails: it releases, and the key delete fails
    log = c.log_path(host)
    deadline = time.monotonic() + 5
    while "owner_key_delete_failed" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    text = log.read_text()
    assert "owner_key_delete_failed" in text, text[-2000:]
    assert lab.holders(ip_of(vip)) == []  # the address went first: nobody serves during the blip
    lab.heal(host)  # etcd answers again: the retry gives the key back and another host takes over
    new = c.wait_owner(ip_of(vip), exclude=[old], timeout=10)
    assert new != old
    assert re.search(r"event=transition vip=api .*from=releasing to=backup", log.read_text())

"""1,000 VIPs on a NIC (IPv4 and IPv6) and 1,000 on lo, one host, one etcd, vipd as systemd runs it
with the shipped timing: every VIP present, then a minute of sitting still without a single expiry,
re-add, fence or failed etcd request, and nothing left behind after SIGTERM. Behaviour only: the
times are measured by bench/scale.py."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Callable

from vipd.config import TimingConfig
from vipd.lab.cluster import Cluster
from vipd.lab.scale import log_events, scale_vips, tagged_addresses, trouble, vip_ips
from vipd.lab.topology import Lab

N = 1000
STILL = 60.0  # seconds the settled host must sit still


def test_thousand_vips_settle_sit_still_and_leave_nothing(lab: Lab, make_cluster: Callable[..., Cluster]) -> None:
    vips = scale_vips(N, N)
    wanted = vip_ips(vips)
    h = lab.hosts[0]
    # one host; the address monitor would poll 2,000 addresses: the tagged dumps below do the checking
    c = make_cluster(vips, start=False, monitor=False, timing=asdict(TimingConfig()))
    c.start(h)
    deadline = time.monotonic() + 60  # generous (the goal is 1.5 s): the machine is shared
    while not wanted <= tagged_addresses(h.ns):
        assert time.monotonic() < deadline, f"{len(wanted - tagged_addresses(h.ns))} VIPs missing\n{c.log_tail()}"
        assert c.procs[h.name].poll() is None, c.log_tail()
        time.sleep(0.2)
    until = time.monotonic() + STILL
    while time.monotonic() < until:
        missing = wanted - tagged_addresses(h.ns)
        assert not missing, f"{len(missing)} VIPs gone while sitting still, e.g. {sorted(map(str, missing))[:3]}"
        time.sleep(0.5)
    assert trouble(log_events(c.log_path(h))) == {}  # from the start: no expiry, re-add, fence, failed request
    assert c.term(h, timeout=30) == 0
    assert tagged_addresses(h.ns) & wanted == set()

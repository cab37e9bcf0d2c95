"""`vipd drain` / `vipd undrain` (issue 12): every VIP of the drained host moves with at most one
planned gap per VIP for a client probing it (the successor is ready before the address goes); the
host stays ineligible, across a daemon restart, even as the preferred host with preemption on,
until `vipd undrain`."""

from __future__ import annotations

import ipaddress
import time

from tests.lab.util import wait_for
from vipd.lab.cluster import VipDef
from vipd.lab.probe import Probe


def _ip(v: VipDef):  # type: ignore[no-untyped-def]
    return ipaddress.ip_interface(v.address).ip


def test_drain_hands_everything_over_once_and_survives_a_restart(lab, make_cluster):
    first = lab.hosts[0].name
    vips = [VipDef("api", str(lab.vip4(0)), extra={"prefer": [first]}),
            VipDef("web", str(lab.vip4(1)), extra={"prefer": [first]})]
    c = make_cluster(vips, placement={"preempt": True, "preempt_delay": 1.0})
    h = c.host(first)
    for v in vips:
        c.wait_owner(_ip(v), timeout=20)
        c.wait_holders(_ip(v), lambda hs: hs == [first], timeout=20)
    probes = [Probe(lab, _ip(v)).start() for v in vips]
    try:
        for p in probes:
            assert p.wait_responder(first, timeout=5), p.summary()
        t0 = time.monotonic()
        r = c.run_cli(h, "drain", "--node", first, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "api: handed over to" in r.stdout and "web: handed over to" in r.stdout, r.stdout
        for v in vips:
            assert first not in lab.holders(_ip(v))
            c.wait_owner(_ip(v), exclude=[first], timeout=5)
        for p in probes:
            new = lab.holders(p.ip)[0]
            assert p.wait_responder(new, timeout=5), p.summary()
            gaps = p.outages(since=t0)
            # one planned handover per VIP: at most one gap, from the drained host to its successor
            assert len(gaps) <= 1, gaps
            assert all(g.before_host == first and g.after_host == new for g in gaps), gaps
    finally:
        for p in probes:
            p.stop()
    others = [x for x in lab.hosts if x.name != first]
    st = c.run_cli(others[0], "status")
    assert st.returncode == 0 and any(line.startswith(first) and "drained" in line for line in st.stdout.splitlines()), \
        st.stdout
    # drained across a restart: preferred and preemption on, it still takes nothing
    assert c.term(h) == 0
    c.start(h)
    wait_for(lambda: "event=ready" in c.log_path(h).read_text(), 15, "restarted")
    time.sleep(1.0 + c.timing["release_holdoff"] + c.lease_ttl)  # preempt_delay, hold-off, a lease period
    for v in vips:
        assert first not in lab.holders(_ip(v)), c.log_tail()
    assert "drained" in c.log_path(h).read_text()
    # a wrong --node is refused, nothing changed
    r = c.run_cli(h, "drain", "--node", others[0].name)
    assert r.returncode == 2 and "is not this host" in r.stderr
    # undrain: eligible again; preemption brings both back to the preferred host
    r = c.run_cli(h, "undrain")
    assert r.returncode == 0 and "eligible again" in r.stdout, r.stdout + r.stderr
    for v in vips:
        c.wait_holders(_ip(v), lambda hs: hs == [first], timeout=20)

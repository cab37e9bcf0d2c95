"""Deleting the NIC a VIP lives on (issue 12, case 2): only its VIPs become unavailable (released on
every host that lost it, not claimed, the reason in `vipd state`), they come back when the NIC
returns, the other VIPs keep their owner, and no daemon dies."""

from __future__ import annotations

import ipaddress
import json
import time

from tests.lab.util import wait_for
from vipd.lab.cluster import VipDef

NIC = "vtnic0"  # a second NIC on every host (a veth pair inside the host: deleting it cuts nobody off etcd)
NIC_VIP = "10.231.0.10/32"


def _add_nic(lab, h) -> None:  # type: ignore[no-untyped-def]
    lab.ip(h, "link", "add", NIC, "type", "veth", "peer", "name", NIC + "p")
    lab.ip(h, "link", "set", NIC + "p", "up")
    lab.ip(h, "link", "set", NIC, "up")


def _state(c, h) -> dict:  # type: ignore[no-untyped-def]
    r = c.run_cli(h, "state")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_deleting_a_vips_nic_makes_only_its_vips_unavailable(lab, make_cluster):
    for h in lab.hosts:
        _add_nic(lab, h)
    main = VipDef("api", str(lab.vip4(0)))
    onnic = VipDef("side", NIC_VIP, interface=NIC)
    c = make_cluster([main, onnic])
    side_ip = ipaddress.ip_interface(NIC_VIP).ip
    main_ip = ipaddress.ip_interface(main.address).ip
    owner = c.wait_owner(main_ip)
    side_owner = c.wait_owner(side_ip)
    # the NIC goes away on every host: nobody can serve "side", "api" is untouched
    for h in lab.hosts:
        lab.ip(h, "link", "del", NIC)
    time.sleep(c.lease_ttl)  # several reconcile rounds and lease periods
    assert lab.holders(side_ip) == []
    for h in lab.hosts:
        assert c.procs[h.name].poll() is None, f"{h.name} died:\n{c.log_tail()}"
        st = _state(c, h)["side"]
        assert st["state"] == "backup", st
        assert NIC in (st.get("unavailable") or ""), st
    assert lab.holders(main_ip) == [owner]
    assert not [t for t, before, after in c.monitor.owner_changes(main_ip) if owner in before]
    log = c.log_path(c.host(side_owner)).read_text()
    assert "event=interface_missing" in log
    assert "Traceback" not in log
    # it comes back with the NIC
    for h in lab.hosts:
        _add_nic(lab, h)
    c.wait_owner(side_ip, timeout=10)
    wait_for(lambda: all(_state(c, h)["side"].get("unavailable") in (None, "") for h in lab.hosts), 5,
             "'side' available again everywhere")
    assert lab.holders(main_ip) == [owner]
    assert not [t for t, before, after in c.monitor.owner_changes(main_ip) if owner in before]


def test_a_missing_nic_at_start_is_not_fatal(lab, make_cluster):
    """Under the unit a restart while the NIC is gone must start (its VIPs unavailable), not fail."""
    main = VipDef("api", str(lab.vip4(0)))
    onnic = VipDef("side", NIC_VIP, interface=NIC)
    c = make_cluster([main, onnic], start=False)
    h = lab.hosts[0]
    r = c.run_cli(h, "check") if c.write_config(h) else None
    assert r is not None and r.returncode == 2 and f"no interface '{NIC}'" in r.stderr, r.stderr if r else ""
    r = c.run_cli(h, "check", "--allow-missing-interfaces")
    assert r.returncode == 0 and f"'{NIC}'" in r.stdout, r.stdout + r.stderr
    c.start(h)
    side_ip = ipaddress.ip_interface(NIC_VIP).ip
    c.wait_owner(ipaddress.ip_interface(main.address).ip)
    wait_for(lambda: NIC in (_state(c, h)["side"].get("unavailable") or ""), 5, "side reported unavailable")
    assert lab.holders(side_ip) == []
    _add_nic(lab, h)
    assert c.wait_owner(side_ip, timeout=10) == h.name

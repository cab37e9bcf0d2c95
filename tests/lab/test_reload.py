"""SIGHUP / `vipd reload` (issue 12, case 3): every kind of setting changes at once on every host;
the unchanged VIP (and the one only retuned) sees no transition and no owner change, removed VIPs
are released, a VIP whose address changed moves, a new VIP gets an owner; an invalid config and a
setting that needs a restart are refused with one line naming the key, and change nothing."""

from __future__ import annotations

import ipaddress
import re
import signal

from tests.lab.util import wait_for
from vipd.dataplane.fence_build import TABLE, chain_names
from vipd.lab.cluster import VipDef
from vipd.lab.monitor import AddressMonitor


def _ip(v: VipDef):  # type: ignore[no-untyped-def]
    return ipaddress.ip_interface(v.address).ip


def _transitions(c, vip: str) -> int:  # type: ignore[no-untyped-def]
    return sum(len(re.findall(rf"event=transition vip={vip} ", c.log_path(h).read_text())) for h in c.lab.hosts)


def _count(c, what: str) -> int:  # type: ignore[no-untyped-def]
    return sum(c.log_path(h).read_text().count(what) for h in c.lab.hosts)


def test_reload_applies_every_kind_of_change_and_never_touches_an_unchanged_vip(lab, make_cluster):
    keep, tune = VipDef("keep", str(lab.vip4(0))), VipDef("tune", str(lab.vip4(1)))
    move, gone = VipDef("move", str(lab.vip4(2))), VipDef("gone", str(lab.vip4(3)))
    c = make_cluster([keep, tune, move, gone])
    moved, new = VipDef("move", str(lab.vip4(5))), VipDef("new", str(lab.vip4(4)))
    extra = AddressMonitor(lab, [_ip(moved), _ip(new)]).start()
    try:
        owners = {v.name: c.wait_owner(_ip(v)) for v in (keep, tune, move, gone)}
        # (the address is in the kernel a moment before the owner logs its ACQUIRING -> OWNER
        # transition: counted before that line, the reload below was blamed for it)
        for v in (keep, tune):
            wait_for(lambda: re.search(rf"event=transition vip={v.name} .*to=owner",
                                       c.log_path(c.host(owners[v.name])).read_text()), 5, f"{v.name} owned")
        before = {v: _transitions(c, v) for v in ("keep", "tune")}
        changes = {v.name: len(c.monitor.owner_changes(_ip(v))) for v in (keep, tune)}

        # every kind of setting: VIPs added, removed, readdressed, retuned (a check, announcements,
        # placement preference), live timing, placement, host weight, hooks
        tune.extra = {"check": [{"type": "tcp", "host": str(lab.etcd_ip), "port": 2379}], "announce_count": 2,
                      "prefer": [owners["tune"]]}
        c.vips = [keep, tune, moved, new]
        c.timing["release_holdoff"] = 1.0
        c.timing["reconcile_interval"] = 0.4
        c.placement["preempt_delay"] = 7.0
        c.placement["handover_batch"] = 8
        c.host_extra = {h.name: {"weight": 2.0} for h in lab.hosts}
        c.top_extra = {"hooks": {"owner": ["/bin/true"], "timeout": 5}}
        for h in lab.hosts:
            c.write_config(h)
            c.signal(h, signal.SIGHUP)
        wait_for(lambda: _count(c, "event=reloaded") == 3, 15, "every host reloaded")
        c.wait_holders(_ip(gone), lambda hs: hs == [], timeout=10)
        c.wait_holders(_ip(move), lambda hs: hs == [], timeout=10)
        c.wait_owner(_ip(moved), timeout=15)
        c.wait_owner(_ip(new), timeout=15)
        wait_for(lambda: "tune" in c.run_cli(c.host(owners["tune"]), "state").stdout, 5, "state answers")

        # nothing happened to the unchanged and the retuned VIP: same owner all along, no transition
        for v in (keep, tune):
            assert lab.holders(_ip(v)) == [owners[v.name]]
            assert len(c.monitor.owner_changes(_ip(v))) == changes[v.name], c.monitor.owner_changes(_ip(v))
            assert _transitions(c, v.name) == before[v.name], c.log_tail()
        for h in lab.hosts:
            assert c.procs[h.name].poll() is None, c.log_tail()

        # an invalid config: refused with one line naming the key; the running config stays
        bad = c.config_path(lab.hosts[0])
        good = bad.read_text()
        bad.write_text(good + "\n[bogus]\nkey = 1\n")
        c.signal(lab.hosts[0], signal.SIGHUP)
        wait_for(lambda: "event=reload_refused key=bogus" in c.log_path(lab.hosts[0]).read_text(), 10,
                 "the invalid config refused")
        # a setting only a restart can change: refused too, by `vipd reload` (exit 2, one line)
        bad.write_text(good.replace("lease_ttl = 3", "lease_ttl = 5"))
        r = c.run_cli(lab.hosts[0], "reload", timeout=40)
        assert r.returncode == 2, r.stdout + r.stderr
        assert re.fullmatch(r"vipd reload: refused: etcd: cannot change while running; restart vipd.*\n", r.stderr)
        assert "Traceback" not in c.log_path(lab.hosts[0]).read_text()
        # ... and a good one through the command: nothing changed, nothing touched
        bad.write_text(good)
        r = c.run_cli(lab.hosts[0], "reload", timeout=40)
        assert r.returncode == 0 and "nothing changed" in r.stdout, r.stdout + r.stderr
        for v in (keep, tune):
            assert lab.holders(_ip(v)) == [owners[v.name]]
            assert _transitions(c, v.name) == before[v.name]
        assert lab.holders(_ip(gone)) == [] and lab.holders(_ip(move)) == []
        assert len(lab.holders(_ip(new))) == 1 and len(lab.holders(_ip(moved))) == 1
    finally:
        extra.stop()
    extra.assert_never_dual()


def _rows(c, host) -> dict:  # type: ignore[no-untyped-def]
    import json
    out = c.run_cli(host, "status", "--json")
    assert out.returncode == 0, out.stderr
    return {r["vip"]: r for r in json.loads(out.stdout)["vips"]}


def test_a_vip_a_reload_adds_on_an_interface_not_there_yet_is_token_fenced_once_it_appears(lab, make_cluster):
    """The reload adds a VIP on an interface that does not exist yet. This kernel (>= 6.16) hooks
    the token fence's chains on a device that appears later, so the fence update succeeds and,
    once the interface is there, the VIP is owned behind a token with a successor named (fast
    takeover). The VIP already running keeps its owner all along, without a transition. (Where the
    update fails, older kernels, the new VIP stays outside the token fence: covers() is False
    for it, so it never arms a token or gets a successor: tests/lab/test_fence_nft.py.)"""
    keep = VipDef("keep", str(lab.vip4(0)))
    c = make_cluster([keep])
    owner = c.wait_owner(_ip(keep))
    wait_for(lambda: bool(_rows(c, c.host(owner))["keep"].get("successor")), 20, "keep's successor named",
             interval=0.3)
    changes = len(c.monitor.owner_changes(_ip(keep)))
    transitions = _transitions(c, "keep")
    late = VipDef("late", str(lab.vip4(6)), interface="vtlate0")
    c.vips = [keep, late]
    try:
        for h in lab.hosts:
            c.write_config(h)
            c.signal(h, signal.SIGHUP)
        wait_for(lambda: _count(c, "event=reloaded") == 3, 15, "every host reloaded")
        for h in lab.hosts:
            lab.ip(h, "link", "add", "vtlate0", "type", "veth", "peer", "name", "vtlate1")
            lab.ip(h, "link", "set", "vtlate1", "up")
            lab.ip(h, "link", "set", "vtlate0", "up")
        got: dict = {}

        def late_named() -> bool:
            for h in lab.hosts:
                r = _rows(c, h).get("late", {})
                if r.get("owner") == h.name and r.get("successor"):
                    got.update(r)
                    return True
            return False
        wait_for(late_named, 20, "the new VIP owned, its successor named", interval=0.3)
        nft = lab.run(c.host(got["owner"]).ns, ["nft", "list", "chain", "netdev", TABLE, chain_names("vtlate0")[0]])
        assert "vtlate0" in nft.stdout, nft.stdout
        assert _count(c, "event=fence_update_failed") == 0 and _count(c, "event=fence_arm_failed") == 0, c.log_tail()
        # the VIP already running never moved: no host but its owner held it (a gap with no holder,
        # behind a lapsed grant, is not ruled out here: bench/reload_gaps.py counts them, 0 of 30)
        assert lab.holders(_ip(keep)) == [owner]
        assert {h for _, _, now in c.monitor.owner_changes(_ip(keep))[changes:] for h in now} <= {owner}, \
            c.monitor.owner_changes(_ip(keep))
        assert _transitions(c, "keep") == transitions, c.log_tail()
    finally:
        for h in lab.hosts:
            lab.run(h.ns, ["ip", "link", "del", "vtlate0"], check=False)

"""DSR in a lab: a client, two directors and three backends on one segment (L2 VIP), and an anycast
VIP behind the lab's BIRD router with ECMP. The ownership core is replaced by vipd.lab.dsr_node's
commands (`own`, `release`), so each test decides when ownership moves; the director, its fence,
the backend role and the tables are vipd's own code (vipd.dsr.service.DsrService)."""

from __future__ import annotations

import ipaddress
import json
import re
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from vipd.dsr import maglev
from vipd.lab import netns
from vipd.lab.dsr import PORT, Capture, Node, app_argv, config_toml, peers_seen, start_servers
from vipd.lab.topology import Host, Lab

pytestmark = pytest.mark.needs_tools("clang", "tcpdump", "arping")


@pytest.fixture
def lab5() -> Iterator[Lab]:
    with Lab("vt" + secrets.token_hex(2), n_hosts=5) as lab:
        yield lab


def wait_for(what: str, cond: Any, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Stream:
    """The client's long download through the VIP (vipd.lab.dsr_apps stream)."""

    def __init__(self, lab: Lab, client: Host, vip: str, workdir: Path, sport: int = 0) -> None:
        self.log = workdir / f"stream-{time.monotonic_ns()}.log"
        self.proc = lab.popen(client, app_argv("stream", vip, str(PORT), str(sport)), log=self.log.with_suffix(".err"),
                              stdout=open(self.log, "wb"))

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.log.read_text().splitlines() if x.startswith("{")]

    def bytes(self) -> int:
        ls = [x for x in self.lines() if "bytes" in x]
        return ls[-1]["bytes"] if ls else 0

    def backend(self) -> str:
        return str(wait_for("the stream's first bytes", lambda: self.bytes() and self.lines()[-1]["backend"]))

    def advances(self, by: int = 200_000, timeout: float = 20.0) -> None:
        start = self.bytes()
        wait_for(f"the stream to carry {by} more bytes", lambda: self.bytes() >= start + by or self.finished(), timeout)
        assert not self.finished(), self.lines()[-1]

    def finished(self) -> bool:
        return any("done" in x for x in self.lines())

    def stop(self) -> dict[str, Any]:
        self.proc.terminate()
        self.proc.wait(10)
        return next(x for x in self.lines() if "done" in x)


def nic_holders(lab: Lab, ip: Any) -> list[str]:
    """Hosts holding `ip` on their NIC (backends hold it on lo, index 1)."""
    return [h.name for h in lab.hosts if any(a.ip == ip and a.ifindex != 1 and a.usable for a in lab.addresses(h))]


def fan(lab: Lab, client: Host, vip: str, n: int) -> dict[str, Any]:
    out = lab.run(client, app_argv("fan", vip, str(PORT), str(n)), timeout=120).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def test_l2_dsr_spreads_preserves_the_client_and_survives_move_and_sigkill(lab5: Lab, tmp_path: Path) -> None:
    lab = lab5
    client, directors, backends = lab.client, lab.hosts[:2], lab.hosts[2:]
    vip = lab.vip4(0)
    nodes = {h.name: Node(lab, h, tmp_path, config_toml(h.name, str(vip), lab.nic, backends)) for h in lab.hosts}
    for n in nodes.values():
        assert n.ready["unavailable"] is None and n.ready["refused"] is None, n.ready
    for b in backends:  # the backend role: VIP on lo, ARP sysctls
        assert lab.run(b, ["sysctl", "-n", "net.ipv4.conf.all.arp_ignore"]).stdout.strip() == "1"
        assert lab.run(b, ["sysctl", "-n", "net.ipv4.conf.all.arp_announce"]).stdout.strip() == "2"
        assert f"{vip.ip}/32" in lab.ip(b, "-4", "addr", "show", "dev", "lo").stdout
    everyone = ",".join(h.name for h in lab.hosts)
    for n in nodes.values():
        n.cmd(f"hosts {everyone}")
    logs = start_servers(lab, backends, tmp_path)
    h1, h2 = nodes["h1"], nodes["h2"]
    h1.cmd("own 2")
    assert nic_holders(lab, vip.ip) == ["h1"]  # a backend never holds the VIP on its NIC, nor answers ARP for it
    st = h1.cmd("status")
    assert st["attached"] == {lab.nic: True} and st["covered"]
    assert {b["backend"]: b["state"] for b in st["services"][0]["backends"]} == {b.name: "active" for b in backends}

    # 200 connections spread over the three backends: 66.7 each expected, binomial sd 6.7; accept 40..95 (4 sd)
    res = fan(lab, client, str(vip.ip), 200)
    assert res["errors"] == 0 and sum(res["backends"].values()) == 200, res
    assert set(res["backends"]) == {b.name for b in backends}, res
    assert all(40 <= c <= 95 for c in res["backends"].values()), res
    for b in backends:  # every backend saw the client's own address, never the director's
        assert set(peers_seen(logs[b.name])) == {str(client.ip.ip)}
    st = h1.cmd("status")
    assert st["reasons"]["directed"] >= 200 * 3  # SYN, ACK, data, FIN ... of 200 connections
    traffic = {b["backend"]: b["packets"] for b in st["services"][0]["backends"]}
    assert all(traffic[b.name] > 0 for b in backends), traffic
    text = h1.cmd("metrics")["text"]
    for b in backends:
        m = re.search(rf'vipd_dsr_backend_packets_total{{backend="{b.name}",service="tcp/{PORT}",vip="web"}} (\S+)', text)
        assert m and float(m[1]) == traffic[b.name], text
    assert f'vipd_dsr_program_attached{{interface="{lab.nic}"}} 1.0' in text
    assert re.search(r'vipd_dsr_frames_total{reason="directed",verdict="directed"} (\d+)', text)
    m = re.search(rf'vipd_dsr_table_generation{{service="tcp/{PORT}",vip="web"}} (\S+)', text)
    assert m and float(m[1]) == st["services"][0]["generation"] >= 1, text
    # someone deletes vipd's filter: the next reconcile puts it back
    lab.run(directors[0], ["tc", "filter", "del", "dev", lab.nic, "ingress"])
    wait_for("the filter to come back", lambda: "vipd_dsr" in lab.run(directors[0], ["tc", "filter", "show", "dev", lab.nic, "ingress"]).stdout)

    # tcpdump: replies leave the backend straight to the client (backend MAC -> client MAC), VIP as source;
    # the director sees the client's packets only
    caps = {h.name: Capture(lab, h, tmp_path, f"tcp port {PORT}") for h in (*directors[:1], *backends)}
    stream = Stream(lab, client, str(vip.ip), tmp_path)
    served_by = lab.host(stream.backend())
    stream.advances()
    lines = {name: c.stop() for name, c in caps.items()}
    seen = {name: [_parse(x) for x in ls] for name, ls in lines.items()}
    vip_src, client_src = f"{vip.ip}.{PORT}", str(client.ip.ip)
    replies = [p for p in seen[served_by.name] if p[2] == vip_src and p[3].startswith(client_src + ".")]
    assert replies, lines[served_by.name][:5]
    assert all(p[:2] == (served_by.mac, client.mac) for p in replies), replies[:3]  # backend MAC -> client MAC
    requests = [p for p in seen[served_by.name] if p[2].startswith(client_src + ".") and p[3] == vip_src]
    assert requests, lines[served_by.name][:5]
    assert all(p[:2] == (directors[0].mac, served_by.mac) for p in requests), requests[:3]  # forwarded by h1
    assert not [p for p in seen["h1"] if p[2] == vip_src], "a reply passed through the director"
    assert [p for p in seen["h1"] if p[3] == vip_src and p[:2] == (client.mac, directors[0].mac)]

    # planned move h1 -> h2: the stream keeps flowing to the same backend
    wait_for("h2 to resolve every backend's MAC", lambda: all(b["mac"] for b in h2.cmd("status")["services"][0]["backends"]))
    h1.cmd("release")
    h2.cmd("own 2")
    stream.advances()
    assert nic_holders(lab, vip.ip) == ["h2"]
    # owner SIGKILL: h2's address and fence run out by themselves; h1 takes over once the VIP is gone
    h2.kill()
    wait_for("h2's VIP to expire", lambda: nic_holders(lab, vip.ip) == [], timeout=10)
    assert "vipd_dsr" in lab.run(directors[1], ["tc", "filter", "show", "dev", lab.nic, "ingress"]).stdout  # still attached ...
    # ... but no longer directing: a frame to h2's MAC for the VIP reaches no backend (its deadline passed)
    assert not _directed_via(lab, client, directors[1], vip, backends, tmp_path, sport=33333)
    h1.cmd("own 2")
    stream.advances()
    assert _directed_via(lab, client, directors[0], vip, backends, tmp_path, sport=33334)  # the control: h1 directs
    done = stream.stop()
    assert done["error"] is None and done["backend"] == served_by.name, done

    # a backend leaves the host directory: it leaves the table (its flows only: see test_dsr_prog)
    h1.cmd(f"hosts {','.join(h.name for h in lab.hosts if h.name != 'h5')}")
    st = h1.cmd("status")["services"][0]
    assert {b["backend"]: b["state"] for b in st["backends"]}["h5"] == "absent"
    res = fan(lab, client, str(vip.ip), 30)
    assert res["errors"] == 0 and set(res["backends"]) <= {"h3", "h4"}, res

    # stop: everything of DSR is gone, the ARP sysctls are back; the SIGKILLed h2 left its filter
    # (harmless: its deadline passed), which the next start on h2 replaces and its stop removes
    for n in nodes.values():
        n.stop()
    assert "vipd_dsr" in lab.run(directors[1], ["tc", "filter", "show", "dev", lab.nic, "ingress"]).stdout
    Node(lab, directors[1], tmp_path / "again", config_toml("h2", str(vip), lab.nic, backends)).stop()
    for h in lab.hosts:
        assert "vipd_dsr" not in lab.run(h, ["tc", "filter", "show", "dev", lab.nic, "ingress"]).stdout
    for b in backends:
        assert lab.run(b, ["sysctl", "-n", "net.ipv4.conf.all.arp_ignore"]).stdout.strip() == "0"
        assert f"{vip.ip}/32" not in lab.ip(b, "-4", "addr", "show", "dev", "lo").stdout


_TCPDUMP_RE = re.compile(r"^\S+ (\S+) > (\S+), .*?: (\S+) > (\S+?):")


def _parse(line: str) -> tuple[str, str, str, str]:
    """(source MAC, destination MAC, source ip.port, destination ip.port) of a `tcpdump -e -n` line."""
    m = _TCPDUMP_RE.match(line)
    assert m, line
    return m.group(1), m.group(2), m.group(3), m.group(4)


def _directed_via(lab: Lab, client: Host, director: Host, vip: ipaddress.IPv4Interface, backends: list[Host],
                  workdir: Path, sport: int) -> bool:
    """Send 3 SYNs to VIP:PORT at `director`'s MAC from the client; True when any backend receives one."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    caps = [Capture(lab, b, workdir, f"tcp src port {sport}") for b in backends]
    frame = bytes(Ether(src=client.mac, dst=director.mac) / IP(src=str(client.ip.ip), dst=str(vip.ip))
                  / TCP(sport=sport, dport=PORT, flags="S", seq=1))
    netns.send_frames(client.ns, client.ifname, frame, 3, 0.05)
    time.sleep(0.3)  # let the frames cross the bridge before the captures stop (not an assertion on time)
    return any(c.stop() for c in caps)


@pytest.mark.needs_tools("bird", "birdc")
def test_anycast_dsr_behind_ecmp_survives_the_loss_of_a_director(lab: Lab, tmp_path: Path) -> None:
    """Every host directs and serves; BIRD announces the VIP from each to the router, which spreads
    flows with ECMP (L4 hash). A stream whose router-chosen director is not its backend survives that
    director's death: the router re-hashes the flow to another director, which computes the same
    backend from the same table."""
    from vipd.lab.bgp import BgpLab, kernel_nexthops

    bgp = BgpLab(lab, tmp_path / "bird")
    lab.add_cleanup(bgp.stop)
    router, client = bgp.router, lab.client
    vip = ipaddress.ip_interface("198.18.0.30/32")
    for h in lab.hosts:  # the host's fixed BGP source on lo (vipd keeps it there); the backend role's
        src = bgp.sources[h.name]  # arp_ignore=1 hides it from ARP, so the router is given its neighbours
        lab.ip(h, "addr", "add", f"{src}/32", "dev", "lo")
        lab.ip(router, "neigh", "replace", src, "lladdr", h.mac, "dev", router.ifname, "nud", "permanent")
    lab.ip(client, "route", "add", "198.18.0.0/24", "via", str(router.ip.ip))
    nodes = {h.name: Node(lab, h, tmp_path, config_toml(h.name, str(vip), "lo", lab.hosts, mode="anycast",
                                                       service_interface=lab.nic)) for h in lab.hosts}
    for n in nodes.values():
        assert n.ready["unavailable"] is None and n.ready["refused"] is None, n.ready
        n.cmd("hosts h1,h2,h3")
        n.cmd("own 30")  # anycast: every fit host holds the VIP on lo and directs
    start_servers(lab, lab.hosts, tmp_path)
    bgp.start()
    wait_for("the router's multipath route over all three", lambda: len(kernel_nexthops(lab, router, str(vip))) == 3)

    res = fan(lab, client, str(vip.ip), 90)  # 30 each expected, sd 4.5: accept 12..50 (4 sd)
    assert res["errors"] == 0 and set(res["backends"]) == {"h1", "h2", "h3"}, res
    assert all(12 <= c <= 50 for c in res["backends"].values()), res

    def director_of(sport: int) -> str:
        out = lab.ip(router, "route", "get", str(vip.ip), "from", str(client.ip.ip), "iif", router.ifname,
                     "ipproto", "tcp", "sport", str(sport), "dport", str(PORT)).stdout
        m = re.search(r" via (\S+)", out)
        assert m, out
        return bgp.host_of(m[1])

    names = ["h1", "h2", "h3"]
    table = maglev.build(names)

    def backend_of(sport: int) -> str | None:
        return maglev.lookup(table, names, maglev.flow_hash(client.ip.ip, vip.ip, sport, PORT, 6))

    sport = next(p for p in range(41000, 42000) if director_of(p) != backend_of(p))
    doomed, backend = director_of(sport), backend_of(sport)
    stream = Stream(lab, client, str(vip.ip), tmp_path, sport=sport)
    assert stream.backend() == backend  # the Python reference predicted the program's choice
    stream.advances()
    st = nodes[doomed].cmd("status")["services"][0]
    assert {b["backend"]: b["packets"] for b in st["backends"]}[backend] > 0  # the router did send it via `doomed`

    # the director dies: vipd SIGKILLed, its BGP session gone; the router re-hashes its flows
    nodes[doomed].kill()
    bgp.speakers[doomed].stop()
    survivors = [h for h in names if h != doomed]
    for h in survivors:
        nodes[h].cmd(f"hosts {','.join(survivors)}")  # its etcd presence ends with it
    wait_for("the router to drop the dead director", lambda: len(kernel_nexthops(lab, router, str(vip))) == 2)
    assert director_of(sport) != doomed
    stream.advances()
    done = stream.stop()
    assert done["error"] is None and done["backend"] == backend, done


def test_backend_role_refuses_when_it_would_answer_arp_and_restores_sysctls(lab: Lab, tmp_path: Path) -> None:
    h = lab.hosts[2]
    vip = lab.vip4(5)
    toml = config_toml(h.name, str(vip), lab.nic, [h])

    def sysctl(key: str) -> str:
        return lab.run(h, ["sysctl", "-n", key]).stdout.strip()

    def on_lo() -> bool:
        return f"{vip.ip}/32" in lab.ip(h, "-4", "addr", "show", "dev", "lo").stdout

    lab.ip(h, "addr", "add", str(vip), "dev", lab.nic)  # someone put the VIP on the NIC: ARP answers it
    n = Node(lab, h, tmp_path / "a", toml)
    assert n.ready["refused"] and f"{vip.ip} is on {lab.nic}" in n.ready["refused"], n.ready
    assert (sysctl("net.ipv4.conf.all.arp_ignore"), on_lo()) == ("0", False)  # nothing left changed
    n.stop()
    lab.ip(h, "addr", "del", str(vip), "dev", lab.nic)

    lab.run(h, ["sysctl", "-qw", f"net.ipv4.conf.{lab.nic}.arp_ignore=5"])  # reserved: the kernel answers
    n = Node(lab, h, tmp_path / "b", toml)
    assert n.ready["refused"] and f"net.ipv4.conf.{lab.nic}.arp_ignore is 5" in n.ready["refused"], n.ready
    n.stop()
    lab.run(h, ["sysctl", "-qw", f"net.ipv4.conf.{lab.nic}.arp_ignore=0", "net.ipv4.conf.all.arp_announce=1"])

    n = Node(lab, h, tmp_path / "c", toml)
    assert n.ready["refused"] is None
    assert (sysctl("net.ipv4.conf.all.arp_ignore"), sysctl("net.ipv4.conf.all.arp_announce"), on_lo()) == ("1", "2", True)

    def arp_replies(ip: object) -> int:
        return lab.run(lab.client, ["arping", "-c", "2", "-w", "2", "-i", lab.nic, str(ip)], check=False).stdout.count("bytes from")

    assert arp_replies(h.ip.ip) > 0 and arp_replies(vip.ip) == 0  # its own address answers, the VIP does not
    n.stop()
    assert (sysctl("net.ipv4.conf.all.arp_ignore"), sysctl("net.ipv4.conf.all.arp_announce"), on_lo()) == ("0", "1", False)


def test_without_the_program_dsr_is_unavailable_with_the_reason_and_the_rest_runs(lab: Lab, tmp_path: Path) -> None:
    """No object to load (as on a host without clang): the director is off and says why; the backend
    role and everything else still run."""
    h = lab.hosts[0]
    vip = lab.vip4(6)
    missing = {"VIPD_DSR_OBJECT": str(tmp_path / "no-such-dsr.o")}
    n = Node(lab, h, tmp_path, config_toml(h.name, str(vip), lab.nic, [h]), env=missing)
    assert n.ready["unavailable"] and "no-such-dsr.o does not exist" in n.ready["unavailable"], n.ready
    assert n.ready["refused"] is None
    assert f"{vip.ip}/32" in lab.ip(h, "-4", "addr", "show", "dev", "lo").stdout  # the backend role runs
    n.cmd("own 5")  # ownership (address, announcements) is unaffected
    assert vip.ip in [a.ip for a in lab.addresses(h) if a.ifindex != 1]
    text = n.cmd("metrics")["text"]
    assert "vipd_dsr_available 0.0" in text
    assert "vipd_dsr_program_attached" not in text.replace("# HELP vipd_dsr_program_attached", "").replace(
        "# TYPE vipd_dsr_program_attached", "")
    assert "vipd_dsr" not in lab.run(h, ["tc", "filter", "show", "dev", lab.nic, "ingress"]).stdout
    n.stop()
    check = lab.run(h, ["env", f"VIPD_DSR_OBJECT={missing['VIPD_DSR_OBJECT']}", sys.executable, "-m", "vipd", "check",
                        "-c", str(n.config)], check=False)
    assert check.returncode == 0, check.stderr  # the config is fine: DSR's absence is not an error
    assert "DSR unavailable here: VIPD_DSR_OBJECT=" in check.stdout and "every other feature runs" in check.stdout
    check = lab.run(h, [sys.executable, "-m", "vipd", "check", "-c", str(n.config)], check=False)
    assert "DSR: ready" in check.stdout, check.stdout

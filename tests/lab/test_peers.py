"""Host-to-host heartbeats between lab namespaces: real UDP over the lab bridge, real faults."""

from __future__ import annotations

import json
import secrets
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from vipd.lab.topology import Host, Lab
from vipd.peers import wire

PORT = 9655
WAIT = 15.0  # generous: shared 2-core machine


class Node:
    def __init__(self, lab: Lab, host: Host, hosts: list[Host], key: str, tmp: Path) -> None:
        self.name = host.name
        self.log = tmp / f"peers-{host.name}.log"
        argv = [sys.executable, "-m", "vipd.peers.tool", "--node", host.name, "--bind", f"{host.ip.ip}:{PORT}",
                "--key", key, "--state-dir", str(tmp / f"state-{host.name}"), "--quiet-acks"]
        argv += [x for h in hosts if h is not host for x in ("--peer", f"{h.name}={h.ip.ip}:{PORT}")]
        self.proc = lab.popen(host, argv, log=tmp / f"peers-{host.name}.err", stdout=subprocess.PIPE)
        self.lines: list[dict[str, Any]] = []
        self._buf = b""
        assert self.proc.stdout is not None
        import os
        os.set_blocking(self.proc.stdout.fileno(), False)

    def read(self) -> list[dict[str, Any]]:
        assert self.proc.stdout is not None
        chunk = self.proc.stdout.read() or b""
        self._buf += chunk
        *done, self._buf = self._buf.split(b"\n")
        self.lines += [json.loads(x) for x in done if x.strip()]
        return self.lines

    def wait_for(self, pred: Any, what: str, timeout: float = WAIT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.read():
                if pred(line):
                    return line
            time.sleep(0.02)
        raise AssertionError(f"{self.name}: no {what} within {timeout} s; got {self.lines[-5:]}")

    def events(self, kind: str, peer: str | None = None) -> list[dict[str, Any]]:
        return [x for x in self.read() if x.get("event") == kind and (peer is None or x.get("peer") == peer)]

    def stop(self) -> dict[str, Any]:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        return self.wait_for(lambda x: "stats" in x, "final stats")


@pytest.fixture
def key() -> str:
    return secrets.token_hex(32)


def start(lab: Lab, key: str, tmp: Path, names: list[str]) -> dict[str, Node]:
    hosts = [lab.host(n) for n in names]
    nodes = {h.name: Node(lab, h, hosts, key, tmp) for h in hosts}
    for n in nodes.values():
        n.wait_for(lambda x: x.get("event") == "Ready", "Ready")
    return nodes


def stats_of(final: dict[str, Any], peer: str) -> dict[str, Any]:
    return final["stats"][peer]  # type: ignore[no-any-return]


def test_heartbeats_flow_and_a_cut_host_is_suspected_then_recovers(lab: Lab, key: str, tmp_path: Path) -> None:
    nodes = start(lab, key, tmp_path, ["h1", "h2", "h3"])
    h1, h2, h3 = nodes["h1"], nodes["h2"], nodes["h3"]
    time.sleep(1.0)
    assert not any(n.events("Suspected") for n in nodes.values())  # no false suspicion while healthy
    lab.cut(lab.host("h3"))
    h1.wait_for(lambda x: x.get("event") == "Suspected" and x["peer"] == "h3", "suspicion of h3")
    h2.wait_for(lambda x: x.get("event") == "Suspected" and x["peer"] == "h3", "suspicion of h3")
    h3.wait_for(lambda x: x.get("event") == "Suspected" and x["peer"] == "h1", "h3 suspecting h1")
    assert not h1.events("Suspected", "h2") and not h2.events("Suspected", "h1")
    lab.restore(lab.host("h3"))
    h1.wait_for(lambda x: x.get("event") == "Recovered" and x["peer"] == "h3", "recovery of h3")
    # the new generation of h3's suspicion is validated by the tool, so grants resume
    h1.wait_for(lambda x: x.get("event") == "Challenged" and x["peer"] == "h3" and x["gen"][1] == 1,
                "h3's suspicion generation 1")
    finals = {n: node.stop() for n, node in nodes.items()}
    s = stats_of(finals["h1"], "h2")
    assert s["sent"] > 50 and s["received"] > 50 and s["rejected"] == {} and s["suspicions"] == 0
    assert s["granted_until"] is not None and stats_of(finals["h1"], "h3")["suspicions"] == 1


def test_a_busy_loop_keeps_heartbeating_a_hung_one_does_not(lab: Lab, key: str, tmp_path: Path) -> None:
    """The heartbeats run on their own thread: a trio loop blocked for stall/2 (a long batch of
    steps) is not suspected; one blocked for 2 x stall (a hang) is, and only after stall."""
    nodes = start(lab, key, tmp_path, ["h1", "h2"])
    h1, h2 = nodes["h1"], nodes["h2"]
    time.sleep(0.5)
    h1.proc.send_signal(signal.SIGUSR1)  # blocked 0.5 s: four times the grace
    h1.wait_for(lambda x: x.get("event") == "LoopResumed", "the short block's end")
    time.sleep(0.3)
    assert h2.events("Suspected") == [], "a busy (not hung) loop was suspected"
    err = tmp_path / "peers-h1.err"
    assert "heartbeats_withheld" not in err.read_text()
    h1.proc.send_signal(signal.SIGUSR2)  # blocked 2 s: past the stall allowance
    blocked = h1.wait_for(lambda x: x.get("event") == "LoopBlocked" and x["seconds"] == 2.0, "the long block")
    suspected = h2.wait_for(lambda x: x.get("event") == "Suspected" and x["peer"] == "h1", "h2 suspecting h1")
    resumed = h1.wait_for(lambda x: x.get("event") == "LoopResumed" and x["t"] > blocked["t"], "the long block's end")
    # the loop checks in every stall/4: its heartbeats stop 0.75 to 1 x stall after the block began
    assert blocked["t"] + 0.75 <= suspected["t"] <= resumed["t"], "suspected before the stall allowance ran out"
    h2.wait_for(lambda x: x.get("event") == "Recovered" and x["peer"] == "h1", "h1 heard again")
    assert "heartbeats_withheld" in err.read_text()  # the host says why its peers suspect it
    finals = {n: node.stop() for n, node in nodes.items()}
    assert stats_of(finals["h2"], "h1")["suspicions"] == 1 and stats_of(finals["h1"], "h2")["suspicions"] == 0


def test_one_way_loss_is_suspected_only_by_the_side_that_hears_nothing(lab: Lab, key: str, tmp_path: Path) -> None:
    nodes = start(lab, key, tmp_path, ["h1", "h2"])
    time.sleep(0.5)
    p1, p2 = lab.host("h1").port, lab.host("h2").port
    lab.run(lab.bridge_ns, ["nft", "add table bridge vtpeers"])
    lab.run(lab.bridge_ns, ["nft", "add chain bridge vtpeers vtfw { type filter hook forward priority 0; }"])
    lab.run(lab.bridge_ns, ["nft", f"add rule bridge vtpeers vtfw iifname {p1} oifname {p2} drop"])
    try:
        nodes["h2"].wait_for(lambda x: x.get("event") == "Suspected" and x["peer"] == "h1", "h2 suspecting h1")
        time.sleep(1.0)  # h1 keeps hearing h2's heartbeats: it must never suspect h2
        assert nodes["h1"].events("Suspected") == []
    finally:
        lab.run(lab.bridge_ns, ["nft", "delete table bridge vtpeers"])
    finals = {n: node.stop() for n, node in nodes.items()}
    assert stats_of(finals["h1"], "h2")["suspicions"] == 0
    assert stats_of(finals["h2"], "h1")["suspicions"] >= 1


@pytest.mark.needs_tools("tcpdump")
def test_forged_and_replayed_datagrams_change_nothing(lab: Lab, key: str, tmp_path: Path) -> None:
    nodes = start(lab, key, tmp_path, ["h1", "h2"])
    h1, h2 = lab.host("h1"), lab.host("h2")
    pcap = tmp_path / "h2.pcap"
    lab.run(h2, ["timeout", "10", "tcpdump", "-i", h2.ifname, "-c", "1", "-w", str(pcap), "-U",
                 f"udp and src host {h1.ip.ip} and dst port {PORT}"], timeout=15)
    captured = _udp_payload(pcap.read_bytes())
    assert len(captured) == wire.SIZE
    forged = wire.encode(wire.auth_key(bytes(32)), wire.Message(wire.node_id("h1"), wire.node_id("h2"),
                                                               2**62, 2**40, 0, 0, 0))
    send = ("import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); "
            f"[s.sendto(bytes.fromhex(x), ('{h2.ip.ip}', {PORT})) for x in sys.argv[1:]]")
    lab.run(lab.prefix + "c", [sys.executable, "-c", send, captured.hex(), forged.hex(), captured.hex()])
    time.sleep(0.5)
    finals = {n: node.stop() for n, node in nodes.items()}
    s = stats_of(finals["h2"], "h1")
    assert s["rejected"] == {"replay": 2}
    assert finals["h2"]["unattributed"] == {"bad_tag": 1}
    assert s["suspicions"] == 0 and stats_of(finals["h1"], "h2")["suspicions"] == 0


def _udp_payload(pcap: bytes) -> bytes:
    """The UDP payload of the first packet of a classic pcap file (Ethernet, IPv4)."""
    linktype = struct.unpack("<I", pcap[20:24])[0]
    assert linktype == 1, linktype
    incl = struct.unpack("<I", pcap[24 + 8:24 + 12])[0]
    frame = pcap[24 + 16:24 + 16 + incl]
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    return ip[ihl + 8:]




async def test_cluster_key_is_created_once_through_etcd(etcd_server: Any) -> None:
    import trio

    from vipd.election.etcd import EtcdClient
    from vipd.peers.keyring import cluster_key, key_name

    got: list[bytes] = []
    async with EtcdClient([etcd_server.endpoint], timeout=2.0) as a, EtcdClient([etcd_server.endpoint],
                                                                                 timeout=2.0) as b:
        async with trio.open_nursery() as n:
            for c in (a, b, a):
                async def one(c: EtcdClient = c) -> None:
                    got.append(await cluster_key(c, "/vt/"))
                n.start_soon(one)
        assert len(got) == 3 and len(set(got)) == 1 and len(got[0]) == 32
        kv = await a.get(key_name("/vt/"))
        assert kv is not None and bytes.fromhex(kv.value) == got[0] and kv.lease == 0
        assert await cluster_key(b, "/vt/", b"k" * 16) == b"k" * 16  # configured key wins, etcd untouched

"""Heartbeat cost and failure-detection latency (vipd/peers), in a throwaway network namespace.

  CPU: one measured endpoint heartbeating N peers (N = 2, 8, 32) at h = 10 ms; the N peers run in one
       other process. CPU = utime + stime of the measured process over the window / window.
  Detection: A and B heartbeat; B is SIGKILLed; latency = A's Suspected event - kill time (same host,
       same monotonic clock). Median over runs.
Prints a table and writes JSON (bench/out/peers.json). Needs root (a namespace vtpb<hex>).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

NS = "vtpb" + secrets.token_hex(2)
KEY = secrets.token_hex(32)
BASE = 20000
HZ = os.sysconf("SC_CLK_TCK")

PEER_HOST = r"""
import sys, trio
from vipd.peers.protocol import Peers, Params
from vipd.peers.transport import PeerTransport
n, key, base = int(sys.argv[1]), bytes.fromhex(sys.argv[2]), int(sys.argv[3])
async def main():
    async with trio.open_nursery() as nursery:
        for i in range(1, n + 1):
            t = PeerTransport(Peers(f"p{i}", 1, key, Params()), ("127.0.0.1", base + i),
                              on_event=lambda ev, t=None: None)
            t.set_peers({"m": ("127.0.0.1", base)})
            t.on_event = (lambda t: lambda ev: t.validate(ev.peer, ev.gen) if type(ev).__name__ == "Challenged" else None)(t)
            await nursery.start(t.run)
trio.run(main)
"""


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True)


def in_ns(argv: list[str], **kw) -> subprocess.Popen:  # type: ignore[no-untyped-def, type-arg]
    return subprocess.Popen(["ip", "netns", "exec", NS, *argv], **kw)


def tool(node: str, port: int, peers: dict[str, int], state: Path) -> subprocess.Popen:  # type: ignore[type-arg]
    argv = [sys.executable, "-m", "vipd.peers.tool", "--node", node, "--bind", f"127.0.0.1:{port}", "--key", KEY,
            "--state-dir", str(state), "--quiet-acks"]
    for n, p in peers.items():
        argv += ["--peer", f"{n}=127.0.0.1:{p}"]
    return in_ns(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ


def child_pid(p: subprocess.Popen) -> int:  # type: ignore[type-arg]
    # `ip netns exec` execs the command: same pid
    return p.pid


def measure_cpu(n: int, state: Path, window: float) -> dict[str, float]:
    peers = in_ns([sys.executable, "-c", PEER_HOST, str(n), KEY, str(BASE)], stdout=subprocess.DEVNULL)
    m = tool("m", BASE, {f"p{i}": BASE + i for i in range(1, n + 1)}, state)
    try:
        assert m.stdout is not None
        while "Ready" not in m.stdout.readline():
            pass
        time.sleep(1.0)
        c0, t0 = cpu_seconds(child_pid(m)), time.monotonic()
        time.sleep(window)
        c1, t1 = cpu_seconds(child_pid(m)), time.monotonic()
    finally:
        m.send_signal(signal.SIGTERM)
        out, _ = m.communicate(timeout=10)
        peers.kill()
        peers.wait()
    final = [json.loads(x) for x in out.splitlines() if '"stats"' in x][-1]
    sent = sum(s["sent"] for s in final["stats"].values())
    recv = sum(s["received"] for s in final["stats"].values())
    susp = sum(s["suspicions"] for s in final["stats"].values())
    return {"peers": n, "cpu_percent": 100 * (c1 - c0) / (t1 - t0), "sent": sent, "received": recv,
            "suspicions": susp}


def detection(state: Path) -> float:
    a = tool("a", BASE, {"b": BASE + 1}, state / "a")
    b = tool("b", BASE + 1, {"a": BASE}, state / "b")
    try:
        assert a.stdout is not None and b.stdout is not None
        for p in (a, b):
            while "Ready" not in p.stdout.readline():  # type: ignore[union-attr]
                pass
        time.sleep(0.5 + secrets.randbelow(100) / 1000)  # a random phase of the 10 ms heartbeat
        b.kill()
        killed = time.monotonic()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            line = a.stdout.readline()
            if '"Suspected"' in line:
                return json.loads(line)["t"] - killed  # type: ignore[no-any-return]
        raise RuntimeError("no suspicion within 5 s")
    finally:
        for p in (a, b):
            p.kill()
            p.wait()


def main() -> None:
    runs = int(os.environ.get("PEERS_RUNS", "15"))
    window = float(os.environ.get("PEERS_WINDOW", "5"))
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / NS
    sh("ip", "netns", "add", NS)
    try:
        sh("ip", "-n", NS, "link", "set", "lo", "up")
        cpu = [measure_cpu(n, tmp / f"cpu{n}", window) for n in (2, 8, 32)]
        lat = sorted(detection(tmp / f"det{i}") * 1000 for i in range(runs))
    finally:
        sh("ip", "netns", "del", NS)
    print(f"{'peers':>6} {'cpu %':>7} {'pkts/s out':>11} {'pkts/s in':>10} {'false susp':>10}")
    for c in cpu:
        print(f"{c['peers']:>6} {c['cpu_percent']:>7.2f} {c['sent'] / (window + 1):>11.0f} "
              f"{c['received'] / (window + 1):>10.0f} {c['suspicions']:>10}")
    print(f"detection after SIGKILL (h=10 ms, G=130 ms), {runs} runs: median {statistics.median(lat):.1f} ms, "
          f"min {lat[0]:.1f}, max {lat[-1]:.1f}")
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "peers.json").write_text(json.dumps({"cpu": cpu, "detection_ms": lat,
                                                "detection_median_ms": statistics.median(lat)}, indent=1))


if __name__ == "__main__":
    main()

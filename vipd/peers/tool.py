"""A stand-alone heartbeat endpoint for lab tests and benchmarks (`python -m vipd.peers.tool`).

Prints one JSON line per event ({"t": monotonic, "event": ..., "peer": ...}) on stdout, validates
every generation a peer shows at once (a test stand-in for the ownership core's etcd check), and on
SIGTERM/SIGINT prints a final {"stats": ...} line and exits 0. SIGUSR1 / SIGUSR2 block its trio loop
(a busy daemon) for stall/2 / 2 x stall seconds, between a "LoopBlocked" and a "LoopResumed" line:
the heartbeat thread keeps heartbeating through the first and stops during the second.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from dataclasses import asdict

import trio

from vipd.peers.protocol import Acked, Challenged, Event, Params, Peers
from vipd.peers.transport import PeerTransport, load_incarnation


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vipd.peers.tool")
    ap.add_argument("--node", required=True)
    ap.add_argument("--bind", required=True, help="IP:PORT")
    ap.add_argument("--peer", action="append", default=[], help="NAME=IP:PORT (repeat)")
    ap.add_argument("--key", required=True, help="cluster key, hex")
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--interval", type=float, default=0.010)
    ap.add_argument("--lease", type=float, default=0.090)
    ap.add_argument("--grace", type=float, default=0.130)
    ap.add_argument("--stall", type=float, default=1.0)
    ap.add_argument("--quiet-acks", action="store_true", help="do not print Acked events")
    args = ap.parse_args(argv)
    peers = Peers(args.node, load_incarnation(args.state_dir), bytes.fromhex(args.key),
                  Params(args.interval, args.lease, args.grace))
    directory = {n: _addr(a) for n, a in (p.split("=", 1) for p in args.peer)}
    transport: PeerTransport

    def emit(ev: Event) -> None:
        if isinstance(ev, Challenged):
            transport.validate(ev.peer, ev.gen)
        if isinstance(ev, Acked) and args.quiet_acks:
            return
        d = {"t": time.monotonic(), "event": type(ev).__name__, **asdict(ev)}
        print(json.dumps(d), flush=True)

    transport = PeerTransport(peers, _addr(args.bind), on_event=emit, stall=args.stall)

    async def run() -> None:
        transport.set_peers(directory)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(transport.run)
                print(json.dumps({"t": time.monotonic(), "event": "Ready"}), flush=True)
                async for signum in signals:
                    if signum in (signal.SIGUSR1, signal.SIGUSR2):
                        seconds = args.stall / 2 if signum == signal.SIGUSR1 else 2 * args.stall
                        print(json.dumps({"t": time.monotonic(), "event": "LoopBlocked", "seconds": seconds}),
                              flush=True)
                        time.sleep(seconds)  # the loop runs nothing meanwhile (the heartbeat thread does)
                        print(json.dumps({"t": time.monotonic(), "event": "LoopResumed"}), flush=True)
                        continue
                    nursery.cancel_scope.cancel()
                    break
        stats = {n: {**asdict(lk.stats), "granted_until": lk.granted_until(), "send_errors":
                     transport.send_errors.get(n, 0)} for n, lk in peers.links.items()}
        print(json.dumps({"t": time.monotonic(), "stats": stats, "unattributed": peers.unattributed}), flush=True)

    trio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Lab harness: one host's DSR side, driven line by line on stdin (the ownership core is replaced by
commands, so a test decides who owns what and when). Run inside a lab namespace:

    python -m vipd.lab.dsr_node vipd.toml

Commands (one per line; each answered by one JSON line on stdout):
    hosts h1,h3,h4        the host directory now holds these nodes, all healthy (what etcd presence gives)
    own SECONDS           act as the owner with a lease of SECONDS: the VIPs go on their interface with
                          a kernel lifetime, a GARP burst goes out (NIC VIPs), the DSR fence is armed to
                          now + SECONDS; both are refreshed every SECONDS/3 (the keepalive). A SIGKILL
                          stops the refresh: address and directing then end by themselves.
    release               stop refreshing, disarm, remove the addresses
    status                the service status, reason counters and fence state
    metrics               the Prometheus text of vipd.dsr.metrics
First line written: {"ready": true, "unavailable": ..., "refused": ...}.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import trio

from vipd import config
from vipd.dataplane.address import AddressManager
from vipd.dataplane.announce import Announcer
from vipd.dataplane.netlink import Netlink
from prometheus_client import CollectorRegistry, generate_latest

from vipd.dsr.metrics import register
from vipd.dsr.service import DsrService
from vipd.election.hosts import HostInfo


def say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _own(svc: DsrService, addrs: AddressManager, announcer: Announcer, lease: float,
               task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    lifetime = max(1, math.floor(lease))
    first = True
    while True:
        until = trio.current_time() + lease
        await svc.fence.arm(svc.vips, until)  # before the address: a frame for the VIP is never answered locally
        for v in svc.vips:
            await addrs.claim(v, lifetime)
        if first:
            for v in svc.vips:
                if not v.on_loopback:
                    await announcer.announce(v)
            task_status.started()
            first = False
        await trio.sleep(lease / 3)


async def main(path: str) -> None:
    cfg = config.load(path)
    async with Netlink() as nl:
        svc = DsrService(cfg.node, cfg.vips, nl, resolve_interval=0.5)
        addrs, announcer = AddressManager(nl), Announcer(nl)
        registry = CollectorRegistry()
        register(registry, svc)
        async with trio.open_nursery() as nursery:
            await nursery.start(svc.run)
            say({"ready": True, "unavailable": svc.unavailable, "refused": svc.backend_refused})
            owner: trio.CancelScope | None = None
            stdin = trio.lowlevel.FdStream(os.dup(0))
            buf = b""
            while True:
                chunk = await stdin.receive_some(4096)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    cmd, *args = line.decode().split()
                    if cmd == "hosts":
                        names = [n for n in (args[0] if args else "").split(",") if n]
                        svc.update_hosts({n: HostInfo(n) for n in names})
                        await svc.reconcile()
                        say({"ok": cmd})
                    elif cmd == "own":
                        if owner is not None:
                            owner.cancel()
                        owner = await nursery.start(_scoped, svc, addrs, announcer, float(args[0]))
                        say({"ok": cmd})
                    elif cmd == "release":
                        if owner is not None:
                            owner.cancel()
                            owner = None
                        for v in svc.vips:
                            await addrs.release(v)
                        await svc.fence.disarm(svc.vips)  # after the address
                        say({"ok": cmd})
                    elif cmd == "status":
                        maps = svc.director.maps
                        say({"services": svc.status(), "reasons": maps.reason_counts() if maps else {},
                             "covered": svc.fence.covers(svc.vips),
                             "attached": await svc.director.attached()})
                    elif cmd == "metrics":
                        say({"text": generate_latest(registry).decode()})
                    else:
                        say({"error": f"unknown command {cmd!r}"})
            nursery.cancel_scope.cancel()


async def _scoped(svc: DsrService, addrs: AddressManager, announcer: Announcer, lease: float,
                  task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED) -> None:
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as n:
            await n.start(_own, svc, addrs, announcer, lease)
            task_status.started(scope)


if __name__ == "__main__":
    trio.run(main, sys.argv[1])

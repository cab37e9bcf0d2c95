#!/usr/bin/env python3
"""The nftables token fence: what a refresh costs, and how precisely the kernel cuts at the deadline.
Prints a table and writes JSON.

    .venv/bin/python bench/fence.py [--runs 7] [--refreshes 50] [--reloads 10] [--json PATH]

Refresh cost: wall time of one `await fence.arm_many(...)` (trio -> Netlink owner thread -> one
nfnetlink batch -> ack -> back), for 1 / 100 / 1,000 elements, median over `--refreshes` calls,
with the element timeout update (kernel >= 6.11) and with the delete + add fallback; and the part
of it in the owner thread from the clock read to the kernel's done (encoding + the kernel's work).
Reload cost: one table update as a reload sends it (one VIP in or out), at 4 and 1,000 VIPs, the batch
it sent before (managed sets flushed and refilled) and before 955f4b3 (every hooked chain's rules
rewritten too), median over `--reloads` each.
Cut precision: a client probe every 1 ms to a VIP on h1; the token is armed to a deadline 200 ms
ahead, then nothing; the first probe sent at or after the cut is the first that goes unanswered.
Reported: (send time of the first unanswered probe) - deadline, and (last answered) - deadline;
negative = before the deadline. The probe's resolution is its spacing (~1 ms, more under load).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trio  # noqa: E402

from bench._common import describe, environment, table  # noqa: E402
from vipd.config import VipSpec  # noqa: E402
from vipd.dataplane.fence_build import encode_setup, setup_ops  # noqa: E402
from vipd.dataplane.fence_nft import NftFence  # noqa: E402
from vipd.dataplane.netlink import Netlink  # noqa: E402
from vipd.lab.probe import Probe  # noqa: E402
from vipd.lab.topology import Lab  # noqa: E402

SIZES = (1, 100, 1000)


async def refresh_cost(lab: Lab, n_calls: int) -> list[dict[str, Any]]:
    many = [VipSpec(f"m{i}", ipaddress.ip_interface(f"10.214.{i // 250}.{i % 250 + 1}/32"), lab.nic)
            for i in range(max(SIZES))]
    rows = []
    for update in (True, False):
        async with Netlink(lab.host("h2").ns) as nl, NftFence(nl, timeout_update=update) as fence:
            await fence.ensure(many)
            for n in SIZES:
                units = many[:n]
                times, batch = [], []
                for _ in range(n_calls):
                    now = trio.current_time()
                    items = [((v,), now + 0.5) for v in units]
                    t0 = time.perf_counter()
                    await fence.arm_many(items)
                    times.append((time.perf_counter() - t0) * 1000)
                    batch.append(fence.last_batch_seconds() * 1000)
                    await trio.sleep(0.005)
                rows.append({"elements": n, "mode": "timeout update" if update else "delete + add",
                             "median_ms": statistics.median(times), "p90_ms": sorted(times)[int(0.9 * len(times))],
                             "batch_median_ms": statistics.median(batch),
                             "calls": n_calls})
            await fence.remove_all()
    return rows


async def reload_cost(lab: Lab, n_calls: int) -> list[dict[str, Any]]:
    """What a reload's table update costs with 4 and 1,000 VIPs on one device, the fence's lock held all
    along (the successors' grant re-arms wait behind it): `ensure()` as it is (the device's chains
    already hooked, the sets read back and only their difference written: one VIP dropped or
    added back, alternately; or one VIP on a device not hooked yet, whose chain pair is created and
    deleted: the kernel hooks a device that does not exist yet since 6.16), the batch it sent before
    (sets flushed and refilled), and the one before 955f4b3 (every hooked chain's rules deleted and
    added again too)."""
    rows = []
    for n in (4, max(SIZES)):
        many = [VipSpec(f"m{i}", ipaddress.ip_interface(f"10.214.{i // 250}.{i % 250 + 1}/32"), lab.nic)
                for i in range(n)]
        devs = [(v.address, v.interface) for v in many]
        async with Netlink(lab.host("h2").ns) as nl, NftFence(nl) as fence:
            await fence.ensure(many)
            sent_before = {  # the batches earlier versions sent (the same table, rewritten)
                "sets flushed + refilled (before this)": setup_ops(devs, hooked=[lab.nic]),
                "rules rewritten too (before 955f4b3)": setup_ops(devs)}
            other = VipSpec("new", ipaddress.ip_interface("10.215.0.1/32"), "vtbnewdev0")  # (no such device)
            locked: list[float] = []  # ms inside the lock (_ensure), where the grant re-arms wait
            inner = fence._ensure  # noqa: SLF001

            async def timed(*a: Any, **k: Any) -> None:
                t = time.perf_counter()
                await inner(*a, **k)
                locked.append((time.perf_counter() - t) * 1000)
            fence._ensure = timed  # type: ignore[method-assign]  # noqa: SLF001
            for mode in ("ensure (one VIP in or out)", "ensure (a VIP on a new device in or out)", *sent_before):
                times = []
                for i in range(n_calls):
                    t0 = time.perf_counter()
                    if mode == "ensure (one VIP in or out)":
                        await fence.ensure(many[i % 2:])
                    elif mode.startswith("ensure"):  # the device's chain pair created, then deleted
                        await fence.ensure(many + [other] if i % 2 == 0 else many)
                    else:
                        batch = encode_setup(sent_before[mode])
                        await fence._run("bench: an older batch", lambda s: s.nft.nlm_request_batch(batch))  # noqa: SLF001
                    times.append((time.perf_counter() - t0) * 1000)
                    await trio.sleep(0.005)
                rows.append({"mode": mode, "vips": n, "median_ms": statistics.median(times),
                             "max_ms": max(times), "calls": n_calls})
                if locked:
                    rows.append({"mode": f"{mode}: the lock held", "vips": n, "median_ms": statistics.median(locked),
                                 "max_ms": max(locked), "calls": n_calls})
                    locked.clear()
            await fence.remove_all()
    return rows


async def cut_precision(lab: Lab, runs: int) -> list[dict[str, Any]]:
    vip = VipSpec("v", lab.vip4(1), lab.nic)
    lab.ip(lab.host("h1"), "addr", "add", str(vip.address), "dev", lab.nic)
    out = []
    async with Netlink(lab.host("h1").ns) as nl, NftFence(nl) as fence:
        await fence.ensure([vip])
        await fence.arm([vip], trio.current_time() + 60)
        with Probe(lab, vip.ip, interval=0.001, timeout=0.05) as probe:
            for i in range(runs):
                await fence.arm([vip], trio.current_time() + 60)
                if not await trio.to_thread.run_sync(lambda: probe.wait_responder("h1", timeout=10)):
                    raise RuntimeError("the VIP does not answer while armed")
                await trio.sleep(0.3)
                until = trio.current_time() + 0.2
                deadline = until - trio.current_time() + time.monotonic()  # the same instant, monotonic clock
                await fence.arm([vip], until)
                await trio.sleep_until(until + 0.15)
                with probe._cond:  # noqa: SLF001 - read the raw record once, under its lock
                    sent, replies = list(probe._sent), dict(probe._replies)  # noqa: SLF001
                around = [s for s in range(len(sent)) if deadline - 0.1 <= sent[s] <= deadline + 0.1]
                answered = [s for s in around if s in replies]
                last_ok = max(answered) if answered else None
                first_lost = next((s for s in around if s not in replies and (last_ok is None or s > last_ok)), None)
                row = {"run": i,
                       "first_dropped_ms": None if first_lost is None else (sent[first_lost] - deadline) * 1000,
                       "last_answered_ms": None if last_ok is None else (sent[last_ok] - deadline) * 1000,
                       "answered_after_deadline": sum(1 for s in answered if sent[s] > deadline)}
                out.append(row)
                print(f"cut run {i}: first dropped {row['first_dropped_ms']:+.1f} ms, last answered "
                      f"{row['last_answered_ms']:+.1f} ms from the deadline", flush=True)
        await fence.remove_all()
    return out


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    with Lab("vtfb", n_hosts=2) as lab:
        refresh = await refresh_cost(lab, args.refreshes)
        reload = await reload_cost(lab, args.reloads)
        cut = await cut_precision(lab, args.runs)
    return {"refresh": refresh, "reload": reload, "cut": cut}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7, help="cut-precision runs")
    ap.add_argument("--refreshes", type=int, default=50, help="arm_many calls per size and mode")
    ap.add_argument("--reloads", type=int, default=10, help="table updates timed per mode")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    res = trio.run(amain, args)
    first = describe([r["first_dropped_ms"] for r in res["cut"] if r["first_dropped_ms"] is not None])
    last = describe([r["last_answered_ms"] for r in res["cut"] if r["last_answered_ms"] is not None])
    late = sum(r["answered_after_deadline"] for r in res["cut"])
    print()
    print("refresh cost: one arm_many() = one nfnetlink batch (trio -> owner thread -> kernel -> back)")
    print(table(["elements", "mode", "arm_many median ms", "p90 ms", "batch (encode + kernel) median ms"],
                [[r["elements"], r["mode"], f"{r['median_ms']:.2f}", f"{r['p90_ms']:.2f}",
                  f"{r['batch_median_ms']:.2f}"] for r in res["refresh"]], right=(0, 2, 3, 4)))
    print()
    print("a reload's table update, the fence's lock held all along (grant re-arms wait behind it)")
    print(table(["mode", "VIPs", "median ms", "max ms"],
                [[r["mode"], r["vips"], f"{r['median_ms']:.1f}", f"{r['max_ms']:.1f}"] for r in res["reload"]],
                right=(1, 2, 3)))
    print()
    print(f"cut precision: probe every 1 ms, token armed 200 ms ahead, {len(res['cut'])} runs "
          "(ms from the deadline; negative = early)")
    print(table(["measure", "min", "median", "max"],
                [["first dropped probe", f"{first['min']:+.1f}", f"{first['median']:+.1f}", f"{first['max']:+.1f}"],
                 ["last answered probe", f"{last['min']:+.1f}", f"{last['median']:+.1f}", f"{last['max']:+.1f}"],
                 ["probes answered after the deadline", "", str(late), ""]], right=(1, 2, 3)))
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    path = args.json or out / f"fence-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"settings": {"runs": args.runs, "refreshes": args.refreshes, "reloads": args.reloads},
                                "environment": environment(), **res,
                                "summary": {"first_dropped_ms": first, "last_answered_ms": last,
                                            "answered_after_deadline": late}}, indent=2, default=str))
    print(f"json: {path}")
    return 0 if late == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Host checks: capabilities, clocks and timers, nftables."""

from __future__ import annotations

import statistics
import time
from typing import Optional

import trio

from vipd.config import Config
from vipd.dataplane.netlink import Netlink
from vipd.doctor.findings import Finding, Severity, info, ok

CAP_NET_ADMIN, CAP_NET_RAW = 12, 13
NEEDED_CAPS = {"CAP_NET_ADMIN": CAP_NET_ADMIN, "CAP_NET_RAW": CAP_NET_RAW}
CLOCKSOURCE = "/sys/devices/system/clocksource/clocksource0/current_clocksource"


def effective_caps(status_text: str) -> int:
    """The CapEff bit mask from /proc/<pid>/status text (0 when absent)."""
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def capabilities(status_path: str = "/proc/self/status") -> list[Finding]:
    try:
        with open(status_path) as f:
            mask = effective_caps(f.read())
    except OSError as e:
        return [info("host.capabilities", "host", f"cannot read {status_path}: {e.strerror}")]
    missing = [name for name, bit in NEEDED_CAPS.items() if not mask >> bit & 1]
    if not missing:
        return [ok("host.capabilities", "host", "CAP_NET_ADMIN and CAP_NET_RAW are effective")]
    return [Finding(
        "host.capabilities", Severity.ERROR, "host", f"this process lacks {', '.join(missing)}",
        "vipd adds addresses and nftables rules (CAP_NET_ADMIN) and sends ARP/NA frames (CAP_NET_RAW); "
        "without them every claim fails, and doctor cannot probe the segment either",
        "run vipd as root or through the shipped unit (AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW)",
        {"missing": missing, "cap_eff": f"{mask:x}"})]


def _clocksource() -> Optional[str]:
    try:
        with open(CLOCKSOURCE) as f:
            return f.read().strip()
    except OSError:
        return None


async def clocks(samples: int = 7, nap: float = 0.01) -> list[Finding]:
    """Clock source, monotonic resolution, and how late the event loop wakes from a short sleep
    (vipd's deadlines are monotonic durations; only TLS certificates care about the wall clock)."""
    out: list[Finding] = []
    source = _clocksource()
    if source is not None and "jiffies" in source:
        out.append(Finding("clock.source", Severity.WARNING, "host", f"clock source is {source}",
                           "a jiffies clock ticks every 1-10 ms and drifts under load; deadlines lose precision",
                           "fix the TSC / hpet detection (kernel log), or run on a host with a stable clock",
                           {"clocksource": source}))
    else:
        out.append(ok("clock.source", "host", f"clock source {source or 'unknown'}", clocksource=source))
    res = time.clock_getres(time.CLOCK_MONOTONIC)
    if res > 1e-3:
        out.append(Finding("clock.resolution", Severity.WARNING, "host", f"CLOCK_MONOTONIC resolution {res * 1e3:g} ms",
                           "vipd's fence and keepalive deadlines need millisecond timers",
                           "enable high-resolution timers (CONFIG_HIGH_RES_TIMERS)", {"resolution": res}))
    late = []
    for _ in range(samples):
        t0 = trio.current_time()
        await trio.sleep(nap)
        late.append(trio.current_time() - t0 - nap)
    median = statistics.median(late)
    data = {"median_late_ms": round(median * 1e3, 3), "max_late_ms": round(max(late) * 1e3, 3)}
    if median > 0.02:
        out.append(Finding("clock.timers", Severity.WARNING, "host",
                           f"a {nap * 1e3:g} ms sleep wakes {median * 1e3:.1f} ms late (median of {samples})",
                           "keepalives and fences run late on an overloaded host or a VM starved of CPU; the "
                           "fence margin must absorb that", "give the host CPU headroom, or raise timing.fence_margin",
                           data))
    else:
        out.append(ok("clock.timers", "host", f"timers wake {median * 1e3:.2f} ms late (median)", **data))
    return out


async def nftables(nl: Netlink, cfg: Config) -> list[Finding]:
    """Can this host program nftables through netlink (what egress SNAT and the BGP SNAT use)?"""
    from pyroute2.nftables.main import NFTables

    from vipd.dataplane.netlink import enter_netns

    needed = bool(cfg.egress) or cfg.bgp.snat
    netns = nl.netns

    def probe(_ipr: object) -> int:
        with enter_netns(netns):
            nft = NFTables()
        try:
            return len(nft.get_tables())
        finally:
            nft.close()

    try:
        count = await nl.call(probe)
    except Exception as e:  # noqa: BLE001 - any failure means "not available"; reported, not raised
        sev = Severity.ERROR if needed else Severity.INFO
        what = "egress SNAT / [bgp] snat are configured and need it" if needed else "not needed by this config"
        return [Finding("nftables", sev, "host", f"nftables unavailable: {e}", what,
                        "load nf_tables (modprobe nf_tables) and run vipd with CAP_NET_ADMIN", {"needed": needed})]
    return [ok("nftables", "host", f"nftables answers over netlink ({count} tables)", needed=needed)]

"""The daemon's L2 gate: before its first claim, find the interfaces on which L2 VIPs cannot work
(a proxy-ARP segment, vipd.doctor.checks_l2.l2_blockers) and make their units unfit here.

Contract:
- `run()` tests every interface carrying NIC VIPs once, all at once (about 0.3 s), and caches the
  answer for the life of the daemon; `checked` is set when it is done. The daemon takes its lease
  meanwhile (start to ready does not wait for the probes), but its units learn of it only through
  `gate(publish)`, which holds every keepalive (LeaseValid) back until the check is done: a unit
  without a lease never campaigns, so no claim can happen before the vetoes below. For those
  0.3 s the presence shows the host fit for its L2 units; a blocked segment republishes it at
  once, well inside the default preempt_delay (5 s) any other host waits before handing one over.
- A blocked interface: one `l2_blocked` error line (reason and fix), `vipd_l2_blocked{interface}` 1,
  and a Fitness veto on every unit with a VIP there, so it never campaigns; the reason shows in the
  presence (`vipd status`) and in `vipd state`.
- A check that fails (DataplaneError, OSError, or no answer in `limit` s) blocks nothing: it is
  logged and the interface is treated as not blocked. The daemon never stops for it.
"""

from __future__ import annotations

from typing import Callable, Protocol

import trio

from vipd import log
from vipd.config import Config
from vipd.dataplane.netlink import Netlink
from vipd.doctor.checks_l2 import L2Metrics, l2_blockers, l2_vips, report_l2_blockers
from vipd.doctor.findings import Finding
from vipd.errors import DataplaneError
from vipd.lease_gate import KeepaliveGate
from vipd.model import Event

SOURCE = "l2"


class Vetoes(Protocol):
    def veto(self, unit: str, reason: str | None, *, source: str) -> None: ...


def blocked_reason(ifname: str, f: Finding) -> str:
    """What `vipd status` / presence says for a unit with a VIP on a blocked interface."""
    return f"L2 mode refused on {ifname}: {f.summary}; {f.fix}"


class L2Gate:
    def __init__(self, cfg: Config, nl: Netlink, metrics: L2Metrics, fitness: Vetoes, *, wait: float = 0.1,
                 limit: float = 10.0) -> None:
        self._cfg = cfg
        self._nl = nl
        self._metrics = metrics
        self._fitness = fitness
        # per ARP probe round; the check takes about 3 x wait on a normal segment (nobody answers for
        # the unused addresses) and delays the first lease by that much. A LAN, and a cloud's ARP
        # responder, answer in well under a millisecond (as for the claim's own probe, check_free).
        self._wait = wait
        self._limit = limit  # the whole check gives up (blocking nothing) after this long
        self.blocked: dict[str, Finding] = {}  # interface -> the blocking finding (cached)
        self._gate = KeepaliveGate()  # keepalives held back until the check is done
        self.checked = self._gate.opened

    def gate(self, publish: Callable[[Event], None]) -> Callable[[Event], None]:
        """`publish`, except that keepalives are held back until the check is done (the newest one is
        published then); any other event passes, and drops the one held (it is older news)."""
        return self._gate.gate(publish)

    @property
    def needed(self) -> bool:
        return bool(l2_vips(self._cfg))

    async def run(self) -> None:
        """Test once; never raises for a failed check."""
        try:
            if self.needed:
                self.blocked = await self._test()
                report_l2_blockers(self._cfg, self.blocked, self._metrics)
                for unit, reason in self.unit_reasons().items():
                    self._fitness.veto(unit, reason, source=SOURCE)
        finally:
            self._gate.open()

    async def _test(self) -> dict[str, Finding]:
        error: object = f"no answer in {self._limit:g} s"
        try:
            with trio.move_on_after(self._limit):
                return await l2_blockers(self._nl, self._cfg, wait=self._wait)
        except (DataplaneError, OSError) as e:
            error = e
        log.warning("l2_check_failed", error=error, effect="L2 VIPs are not refused; run `vipd doctor`")
        return {}

    def unit_reasons(self) -> dict[str, str]:
        """Units with a VIP on a blocked interface, with the reason (the first blocked interface)."""
        out: dict[str, str] = {}
        for v in self._cfg.vips:
            f = self.blocked.get(v.interface)
            if f is not None and not v.on_loopback and v.unit not in out:
                out[v.unit] = blocked_reason(v.interface, f)
        return out

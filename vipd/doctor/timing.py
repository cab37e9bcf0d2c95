"""What each fault costs in failover time, from the config and etcd's own timing: one function.

Every figure is derived here, from :class:`TimingInputs`, and nowhere else, so a new timing key (the
planned peer takeover: heartbeat, grace) becomes one more field and one more row. Seconds throughout.

The model (README "etcd flags bound the failover time", FACTS.md "etcd as a cluster"):

* keepalive interval k = granted TTL / keepalives_per_ttl; the owner's address lifetime ends
  ``fence_margin`` before its lease could expire, counted from the last acknowledged keepalive.
* a dead, hung or cut-off owner: etcd expires its lease TTL after the last keepalive it saw, and its
  expiry loop runs every 0.5 s; the last keepalive was sent between k and 0 s before the fault.
  So the VIP is free between TTL - k and TTL + 0.5 s after the fault (plus the standby's claim).
* an etcd leader loss: no keepalive succeeds until a new leader is elected (one election timeout
  to notice, up to two with the randomised timeout, plus a round); the new leader extends every lease.
  An owner keeps its VIP if that fits in its slack = TTL - fence_margin - k; else it fences itself
  and the VIP is down until the election is over and it claims again.
* a member that does not answer: each request waits ``request_timeout`` before the next endpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

ETCD_EXPIRY_INTERVAL = 0.5  # etcd's lessor checks for expired leases every 500 ms
CLAIM_TIME = 0.05  # a standby's watch event, transaction and address add: tens of ms (README "Measured")
ETCD_DEFAULT_ELECTION = 1.0  # etcd's --election-timeout default, 1000 ms


def etcd_min_ttl(election_timeout: float) -> int:
    """etcd's minimum lease TTL: 1.5 x election timeout, rounded up to whole seconds."""
    return max(1, math.ceil(1.5 * election_timeout - 1e-9))


def election_from_min_ttl(min_ttl: int) -> float:
    """The largest election timeout consistent with a minimum TTL etcd granted (an upper bound)."""
    return min_ttl / 1.5


@dataclass(frozen=True)
class TimingInputs:
    lease_ttl: int  # asked in the config
    fence_margin: float
    keepalives_per_ttl: int
    request_timeout: float
    endpoints: int = 1
    granted_ttl: Optional[int] = None  # what etcd granted (None: etcd not asked)
    election_timeout: Optional[float] = None  # etcd's --election-timeout (None: unknown)
    election_source: str = "unknown"  # where election_timeout came from

    @property
    def ttl(self) -> int:
        """The TTL in force: granted, else the asked one raised to etcd's minimum when that is known."""
        if self.granted_ttl is not None:
            return self.granted_ttl
        if self.election_timeout is not None:
            return max(self.lease_ttl, etcd_min_ttl(self.election_timeout))
        return self.lease_ttl

    @property
    def keepalive_interval(self) -> float:
        return self.ttl / self.keepalives_per_ttl

    @property
    def slack(self) -> float:
        """How long etcd may stay silent before an owner must fence itself (worst case)."""
        return self.ttl - self.fence_margin - self.keepalive_interval


@dataclass(frozen=True)
class FaultCost:
    """How long a VIP is without a holder after ``fault``: between ``low`` and ``high`` seconds."""

    fault: str
    low: float
    high: float
    note: str

    def as_dict(self) -> dict[str, Any]:
        def num(x: float) -> Optional[float]:
            return None if math.isnan(x) else round(x, 3)  # JSON has no NaN: unknown is null

        return {"fault": self.fault, "low": num(self.low), "high": num(self.high), "note": self.note}


def failover_costs(t: TimingInputs) -> list[FaultCost]:
    """Every fault's client-visible outage with these inputs (the table `vipd doctor` prints)."""
    ttl, k, slack = t.ttl, t.keepalive_interval, t.slack
    costs = [
        FaultCost("planned stop (SIGTERM, vipd release)", 0.0, CLAIM_TIME,
                  "address removed, owner key deleted, the standby's watch fires and its transaction wins"),
        FaultCost("crash under systemd (ExecStopPost=vipd cleanup)", 0.0, CLAIM_TIME + 0.5,
                  "cleanup removes the addresses and revokes the lease; then as a planned stop"),
        FaultCost("host loss, link cut, hang, crash without cleanup", max(0.0, ttl - k),
                  ttl + ETCD_EXPIRY_INTERVAL + CLAIM_TIME,
                  f"the lease (TTL {ttl} s granted) must expire in etcd: TTL - keepalive interval ({k:.2f} s) "
                  f"to TTL + etcd's 0.5 s expiry loop after the fault"),
    ]
    if t.election_timeout is None:
        costs.append(FaultCost("etcd leader loss", 0.0, math.nan,
                               f"unknown: etcd's election timeout could not be learnt; owners ride out "
                               f"{slack:.2f} s without a leader"))
    else:
        et = t.election_timeout
        worst_election = 2 * et + t.request_timeout
        if worst_election <= slack:
            costs.append(FaultCost("etcd leader loss", 0.0, 0.0,
                                   f"a new leader within {et:g}-{2 * et:g} s fits in the owners' slack "
                                   f"{slack:.2f} s (TTL - fence_margin - keepalive interval)"))
        else:
            costs.append(FaultCost("etcd leader loss", 0.0, worst_election - max(0.0, slack) + CLAIM_TIME,
                                   f"no keepalive succeeds for up to {worst_election:.2f} s (2 x election timeout "
                                   f"{et:g} s + request_timeout) but owners fence after {slack:.2f} s: the VIP "
                                   f"is down until the new leader answers"))
    if t.endpoints > 1:
        blackholed = t.request_timeout
        costs.append(FaultCost("one etcd member blackholed", 0.0,
                               0.0 if blackholed < slack else blackholed - slack + CLAIM_TIME,
                               f"each request waits request_timeout {t.request_timeout:g} s before the next "
                               f"endpoint (slack {slack:.2f} s)"))
    return costs


def render_costs(costs: list[FaultCost]) -> str:
    def fmt(x: float) -> str:
        return "?" if math.isnan(x) else f"{x:.2f}"

    return "; ".join(f"{c.fault}: {fmt(c.low)}-{fmt(c.high)} s" for c in costs)

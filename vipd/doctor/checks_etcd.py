"""etcd: every endpoint's reachability and version, the TTL etcd grants, its election timeout, and
what each fault costs with all of that (vipd.doctor.timing).

The election timeout is read from the member's /debug/vars command line when it is there
(`--election-timeout`, default 1000 ms) and cross-checked with the minimum TTL etcd grants (a grant of
1 s comes back raised to ceil(1.5 x election timeout)); when they disagree (a flag set through
ETCD_ELECTION_TIMEOUT, say) the measured grant wins. The two test leases are revoked at once.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import trio

from vipd.config import Config
from vipd.doctor.findings import Finding, Severity, info, ok
from vipd.doctor.timing import (ETCD_DEFAULT_ELECTION, TimingInputs, election_from_min_ttl, etcd_min_ttl,
                                failover_costs, render_costs)
from vipd.election.etcd import EtcdClient
from vipd.election.owners import OwnerKeys
from vipd.errors import EtcdAuthError, EtcdError

MIN_VERSION = (3, 4)


@dataclass
class EtcdFacts:
    """What doctor learnt from etcd (also used by the L2 check: who owns what)."""

    reachable: bool = False
    granted_ttl: Optional[int] = None
    min_ttl: Optional[int] = None
    election_timeout: Optional[float] = None
    election_source: str = "unknown"
    owners: dict[str, str] = field(default_factory=dict)  # unit -> node


def election_from_cmdline(cmdline: list[str]) -> Optional[float]:
    """--election-timeout from etcd's argv, in seconds; etcd's default when the flag is absent."""
    for i, arg in enumerate(cmdline):
        m = re.match(r"^--?election-timeout(?:=(\d+))?$", arg)
        if m:
            value = m.group(1) or (cmdline[i + 1] if i + 1 < len(cmdline) else "")
            return int(value) / 1000 if value.isdigit() else None
    return ETCD_DEFAULT_ELECTION


def reconcile_election(from_cmdline: Optional[float], min_ttl: Optional[int]) -> tuple[Optional[float], str]:
    """The election timeout to use and where it came from."""
    if from_cmdline is not None and (min_ttl is None or etcd_min_ttl(from_cmdline) == min_ttl):
        return from_cmdline, "etcd command line" + (" (agrees with the minimum TTL granted)" if min_ttl else "")
    if min_ttl is not None:
        return election_from_min_ttl(min_ttl), f"at most, from the minimum TTL etcd grants ({min_ttl} s)"
    return None, "unknown"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


async def _endpoint(cfg: Config, ep: str) -> tuple[Finding, Optional[list[str]]]:
    """One endpoint alone: its version, and its command line when /debug/vars serves it."""
    one = EtcdClient(ep.split(), timeout=cfg.etcd.request_timeout, ca_file=cfg.etcd.ca_file,
                     cert_file=cfg.etcd.cert_file, key_file=cfg.etcd.key_file, username=cfg.etcd.username,
                     password=cfg.etcd.password)
    try:
        async with one:
            version = await one.get_json("/version")
            cmdline: Optional[list[str]] = None
            try:
                cmdline = list((await one.get_json("/debug/vars")).get("cmdline") or []) or None
            except EtcdError:
                pass
    except EtcdAuthError as e:
        return Finding("etcd.endpoint", Severity.ERROR, ep, f"refused our credentials: {e}",
                       fix="check etcd.ca_file / cert_file / key_file / username"), None
    except EtcdError as e:
        return Finding("etcd.endpoint", Severity.WARNING, ep, f"unreachable: {e}",
                       "vipd tries the next endpoint after request_timeout each time this one fails",
                       "fix the endpoint or remove it from etcd.endpoints"), None
    server = str(version.get("etcdserver", "?"))
    if _version(server) < MIN_VERSION:
        return Finding("etcd.endpoint", Severity.ERROR, ep, f"etcd {server} is older than 3.4",
                       "vipd talks to etcd's v3 JSON gateway at /v3/, which etcd serves from 3.4 on",
                       "upgrade etcd to 3.4 or later"), cmdline
    return ok("etcd.endpoint", ep, f"etcd {server} (cluster {version.get('etcdcluster', '?')})",
              server=server, cluster=version.get("etcdcluster")), cmdline


async def _grant(client: EtcdClient, ttl: int) -> int:
    lease, granted = await client.grant(ttl)
    with trio.CancelScope(shield=True):
        try:
            await client.revoke(lease)
        except EtcdError:
            pass  # it expires by itself after `granted` seconds
    return granted


async def etcd_findings(cfg: Config) -> tuple[list[Finding], EtcdFacts]:
    facts = EtcdFacts()
    out: list[Finding] = []
    cmdlines: list[list[str]] = []
    results: dict[str, tuple[Finding, Optional[list[str]]]] = {}

    async def one(ep: str) -> None:
        results[ep] = await _endpoint(cfg, ep)

    async with trio.open_nursery() as nursery:
        for ep in cfg.etcd.endpoints:
            nursery.start_soon(one, ep)
    for ep in cfg.etcd.endpoints:
        finding, cmdline = results[ep]
        out.append(finding)
        if cmdline:
            cmdlines.append(cmdline)
    if not any(f.severity is Severity.OK for f in out):
        out.append(Finding("etcd.reachable", Severity.ERROR, "etcd", "no etcd endpoint answered",
                           "vipd cannot win or keep any VIP without etcd", "start etcd or fix etcd.endpoints"))
        return out + [_costs(cfg, facts)], facts
    facts.reachable = True
    try:
        async with EtcdClient.from_config(cfg.etcd) as client:
            facts.granted_ttl = await _grant(client, cfg.etcd.lease_ttl)
            facts.min_ttl = await _grant(client, 1)
            records, _ = await OwnerKeys(client, cfg.etcd.prefix, cfg.node).list()  # type: ignore[arg-type]
            facts.owners = {unit: rec.node for unit, rec in records.items() if rec.node}
    except EtcdError as e:
        out.append(Finding("etcd.lease", Severity.ERROR, "etcd", f"cannot grant a lease: {e}",
                           "vipd holds every VIP through a lease", "grant the vipd user lease permissions"))
        return out + [_costs(cfg, facts)], facts
    from_cmd = election_from_cmdline(cmdlines[0]) if cmdlines else None
    facts.election_timeout, facts.election_source = reconcile_election(from_cmd, facts.min_ttl)
    asked, granted = cfg.etcd.lease_ttl, facts.granted_ttl
    if granted != asked:
        out.append(Finding("etcd.lease_ttl", Severity.WARNING, "etcd", f"asked for a {asked} s lease, etcd granted {granted} s",
                           f"etcd raises a TTL to its minimum, 1.5 x election timeout ({facts.election_timeout or '?'} s, "
                           f"{facts.election_source}): every failover that waits for a lease takes longer",
                           f"set etcd.lease_ttl = {granted}, or lower etcd's --election-timeout",
                           {"asked": asked, "granted": granted, "min_ttl": facts.min_ttl}))
    else:
        out.append(ok("etcd.lease_ttl", "etcd", f"lease TTL {granted} s granted as asked (etcd minimum {facts.min_ttl} s)",
                      asked=asked, granted=granted, min_ttl=facts.min_ttl))
    out.append(info("etcd.election", "etcd", f"election timeout {_fmt(facts.election_timeout)} s ({facts.election_source})",
                    election_timeout=facts.election_timeout, source=facts.election_source))
    out.append(_costs(cfg, facts))
    return out, facts


def _fmt(x: Optional[float]) -> str:
    return "?" if x is None else f"{x:.3g}"


def timing_inputs(cfg: Config, facts: EtcdFacts) -> TimingInputs:
    return TimingInputs(lease_ttl=cfg.etcd.lease_ttl, fence_margin=cfg.timing.fence_margin,
                        keepalives_per_ttl=cfg.timing.keepalives_per_ttl, request_timeout=cfg.etcd.request_timeout,
                        endpoints=len(cfg.etcd.endpoints), granted_ttl=facts.granted_ttl,
                        election_timeout=facts.election_timeout, election_source=facts.election_source)


def _costs(cfg: Config, facts: EtcdFacts) -> Finding:
    t = timing_inputs(cfg, facts)
    costs = failover_costs(t)
    worst = max((c.high for c in costs if not math.isnan(c.high)), default=0.0)
    data: dict[str, Any] = {"ttl": t.ttl, "keepalive_interval": t.keepalive_interval, "slack": round(t.slack, 3),
                            "costs": [c.as_dict() for c in costs]}
    return info("timing.failover", "cluster", f"worst outage {worst:.2f} s with TTL {t.ttl} s", render_costs(costs), **data)

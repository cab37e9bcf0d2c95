"""Every configuration key, its default and meaning: the one source of vipd.toml(5).

A unit test parses each key's example through vipd.config (so no key here is unknown to the parser)
and compares the sections with the config dataclasses (so no parsed key is missing here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Key:
    key: str  # dotted path; "vip[]" is an item of the [[vip]] array
    default: str  # as written in the man page ("-": required or none)
    meaning: str
    example: Any = None  # a valid value (None: not tested alone, e.g. needs companions)


SECTIONS: dict[str, str] = {
    "": "Top-level keys.",
    "etcd": "Where the leases live. One prefix per cluster; every host of a cluster lists the same VIPs.",
    "timing": "Fencing and keepalive timing (see FAILOVER TIME in vipd(8)).",
    "metrics": "The Prometheus endpoint.",
    "host": "This host's placement weight and host-wide health checks.",
    "placement": "Which host owns what, and when a VIP moves back.",
    "hooks": "Commands run on ownership transitions (queued, never delaying them).",
    "bgp": "A fixed BGP source address for routed VIPs.",
    "peers": "Host-to-host heartbeats for fast takeover (a crashed, hung or cut-off owner's VIPs move "
             "in about G plus one etcd transaction). Safety needs grace - lease to cover clock-rate "
             "error, the kernel's 4 ms nftables tick and the delay from reading the clock to arming.",
    "vip[]": "One [[vip]] table per virtual IP.",
    "check[]": "A health check, in [[host.check]] or [[vip.check]].",
    "egress[]": "One [[egress]] table per SNAT rule that follows a VIP's ownership.",
}

KEYS: tuple[Key, ...] = (
    Key("node", "the hostname", "unique node name in the cluster", "cp1"),
    Key("state_dir", "/run/vipd", "control socket, and the lease id `vipd cleanup` revokes", "/run/vipd"),
    Key("log_level", "info", "debug, info, warning or error; one line per event, key=value fields", "debug"),
    Key("etcd.endpoints", '["http://127.0.0.1:2379"]', "tried in order, starting with the last that worked",
        ["http://10.0.0.11:2379"]),
    Key("etcd.prefix", "/vipd/default/", "key prefix of this cluster", "/vipd/prod/"),
    Key("etcd.lease_ttl", "3", "seconds asked; etcd may grant more (its minimum is 1.5 x election timeout)", 4),
    Key("etcd.request_timeout", "0.5", "seconds per request and endpoint", 0.3),
    Key("etcd.ca_file", "-", "TLS: the CA that signed etcd's server certificate", None),
    Key("etcd.cert_file", "-", "TLS client certificate (with key_file)", None),
    Key("etcd.key_file", "-", "TLS client key (with cert_file)", None),
    Key("etcd.username", "-", "etcd authentication (with password or password_file)", None),
    Key("etcd.password", "-", "etcd password", None),
    Key("etcd.password_file", "-", "file holding the etcd password", None),
    Key("timing.fence_margin", "1.5", "seconds; >= 1.25: the address lifetime ends this long before the lease "
        "could expire", 1.75),
    Key("timing.keepalives_per_ttl", "6", "keepalive every TTL/N", 4),
    Key("timing.reconcile_interval", "1.0", "seconds between level-triggered checks of kernel state", 0.5),
    Key("timing.release_holdoff", "3.0", "seconds a host that released a VIP does not campaign for it", 1.0),
    Key("metrics.listen", "127.0.0.1:9654", "host:port of the Prometheus endpoint; \"\" disables it", ""),
    Key("host.weight", "1.0", "placement weight, 0 to 1000 (0: take VIPs only when no other host can)", 2.0),
    Key("host.check", "[]", "host checks ([[host.check]]); failing any releases every VIP of this host", None),
    Key("placement.preempt", "true", "hand VIPs back to their preferred host", False),
    Key("placement.preempt_delay", "5.0", "... once it has been preferred and healthy this long (seconds)", 30.0),
    Key("placement.campaign_stagger", "0.2", "seconds per place behind in the ranking before campaigning", 0.1),
    Key("placement.join_grace", "5.0", "seconds a host that just joined has to claim its share before the others "
        "campaign for it (cold start)", 1.0),
    Key("placement.handover_batch", "256", "VIPs this host hands back to their preferred hosts at once (1: one at "
        "a time)", 64),
    Key("hooks.owner", "-", "argv run when this host becomes owner", ["/bin/true"]),
    Key("hooks.backup", "-", "argv run when this host becomes a standby", ["/bin/true"]),
    Key("hooks.fenced", "-", "argv run when this host fenced itself (lease not proven)", ["/bin/true"]),
    Key("hooks.fault", "-", "argv run when a claim failed", ["/bin/true"]),
    Key("hooks.timeout", "10", "seconds before a hook's process group is killed", 5),
    Key("bgp.source", "-", "this host's fixed BGP source address (kept on lo)", None),
    Key("bgp.source_pool", "-", "or a prefix to allocate it from, once per node, through etcd", None),
    Key("bgp.peers", "[]", "BGP peers whose sessions leave from the source address", None),
    Key("bgp.snat", "false", "also SNAT tcp/179 to the peers (speakers that cannot bind a source)", None),
    Key("peers.enabled", "true", "fast takeover on (off: every VIP fails over by the lease TTL)", False),
    Key("peers.port", "9655", "UDP port of the heartbeats", 9656),
    Key("peers.interval", "0.010", "h: seconds between heartbeats to each peer (below lease/3)", 0.02),
    Key("peers.lease", "0.090", "L: an owner serves at most L past a heartbeat its successor echoed", 0.1),
    Key("peers.grace", "0.130", "G: a successor takes over no earlier than G after its last ack "
        "(at least L + 0.02); above the longest pause the daemon sees (GC, a starved CPU)", 0.2),
    Key("peers.stall", "1.0", "heartbeats stop once the daemon's event loop has not run this long "
        "(a hung loop is suspected within stall + G); at least L", 2.0),
    Key("peers.key_file", "-", "the cluster key, hex, >= 16 bytes (default: created once in etcd)", None),
    Key("peers.key", "-", "the cluster key inline (prefer key_file)", "ab" * 16),
    Key("peers.address", "-", "this host's heartbeat address (default: its IPv4 on the first NIC VIP's "
        "interface)", "192.0.2.10"),
    Key("vip[].name", "-", "unique name (letters, digits, '_', '.', '-')", None),
    Key("vip[].address", "-", "address with prefix length (bare = /32 or /128)", None),
    Key("vip[].interface", "lo", "lo: a routed VIP (BGP announces it); a NIC: an L2 VIP (GARP/NA)", None),
    Key("vip[].group", "-", "VIPs of one group always have the same owner", "g1"),
    Key("vip[].mode", "single", "single (one elected owner) or anycast (every fit host; lo only)", "single"),
    Key("vip[].prefer", "[]", "hosts to prefer, best first", ["cp1"]),
    Key("vip[].avoid", "[]", "hosts to use only when nothing else is healthy", ["cp3"]),
    Key("vip[].announce_count", "3", "gratuitous ARP / unsolicited NA bursts after a claim", 2),
    Key("vip[].announce_interval", "0.2", "seconds between bursts", 0.1),
    Key("vip[].announce_reply", "false", "also send the ARP reply form", True),
    Key("vip[].conflict_check", "true", "ARP probe / DAD before the first claim on a NIC", False),
    Key("vip[].check", "[]", "VIP checks ([[vip.check]]); failing any releases the VIP (its whole group)", None),
    Key("vip[].service", "[]", "DSR services ([[vip.service]]: protocol, port, backends) directed by the owner", None),
    Key("check[].type", "-", "tcp, http, command or carrier", None),
    Key("check[].name", "-", "a label for logs and status", None),
    Key("check[].interval", "2.0", "seconds between runs", None),
    Key("check[].timeout", "min(1, interval)", "seconds before a run counts as failed", None),
    Key("check[].rise", "2", "passes in a row to become healthy", None),
    Key("check[].fall", "3", "failures in a row to become unhealthy", None),
    Key("check[].host, check[].port", "-", "tcp: where to connect", None),
    Key("check[].url", "-", "http: http(s)://host[:port]/path", None),
    Key("check[].expect_status", "200", "http: the status that passes", None),
    Key("check[].ca_file, cert_file, key_file", "-", "http: TLS files", None),
    Key("check[].insecure", "false", "http: skip certificate checks (loopback URLs only)", None),
    Key("check[].command", "-", "command: argv; exit status 0 passes", None),
    Key("check[].interface", "-", "carrier: the link whose carrier must be up", None),
    Key("egress[].name", "-", "rule name (<= 24 characters)", None),
    Key("egress[].vip", "-", "the VIP whose address becomes the source", None),
    Key("egress[].destinations", "[] (any)", "destination prefixes", None),
    Key("egress[].protocol", "-", "tcp or udp", None),
    Key("egress[].ports", "[]", "destination ports (with protocol)", None),
    Key("egress[].sources", "[]", "source prefixes", None),
    Key("egress[].out_interface", "-", "outgoing interface (a trailing * matches a prefix)", None),
)


def by_section() -> dict[str, list[Key]]:
    out: dict[str, list[Key]] = {s: [] for s in SECTIONS}
    for k in KEYS:
        head, _, _ = k.key.partition(".")
        section = head if "." in k.key else ""
        out[section].append(k)
    return out

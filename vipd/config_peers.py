"""The `[peers]` table: host-to-host heartbeats for fast takeover (see vipd/peers/protocol.py)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from vipd.configlib import Table
from vipd.configlib import positive
from vipd.errors import ConfigError

MIN_KEY_BYTES = 16
MIN_GRACE_OVER_LEASE = 0.020  # G - L must cover clock-rate error, netlink delay and the 4 ms nft tick


@dataclass(frozen=True)
class PeersConfig:
    enabled: bool = True
    port: int = 9655
    interval: float = 0.010  # h: one datagram per host pair every h
    lease: float = 0.090  # L: the owner's token runs at most L past a heartbeat the successor acked
    grace: float = 0.130  # G: the successor never takes over before its last ack + G
    key: bytes | None = field(default=None, repr=False)  # None: bootstrapped through etcd (<prefix>peerkey)
    address: str | None = None  # None: this host's address on the VIPs' interface
    stall: float = 1.0  # heartbeats stop once the daemon's loop has not run for this long (a hang)


def parse_peers(t: Table) -> PeersConfig:
    enabled = t.get("enabled", bool, True)
    port = t.get("port", int, 9655)
    if not 1 <= port <= 65535:
        raise ConfigError(t.key("port"), f"must be between 1 and 65535, got {port}")
    interval = float(positive(t.key("interval"), t.get("interval", (int, float), 0.010), 0, 1))
    lease = float(positive(t.key("lease"), t.get("lease", (int, float), 0.090), 0, 10))
    grace = float(positive(t.key("grace"), t.get("grace", (int, float), 0.130), 0, 30))
    if grace < lease + MIN_GRACE_OVER_LEASE:
        raise ConfigError(t.key("grace"), f"must exceed lease by at least {MIN_GRACE_OVER_LEASE * 1000:.0f} ms "
                                          f"(got grace {grace}, lease {lease})")
    if interval >= lease / 3:
        raise ConfigError(t.key("interval"), f"must be below lease/3 ({lease / 3:.4f}), got {interval}")
    key_file = t.get("key_file", str)
    key_hex = t.get("key", str)
    if key_file is not None and key_hex is not None:
        raise ConfigError(t.key("key"), "give key or key_file, not both")
    key: bytes | None = None
    if key_hex is not None:
        key = _hex(t.key("key"), key_hex)
    if key_file is not None:
        try:
            raw = Path(key_file).read_bytes()
        except OSError as e:
            raise ConfigError(t.key("key_file"), f"cannot read {key_file}: {e.strerror}") from None
        try:
            key = _hex(t.key("key_file"), raw.decode("ascii").strip())
        except UnicodeDecodeError:
            raise ConfigError(t.key("key_file"), "must hold the key as hex text") from None
    address = t.get("address", str)
    if address is not None:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ConfigError(t.key("address"), f"{address!r} is not an IP address") from None
    stall = float(positive(t.key("stall"), t.get("stall", (int, float), 1.0), 0, 60))
    if stall < lease:
        raise ConfigError(t.key("stall"), f"must be at least lease ({lease}), got {stall}")
    t.done()
    return PeersConfig(enabled, port, interval, lease, grace, key, address, stall)


def _hex(key: str, text: str) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(key, "is not hex") from None
    if len(raw) < MIN_KEY_BYTES:
        raise ConfigError(key, f"the cluster key must be at least {MIN_KEY_BYTES} bytes ({2 * MIN_KEY_BYTES} hex "
                               f"digits), got {len(raw)}")
    return raw

"""The cluster key for heartbeat authentication: from the config, or bootstrapped once through etcd.

With no `[peers] key` / `key_file`, the first host creates `<prefix>peerkey` (32 random bytes, hex)
in a transaction requiring create_revision == 0; every other host (and every later start) reads the
key that won. The key is then only as secret as etcd's read access: use etcd authentication / TLS,
or configure the key through `key_file` instead.
"""

from __future__ import annotations

import secrets
from typing import Protocol

from vipd.errors import EtcdRequestError
from vipd.peers.wire import MIN_KEY_LEN


class KeyValueLike(Protocol):
    value: str


class KeyClient(Protocol):
    async def create(self, key: str, value: str, lease_id: int) -> tuple[bool, KeyValueLike]: ...


def key_name(prefix: str) -> str:
    return prefix + "peerkey"


async def cluster_key(client: KeyClient, prefix: str, configured: bytes | None = None) -> bytes:
    """The configured key, else the one stored in etcd (created by whichever host asked first)."""
    if configured is not None:
        return configured
    _, kv = await client.create(key_name(prefix), secrets.token_hex(32), 0)  # no lease: lives forever
    try:
        key = bytes.fromhex(kv.value)
    except ValueError:
        raise EtcdRequestError(f"{key_name(prefix)} in etcd is not hex") from None
    if len(key) < MIN_KEY_LEN:
        raise EtcdRequestError(f"{key_name(prefix)} in etcd is shorter than {MIN_KEY_LEN} bytes")
    return key

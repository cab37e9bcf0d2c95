"""The host presence key `<prefix>hosts/<node>`: one live vipd per node name in a cluster.

Two hosts configured with the same node name (the default is the hostname, and cloned VMs share it)
would otherwise overwrite each other's presence and fight over each other's owner keys. So the key
is created only if absent (a create_revision == 0 transaction), and its value carries who holds it:
a per-process instance id, the pid, the kernel's boot id, the state directory, the host name and
the address this host reaches etcd from. Updates replace it only while it still holds our value
(compare value + create_revision), so a duplicate can never overwrite it.

When the key exists and is not ours:
- our own earlier run on this host (same boot id and state directory: the state_dir lock allows one
  daemon there at a time) left it: taken over at once;
- otherwise it may be a dead instance's key waiting for its lease to expire: wait out that lease's
  TTL once; if the key is still there with the same create_revision, its holder keeps the lease
  alive: a live duplicate. DuplicateNode (a ConfigError on `node`, exit 2) then stops this daemon
  before it has a valid lease, so it never campaigns and never touches an owner key.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.parse
import uuid
from typing import Any, Protocol

import trio

from vipd import log
from vipd.errors import ConfigError

_ROUNDS = 4  # create / take over / wait-out attempts before giving up (each bounded)
_EXPIRY_SLACK = 1.5  # s past a lease's remaining TTL: etcd's expiry sweep runs every 0.5 s


class DuplicateNode(ConfigError):
    """Another live vipd holds this node name."""


class PresenceClient(Protocol):
    async def create(self, key: str, value: str, lease_id: int) -> tuple[bool, Any]: ...
    async def replace_if(self, key: str, old: str, new: str, create_revision: int, lease_id: int) -> bool: ...
    async def time_to_live(self, lease_id: int) -> int: ...
    async def get(self, key: str) -> Any: ...


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _source_address(endpoint: str | None) -> str:
    """The local address this host reaches `endpoint` from (a UDP connect sends nothing)."""
    if not endpoint:
        return ""
    url = urllib.parse.urlsplit(endpoint)
    try:
        infos = socket.getaddrinfo(url.hostname, url.port or 2379, type=socket.SOCK_DGRAM,
                                   flags=socket.AI_NUMERICHOST)
        with socket.socket(infos[0][0], socket.SOCK_DGRAM) as s:
            s.connect(infos[0][4])
            return str(s.getsockname()[0])
    except (OSError, IndexError, ValueError):
        return ""


class Presence:
    """Claims and updates one node's presence key for this process."""

    def __init__(self, client: PresenceClient, key: str, *, state_dir: str = "", endpoint: str | None = None) -> None:
        self._client = client
        self.key = key
        self.node = key.rstrip("/").rsplit("/", 1)[-1]
        self.identity = {"instance": uuid.uuid4().hex, "pid": os.getpid(), "boot": _boot_id(),
                         "state_dir": state_dir, "hostname": socket.gethostname(),
                         "addr": _source_address(endpoint)}
        self._held: tuple[int, str] | None = None  # (create_revision, value) of our key

    def value(self, info: str) -> str:
        """The presence value (HostInfo JSON) with who holds it merged in."""
        try:
            d = json.loads(info)
        except ValueError:
            d = {}
        if not isinstance(d, dict):
            d = {}
        d["holder"] = self.identity
        return json.dumps(d, sort_keys=True)

    def _ours(self, holder: dict[str, Any], kv: Any, lease_id: int) -> bool:
        if kv.lease == lease_id or holder.get("instance") == self.identity["instance"]:
            return True
        return bool(holder.get("boot")) and (holder.get("boot"), holder.get("state_dir")) == \
            (self.identity["boot"], self.identity["state_dir"])  # our own earlier run on this host

    async def claim(self, info: str, lease_id: int) -> None:
        """Create the key on lease_id, or take over our own earlier one; DuplicateNode if another
        live vipd holds it. EtcdError passes through (the caller retries)."""
        value = self.value(info)
        for _ in range(_ROUNDS):
            won, kv = await self._client.create(self.key, value, lease_id)
            if won:
                self._held = (kv.create_revision, value)
                return
            holder = _holder(kv.value)
            if self._ours(holder, kv, lease_id):
                if await self._client.replace_if(self.key, kv.value, value, kv.create_revision, lease_id):
                    log.info("presence_taken_over", node=self.node, previous_pid=holder.get("pid"))
                    self._held = (kv.create_revision, value)
                    return
                continue
            left = await self._client.time_to_live(kv.lease)
            if left < 0:
                continue  # its lease just went: try again
            log.warning("presence_held", node=self.node, holder=_describe(holder), wait=left + _EXPIRY_SLACK,
                        reason="another vipd holds this node name; waiting its lease out once")
            await trio.sleep(left + _EXPIRY_SLACK)
            again = await self._client.get(self.key)
            if again is None or again.create_revision != kv.create_revision:
                continue
            # still there after its lease's remaining time: alive only if the lease was renewed since
            # (a dead lease past its deadline has under a second left, or is gone)
            if await self._client.time_to_live(kv.lease) >= 1:
                raise DuplicateNode("node", f"{self.node!r} is already in use by another live vipd "
                                            f"({_describe(_holder(again.value))}); give every host its own "
                                            "node name (`node` in the config; the default is the hostname)")
        raise DuplicateNode("node", f"{self.node!r}: could not take the presence key in {_ROUNDS} attempts; is "
                                    "another vipd starting with this node name?")

    async def update(self, info: str, lease_id: int) -> None:
        """Replace our value (health, weight changed); claim again if it is no longer ours."""
        value = self.value(info)
        if self._held is not None:
            rev, old = self._held
            if value == old:
                return
            if await self._client.replace_if(self.key, old, value, rev, lease_id):
                self._held = (rev, value)
                return
        await self.claim(info, lease_id)


def _holder(value: str) -> dict[str, Any]:
    try:
        d = json.loads(value)
    except ValueError:
        return {}
    h = d.get("holder") if isinstance(d, dict) else None
    return h if isinstance(h, dict) else {}


def _describe(h: dict[str, Any]) -> str:
    if not h:
        return "a vipd that does not say who it is"
    return f"pid {h.get('pid', '?')} on host {h.get('hostname') or '?'} address {h.get('addr') or '?'}"

"""The ports vipd/succession.py uses: the token fence, the owner keys, the heartbeat links, metrics."""

from __future__ import annotations

from typing import Callable, Optional, Protocol, Sequence

from vipd.model import OwnerRecord, VipSpec
from vipd.peers.protocol import Generation


class TokenFence(Protocol):
    def covers(self, vips: Sequence[VipSpec]) -> bool: ...
    async def arm_many(self, items: Sequence[tuple[Sequence[VipSpec], float]], *,
                       grants: Sequence[tuple[str, float]] = (),
                       groups: Sequence[tuple[Sequence[VipSpec], Optional[str]]] = ()) -> None: ...
    async def disarm(self, vips: Sequence[VipSpec]) -> None: ...
    def armed_until(self, vips: Sequence[VipSpec]) -> Optional[float]: ...


class Keys(Protocol):
    async def rename(self, items: Sequence[tuple[str, OwnerRecord, str | None]]) -> dict[str, tuple[bool, OwnerRecord]]: ...
    async def take_over(self, vip: str, record: OwnerRecord, lease: int,
                        still: Callable[[], bool] = ...) -> tuple[bool, OwnerRecord]: ...


class Link(Protocol):  # vipd.peers.protocol.PeerLink, as read here
    suspected: bool
    peer_gen: Generation | None
    validated: Generation | None
    last_rx: float | None  # when the peer was last heard (None: never)
    last_send: float | None  # when we last sent it a heartbeat (None: never)
    def granted_until(self, validated: Generation | None = None) -> float | None: ...
    def granted_upto(self, gen: Generation | None) -> float | None: ...


class PeersPort(Protocol):  # vipd.peers.transport.PeerTransport
    def suspect(self, peer: str) -> bool: ...
    def validate(self, peer: str, gen: Generation) -> None: ...
    def link(self, peer: str) -> Link | None: ...
    def peer_names(self) -> list[str]: ...


class Counts(Protocol):
    def record_takeover(self, vip: str, cause: str, seconds: float | None = None) -> None: ...

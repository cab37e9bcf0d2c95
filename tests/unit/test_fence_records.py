"""The token fence's records stay true to the kernel when a batch fails (vipd/dataplane/fence_nft.py,
fence_send.py): a group membership is forgotten only once the kernel let go of it (a later join
would otherwise clash with the element still there: EEXIST on every arm), and a grant's chain and
set count as created only once they are."""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace
from typing import Any

import pytest
import trio
from pyroute2.netlink.exceptions import NetlinkError

from vipd.config import VipSpec
from vipd.dataplane import fence_send
from vipd.dataplane.fence_nft import NftFence
from vipd.dataplane.fence_send import TokenOps
from vipd.errors import FenceError

A = ipaddress.ip_interface("10.0.0.1/32")
VIP = VipSpec("a", A, "eth0")


def fence_with(results: list[bool]) -> tuple[NftFence, list[TokenOps]]:
    """A fence holding VIP `a` in h2's group; each batch fails or goes through as `results` says."""
    fence = NftFence(object(), timeout_update=True)  # type: ignore[arg-type]
    fence._managed = {"a": (A, "eth0")}
    fence._until, fence._group, fence._grant_until = {"a": 50.0}, {"a": "h2"}, {"h2": 50.0}
    sent: list[TokenOps] = []

    def send_tokens(s: Any, ops: TokenOps, rebuilt: Any) -> int:
        sent.append(ops)
        return len(ops.tokens)

    async def run(what: Any, fn: Any) -> Any:
        if not results.pop(0):
            raise FenceError("disarm fence tokens of 10.0.0.1: Operation not permitted (errno 1)")
        return fn(None)

    fence._send_tokens = send_tokens  # type: ignore[method-assign]
    fence._run = run  # type: ignore[method-assign]
    return fence, sent


def test_a_failed_disarm_keeps_the_membership_the_kernel_still_has() -> None:
    async def main() -> None:
        fence, sent = fence_with([False, True])
        with pytest.raises(FenceError, match="errno 1"):
            await fence.disarm([VIP])
        assert fence.grant_of(VIP) == "h2"  # still in the kernel's group map
        await fence.disarm([VIP])
        assert sent[-1].leave == [A] and fence.grant_of(VIP) is None

    trio.run(main)


def test_a_failed_group_change_changes_no_record() -> None:
    async def main() -> None:
        fence, sent = fence_with([False, True])
        with pytest.raises(FenceError):
            await fence.arm_many([([VIP], 60.0)], grants=[("h3", 60.0)], groups=[([VIP], "h3")])
        assert fence.grant_of(VIP) == "h2" and fence._grant_until == {"h2": 50.0}
        await fence.arm_many([([VIP], 60.0)], grants=[("h3", 60.0)], groups=[([VIP], "h3")])
        assert sent[-1].leave == [A] and [g for _, g in sent[-1].join] == [fence._id("h3")]
        assert fence.grant_of(VIP) == "h3"

    trio.run(main)


def test_a_grant_whose_chain_could_not_be_created_is_not_counted_created() -> None:
    def refuse(msgs: Any) -> None:
        raise NetlinkError(1, "Operation not permitted")

    socks = SimpleNamespace(created={1}, per_elem=2e-6, last_batch=0.0, nft=SimpleNamespace(nlm_request_batch=refuse))
    ops = TokenOps([(A, 1e12)], [(2, 1e12)], join=[(A, 2)])
    with pytest.raises(NetlinkError):
        fence_send.write(socks, ops, lambda: TokenOps(), None, True)  # type: ignore[arg-type]
    assert socks.created == {1}

"""AddressManager's batched deletions (vipd/dataplane/address.py) when the kernel refuses one: the
refusing VIP gets its own clear error naming its address and the errno, every other VIP in the
batch is still deleted or claimed, and nothing is raised as a traceback (scripted kernel: the
netlink owner thread is replaced by a direct call, the raw socket by a script)."""

from __future__ import annotations

import errno
import ipaddress
from typing import Any, Callable

import pytest

from vipd.dataplane import address as am
from vipd.dataplane import addrdump
from vipd.dataplane.netlink import Netlink
from vipd.errors import AddressError
from vipd.model import VipSpec


class Nl:
    """What AddressManager uses of Netlink: jobs run at once, the real error mapping."""

    call_checked = Netlink.call_checked

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        return fn(None)

    def route_socket(self) -> tuple[None, int]:
        return None, 1

    def reserve_seq(self, count: int) -> None:
        pass


def vip(name: str, text: str) -> VipSpec:
    return VipSpec(name, ipaddress.ip_interface(text), "eth0")


def raw(text: str, proto: int = am.VIPD_PROTO) -> addrdump.RawAddress:
    iface = ipaddress.ip_interface(text)
    return addrdump.RawAddress(2, iface, proto, 5, 0, iface.ip)


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    k: dict[str, Any] = {"entries": [], "refuse": {}, "deleted": [], "replaced": []}

    def delete_many(_sock: Any, _seq: int, entries: list[addrdump.RawAddress]) -> list[int]:
        k["deleted"] += [str(e.address) for e in entries]
        return [k["refuse"].get(str(e.address), 0) for e in entries]

    def replace_many(_sock: Any, _seq: int, items: list[Any]) -> list[int]:
        k["replaced"] += [str(address) for _, address, _, _ in items]
        k["lifetimes"] = k.get("lifetimes", []) + [life for _, _, life, _ in items]
        return [0] * len(items)

    monkeypatch.setattr(am, "_entries", lambda nl, index=None: k["entries"])
    monkeypatch.setattr(am, "_index", lambda nl, ifname: 2)
    monkeypatch.setattr(addrdump, "delete_many", delete_many)
    monkeypatch.setattr(addrdump, "replace_many", replace_many)
    return k


async def test_a_refused_release_is_that_vips_error_and_the_others_are_released(kernel: dict[str, Any]) -> None:
    vips = [vip("a", "10.0.0.1/32"), vip("b", "fd00::2/128"), vip("c", "10.0.0.3/32")]
    kernel["entries"] = [raw(str(v.address)) for v in vips]
    kernel["refuse"] = {"fd00::2/128": errno.EPERM}
    failures = await am.AddressManager(Nl()).release_many(vips)  # type: ignore[arg-type]
    assert kernel["deleted"] == ["10.0.0.1/32", "fd00::2/128", "10.0.0.3/32"]
    assert failures[0] is None and failures[2] is None
    assert str(failures[1]) == "release fd00::2/128 on eth0: Operation not permitted (errno 1)"


async def test_a_refused_stray_removal_raises_one_clear_error_after_removing_the_rest(kernel: dict[str, Any]) -> None:
    kernel["entries"] = [raw("10.0.0.1/32"), raw("10.0.0.2/32")]
    kernel["refuse"] = {"10.0.0.1/32": errno.EBUSY}
    items = [am.tagged_address("eth0", ipaddress.ip_interface(t)) for t in ("10.0.0.1/32", "10.0.0.2/32")]
    with pytest.raises(AddressError, match=r"remove 2 addresses: .*10\.0\.0\.1/32.*errno 16"):
        await am.AddressManager(Nl()).remove_many(items)  # type: ignore[arg-type]
    assert kernel["deleted"] == ["10.0.0.1/32", "10.0.0.2/32"]


async def test_a_claim_whose_old_prefix_copy_cannot_go_fails_alone(kernel: dict[str, Any]) -> None:
    """Our own copy with an old prefix length must go before the claim (IPv6 replace would keep it):
    refused, that claim fails with the reason and is not added; the other claim goes through."""
    kernel["entries"] = [raw("10.0.0.1/24")]
    kernel["refuse"] = {"10.0.0.1/24": errno.EPERM}
    failures = await am.AddressManager(Nl()).claim_many([(vip("a", "10.0.0.1/32"), 9), (vip("b", "10.0.0.2/32"), 9)])  # type: ignore[arg-type]
    assert kernel["deleted"] == ["10.0.0.1/24"] and kernel["replaced"] == ["10.0.0.2/32"]
    assert failures[1] is None and "Operation not permitted (errno 1)" in str(failures[0])
    assert str(failures[0]).startswith("claim 10.0.0.1/32")


async def test_lifetimes_computed_before_a_hold_up_are_shortened_by_it_or_not_sent(kernel: dict[str, Any]) -> None:
    """The process stopped (SIGSTOP) or starved between computing a lifetime and telling the kernel:
    sent as computed, the countdown would start late and the address (the only fence of a routed
    VIP) outlive its deadline by the hold-up. It is shortened by it, rounded up; one that would
    not reach a second is not sent (the running countdown ends first) and fails, saying why."""
    import time
    mgr = am.AddressManager(Nl())  # type: ignore[arg-type]
    a, b = vip("a", "10.0.0.1/32"), vip("b", "10.0.0.2/32")
    failures = await mgr.refresh_many([(a, 9), (b, 2)], at=time.perf_counter() - 1.2)
    assert {n: str(e) for n, e in failures.items()} == {"b": f"refresh 10.0.0.2/32 on eth0: {am._LATE}"}
    assert kernel["replaced"] == ["10.0.0.1/32"] and kernel["lifetimes"] == [7]  # 9 - ceil(1.2)
    claimed = await mgr.claim_many([(a, 9), (b, 2)], at=time.perf_counter() - 1.2)
    assert claimed[0] is None and str(claimed[1]) == f"claim 10.0.0.2/32 on eth0: {am._LATE}"
    assert kernel["lifetimes"] == [7, 7]
    await mgr.refresh_many([(a, 9)], at=time.perf_counter() - 0.3)  # an ordinary wait: as computed
    assert kernel["lifetimes"] == [7, 7, 9]
    assert am._aged(am._FOREVER, time.perf_counter() - 100) == am._FOREVER

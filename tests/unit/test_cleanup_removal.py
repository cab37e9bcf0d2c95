"""`vipd cleanup`'s address removal (vipd/cleanup.py) against a scripted rtnetlink: only tagged
addresses (never the fixed BGP source), all of them in one pipelined deletion, and one that the
kernel refuses is named in one clear error while every other one is still removed."""

from __future__ import annotations

import errno
import ipaddress
import logging
from types import SimpleNamespace
from typing import Any

import pytest

from vipd import cleanup
from vipd.dataplane import addrdump
from vipd.errors import DataplaneError


def raw(text: str, proto: int, index: int = 1) -> addrdump.RawAddress:
    iface = ipaddress.ip_interface(text)
    return addrdump.RawAddress(index, iface, proto, 5, 0, iface.ip)


class Sock:
    def __enter__(self) -> "Sock":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    k: dict[str, Any] = {"entries": [], "codes": {}, "deleted": []}

    def delete_many(_sock: Any, _seq: int, entries: list[addrdump.RawAddress]) -> list[int]:
        k["deleted"].append([str(e.address) for e in entries])
        return [k["codes"].get(str(e.address), 0) for e in entries]

    monkeypatch.setattr(addrdump, "open_socket", lambda: Sock())
    monkeypatch.setattr(addrdump, "dump", lambda _sock, _seq: k["entries"])
    monkeypatch.setattr(addrdump, "delete_many", delete_many)
    monkeypatch.setattr(cleanup.socket, "if_indextoname", lambda i: {1: "lo", 2: "eth0"}[i])
    return k


def config(source: str | None = None) -> Any:
    return SimpleNamespace(bgp=SimpleNamespace(source=ipaddress.ip_address(source) if source else None))


def test_only_tagged_addresses_go_in_one_deletion_and_the_bgp_source_stays(kernel: dict[str, Any]) -> None:
    kernel["entries"] = [raw("10.0.0.1/32", cleanup.VIPD_PROTO), raw("10.9.9.9/32", cleanup.VIPD_PROTO),
                         raw("fd00::2/128", cleanup.VIPD_PROTO, 2), raw("192.0.2.1/24", 0, 2)]
    assert cleanup.remove_addresses(config("10.9.9.9")) == 2
    assert kernel["deleted"] == [["10.0.0.1/32", "fd00::2/128"]]


def test_a_refused_deletion_is_named_and_every_other_address_is_still_removed(
        kernel: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vipd")
    kernel["entries"] = [raw("10.0.0.1/32", cleanup.VIPD_PROTO), raw("fd00::2/128", cleanup.VIPD_PROTO, 2),
                         raw("10.0.0.3/32", cleanup.VIPD_PROTO)]
    kernel["codes"] = {"fd00::2/128": errno.EPERM}
    with pytest.raises(DataplaneError, match=r"removing vipd's addresses: .*fd00::2/128 on eth0"):
        cleanup.remove_addresses(config())
    assert kernel["deleted"] == [["10.0.0.1/32", "fd00::2/128", "10.0.0.3/32"]]
    removed = [r.getMessage() for r in caplog.records if "cleanup_address_removed" in r.getMessage()]
    assert len(removed) == 2 and any("10.0.0.3/32" in m for m in removed)


def test_the_crash_path_loads_no_async_or_netlink_library_before_removing() -> None:
    """`vipd cleanup` (ExecStopPost after a crash) removes the addresses with what the CLI, the
    config and vipd.cleanup load: none of trio, pyroute2, httpx (each costs tens of ms at start,
    and the VIP answers from the dead host's kernel until the removal; vipd/hooks_config.py)."""
    import subprocess
    import sys

    code = ("import sys, vipd.cli, vipd.config, vipd.config_host, vipd.cleanup, vipd.instance, vipd.dataplane.addrdump; "
            "print(sorted(m for m in ('trio', 'pyroute2', 'httpx', 'prometheus_client') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

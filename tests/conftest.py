"""Shared test gate: lab tests need root, network namespaces and the etcd binary.

Elsewhere they skip with the reason; with VIPD_REQUIRE_LAB=1 (set by .ci/run) a missing
requirement fails the test instead, so CI can never count a skipped lab test as passing.
"""

from __future__ import annotations

import os
import shutil

import pytest

pytest_plugins = ["tests.etcd_fixtures"]


def lab_missing() -> str | None:
    """Why lab tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "lab tests need root (network namespaces, netlink, AF_PACKET)"
    for tool in ("ip", "etcd", "nft"):
        if shutil.which(tool) is None:
            return f"lab tests need the {tool!r} binary (run `make test`, which installs it)"
    if not os.path.isdir("/var/run/netns") and not os.access("/var/run", os.W_OK):
        return "cannot create network namespaces here"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "/lab/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.lab)


def _tools_missing(item: pytest.Item) -> str | None:
    for marker in item.iter_markers("needs_tools"):
        for tool in marker.args:
            if (os.path.exists(tool) if os.sep in tool else shutil.which(tool)) is None or (
                    os.sep in tool and not os.path.exists(tool)):
                return f"needs {tool!r} (run `make test`, which installs it)"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("lab") is None:
        return
    reason = lab_missing() or _tools_missing(item)
    if reason is None:
        return
    if os.environ.get("VIPD_REQUIRE_LAB") == "1":
        pytest.fail(f"VIPD_REQUIRE_LAB=1 but {reason}", pytrace=False)
    pytest.skip(reason)

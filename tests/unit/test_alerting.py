"""Shipped alerting: the Prometheus rules pass `promtool check rules` and their unit tests
(`promtool test rules`), and every vipd metric the rules and the Grafana dashboard use is one the
daemon exports (a renamed metric would silently never alert)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from vipd.metrics import Metrics

CONF = Path(__file__).resolve().parents[2] / "conf"
RULES = CONF / "prometheus" / "vipd-rules.yml"
DASHBOARD = CONF / "grafana" / "vipd-dashboard.json"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("VIPD_REQUIRE_LAB") == "1":
            pytest.fail("VIPD_REQUIRE_LAB=1 but promtool is missing (Debian's prometheus package; make test installs it)")
        pytest.skip("needs promtool (run `make test`, which installs it)")
    return found


def test_rules_pass_promtool_check_and_unit_tests() -> None:
    tool = promtool()
    check = subprocess.run([tool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "8 rules found" in check.stdout, check.stdout + check.stderr
    test = subprocess.run([tool, "test", "rules", "vipd-rules.test.yml"], cwd=RULES.parent, capture_output=True,
                          text=True, timeout=60)
    assert test.returncode == 0 and "SUCCESS" in test.stdout, test.stdout + test.stderr


def exported() -> set[str]:
    text = Metrics("n1").render().decode()
    return {re.sub(r"_total$", "", m.group(1)) for m in re.finditer(r"^# TYPE (\w+) ", text, re.M)}


def used(text: str) -> set[str]:
    names = set(re.findall(r"\b(vipd_[a-z0-9_]+)", text))
    return {re.sub(r"_(bucket|total|count|sum)$", "", n) for n in names}


def test_rules_and_dashboard_use_only_exported_metrics() -> None:
    have = exported()
    rules, dash = used(RULES.read_text()), used(DASHBOARD.read_text())
    assert rules - have == set() and dash - have == set()
    assert {"vipd_l2_blocked", "vipd_takeovers", "vipd_vip_address_present", "vipd_etcd_reachable"} <= rules
    panels = json.loads(DASHBOARD.read_text())["panels"]
    titles = {p["title"] for p in panels}
    assert {"Owner per VIP", "Ownership transitions", "Keepalive latency", "Failover time (takeover)"} <= titles

"""The lab monitor's rule for states recorded mid-storm (vipd/lab/monitor.py): hosts read one after
another while addresses keep changing are no snapshot, so such a state never shows a new overlap."""

import ipaddress
import math
from types import SimpleNamespace
from typing import Any

from vipd.lab.fence_tokens import Judgement
from vipd.lab.monitor import AddressMonitor

IP = ipaddress.ip_address("10.213.0.102")
OTHER = ipaddress.ip_address("10.213.0.103")


def monitor(recorded: dict[Any, frozenset[str]]) -> AddressMonitor:
    mon = AddressMonitor(SimpleNamespace(hosts=[]), [IP, OTHER])  # type: ignore[arg-type]
    for ip, holders in recorded.items():
        mon._timeline[ip].append((0.0, holders))
    return mon


def judged(serving: dict[Any, frozenset[str]]) -> Judgement:
    return Judgement(1.0, serving, set(), math.inf, set())


def test_an_unsettled_state_keeps_the_recorded_holder_instead_of_a_new_overlap() -> None:
    mon = monitor({IP: frozenset({"h1"})})
    j = mon._no_new_dual(judged({IP: frozenset({"h1", "h2"})}))
    assert j.serving == {IP: frozenset({"h1"})}


def test_an_unsettled_state_keeps_no_holder_when_none_was_recorded() -> None:
    mon = monitor({IP: frozenset()})
    assert mon._no_new_dual(judged({IP: frozenset({"h1", "h2"})})).serving == {}
    assert monitor({})._no_new_dual(judged({IP: frozenset({"h1", "h2"})})).serving == {}


def test_an_unsettled_state_still_moves_to_one_holder_or_none_and_keeps_a_recorded_overlap() -> None:
    mon = monitor({IP: frozenset({"h1"}), OTHER: frozenset({"h1", "h2"})})
    j = mon._no_new_dual(judged({IP: frozenset({"h2"}), OTHER: frozenset({"h1", "h2"})}))
    assert j.serving == {IP: frozenset({"h2"}), OTHER: frozenset({"h1", "h2"})}
    assert mon._no_new_dual(judged({})).serving == {}

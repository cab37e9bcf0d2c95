"""`evolve` (vipd/ownership/state.py): the pure core's fast `dataclasses.replace` for VipState."""

from __future__ import annotations

import dataclasses
import math

import pytest

from vipd.model import OwnerRecord, State
from vipd.ownership.state import Changes, Noted, Preempt, Release, Sub, VipState, evolve


def test_changes_name_every_field_of_vipstate_and_noted_all_but_the_four_to_sets() -> None:
    fields = {f.name: f for f in dataclasses.fields(VipState)}
    assert set(Changes.__annotations__) | set(Noted.__annotations__) == set(fields)
    assert set(fields) - set(Noted.__annotations__) == {"state", "sub", "reason", "why_not"}
    # what evolve relies on: nothing computed at construction
    assert not hasattr(VipState, "__post_init__") and all(f.init for f in fields.values())


def test_evolve_builds_what_replace_builds() -> None:
    base = VipState(state=State.OWNER, sub=Sub.SERVING, owner=OwnerRecord("h1", 7, 3), lease=5, valid_until=9.5,
                    epoch=3, ranking=("h1", "h2"), suspects=frozenset({"h3"}), changed_at=-math.inf)
    cases: list[dict] = [
        {},
        {"reason": "x", "why_not": "y"},
        {"state": State.RELEASING, "sub": Sub.REMOVING, "release": Release("shutdown")},
        {"owner": None, "absent_since": 4.0, "last_owner": "h2", "last_clean": True},
        {"preempt": Preempt("h2", 1.0), "suspects": frozenset(), "joined": (1.0, 2.0)},
    ]
    for changes in cases:
        new = evolve(base, **changes)
        assert new == dataclasses.replace(base, **changes) and new is not base
        assert type(new) is VipState and hash(new) == hash(dataclasses.replace(base, **changes))
    assert base.reason == "" and base.state is State.OWNER  # the original is untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        evolve(base, epoch=4).epoch = 5  # type: ignore[misc]


def test_an_unknown_field_is_refused_as_replace_refuses_it() -> None:
    with pytest.raises(TypeError, match="epochh"):
        evolve(VipState(), epochh=1)  # type: ignore[call-arg]

"""The successor logic (vipd/succession.py) with the real peer protocol state and fake etcd / nft:
the token cap, who is named, when a generation is validated, and when a takeover is sent."""

from __future__ import annotations

import ipaddress
import math
from typing import Any, Sequence

import trio

from vipd.election.owners import owner_value, parse_value
from vipd.model import OwnerRecord, PeerSuspected, VipSpec
from vipd.peers import wire
from vipd.peers.protocol import Acked, Params, PeerLink, Suspected
from vipd.succession import HOLD_DOWN, REBALANCE_AFTER, Succession

L, G, H = 0.090, 0.130, 0.010
VIP = VipSpec("api", ipaddress.ip_interface("10.0.0.100/24"), "eth0")
MY_INC, S_INC = 5, 7


class Fence:
    """The token fence as the kernel enforces it: a VIP's token, and the grant of its group if any."""

    def __init__(self) -> None:
        self.token: dict[str, float] = {}
        self.group: dict[str, str] = {}
        self.grant: dict[str, float] = {}
        self.batches: list[tuple[int, int, int]] = []  # (tokens, grants, group changes) per arm

    @property
    def until(self) -> dict[str, float]:
        """VIP -> when the kernel stops serving it."""
        return {n: min(t, self.grant.get(self.group[n], -math.inf)) if n in self.group else t
                for n, t in self.token.items()}

    def covers(self, vips: Sequence[VipSpec]) -> bool:
        return True

    async def arm_many(self, items: Sequence[tuple[Sequence[VipSpec], float]], *,
                       grants: Sequence[tuple[str, float]] = (),
                       groups: Sequence[tuple[Sequence[VipSpec], str | None]] = ()) -> None:
        changed = 0
        for vips, grant in groups:
            for v in vips:
                if self.group.get(v.name) != grant:
                    changed += 1
                    if grant is None:
                        self.group.pop(v.name, None)
                    else:
                        self.group[v.name] = grant
        for vips, until in items:
            for v in vips:
                self.token[v.name] = until
        self.grant.update(grants)
        self.batches.append((sum(len(v) for v, _ in items), len(grants), changed))

    async def disarm(self, vips: Sequence[VipSpec]) -> None:
        for v in vips:
            self.token.pop(v.name, None)
            self.group.pop(v.name, None)

    def armed_until(self, vips: Sequence[VipSpec]) -> float | None:
        return self.until.get(vips[0].name)

    def grant_id(self, grant: str) -> int | None:
        return None  # (nothing is handed to a heartbeat thread here: vipd/peers/grants.py has its own tests)

    def grant_of(self, vip: VipSpec) -> str | None:
        return self.group.get(vip.name)

    def open_at(self, now: float) -> bool:
        return self.until.get("api", -math.inf) > now


class Keys:
    def __init__(self) -> None:
        self.renames: list[list[tuple[str, OwnerRecord, str | None]]] = []
        self.fail: set[str] = set()  # units whose compare fails (replaced by h2)
        self.taken: list[OwnerRecord] = []
        self.revision = 100

    async def rename(self, items: Sequence[tuple[str, OwnerRecord, str | None]]) -> dict[str, tuple[bool, OwnerRecord]]:
        self.renames.append(list(items))
        self.revision += 1
        out = {}
        for name, rec, succ in items:
            if name in self.fail:
                out[name] = (False, OwnerRecord("h2", epoch=rec.revision + 1, lease=9, revision=self.revision))
            else:
                out[name] = (True, OwnerRecord("h1", rec.epoch, rec.lease, self.revision, successor=succ))
        return out

    async def take_over(self, vip: str, record: OwnerRecord, lease: int,
                        still: Any = lambda: True) -> tuple[bool, OwnerRecord]:
        await trio.sleep(0.005)  # queued behind other takeovers of a batch
        if not still():
            return False, record
        self.taken.append(record)
        return True, OwnerRecord("h1", record.revision + 1, lease, record.revision + 1)


class Peers:
    def __init__(self, now: float) -> None:
        self.links = {"h2": PeerLink("h2", MY_INC, Params(H, L, G), now)}
        self.suspects: set[str] = set()

    def suspect(self, peer: str) -> bool:
        return peer in self.suspects

    def validate(self, peer: str, gen: Any) -> None:
        self.links[peer].validate(gen)

    def link(self, peer: str) -> PeerLink | None:
        return self.links.get(peer)

    def hand_grants(self, grants: dict[str, int]) -> bool:
        return False

    def peer_names(self) -> list[str]:
        return list(self.links)

    def heartbeat(self, now: float, gen: int = 0, rtt: float = 0.001) -> None:
        """We send a heartbeat at now; h2 echoes it (in a message of suspicion generation gen)."""
        link = self.links["h2"]
        m = link.on_send(now)
        link.on_receive(wire.Message(0, 0, S_INC, link.peer_seq + 1, MY_INC, m.seq, gen), now + rtt)


def make(now: float, placement: Any = lambda u: ("h1", "h2")) -> tuple[Succession, Fence, Keys, Peers, list[Any]]:
    fence, keys, peers, posted = Fence(), Keys(), Peers(now), []
    s = Succession("h1", fence, keys, peers, lease=L, interval=H, placement=placement,
                   broadcast=posted.append, clock=trio.current_time)
    return s, fence, keys, peers, posted


async def acked(s: Succession, peers: Peers, rounds: int) -> None:
    """`rounds` heartbeats, one every H, each echoed by h2 at once and its ack told to `s`."""
    for _ in range(rounds):
        peers.heartbeat(trio.current_time())
        s.on_peer_event(Acked("h2", 0.0))
        await trio.sleep(H)


async def owning_and_heard(s: Succession, peers: Peers, now: float, gen: int = 0) -> None:
    """We own `api` (armed to the etcd horizon, an hour away) and h2 has been heard past the
    hold-down: the next plan names it."""
    s.observe("api", OwnerRecord("h1", 11, 7, 11))
    await s.arm([VIP], now + 60.0)
    await trio.sleep(HOLD_DOWN + 0.01)
    peers.heartbeat(trio.current_time(), gen=gen)


async def owning_many(n: int, now: float, placement: Any = lambda u: ("h1", "h2"),
                      ) -> tuple[list[VipSpec], Succession, Fence, Keys, Peers]:
    """We own n one-VIP units (armed to the etcd horizon, a minute away), nobody named yet."""
    units = [VipSpec(f"v{i}", ipaddress.ip_interface(f"10.{i // 256}.1.{i % 256}/32"), "eth0") for i in range(n)]
    s, fence, keys, peers, _ = make(now, placement)
    for v in units:
        s.observe(v.name, OwnerRecord("h1", 11, 7, 11))
    await s.arm_many([([v], now + 60.0) for v in units])
    return units, s, fence, keys, peers


async def owning_many_named(n: int) -> tuple[list[VipSpec], Succession, Fence, Keys, Peers]:
    """owning_many, then h2 heard past the hold-down and named successor of every unit by one pass."""
    units, s, fence, keys, peers = await owning_many(n, trio.current_time())
    await trio.sleep(HOLD_DOWN + 0.01)
    peers.heartbeat(trio.current_time())
    await s._rename_all(s._plan(trio.current_time()))
    assert all(s.successor(v.name) == "h2" for v in units)
    return units, s, fence, keys, peers


def test_owner_value_round_trips():
    assert parse_value(owner_value("h1")) == ("h1", False, None, None)
    assert parse_value(owner_value("h1", epoch=12, successor="h2")) == ("h1", False, 12, "h2")
    assert parse_value(owner_value("h1", released=True, epoch=12)) == ("h1", True, 12, None)
    assert parse_value("h1 released") == ("h1", True, None, None)  # the format before successors
    assert parse_value("h1 epoch=x future=1") == ("h1", False, None, None)


def test_token_follows_the_successor_and_never_outlives_its_grant():
    async def main() -> None:
        now = trio.current_time()
        s, fence, keys, peers, _ = make(now)
        s.observe("api", OwnerRecord("h1", 11, 7, 11))
        await s.arm([VIP], now + 5.0)  # no successor named: the etcd horizon
        assert fence.until["api"] == now + 5.0
        # h2 has been heard for the hold-down: it is named, and the rename validates its generation
        await trio.sleep(HOLD_DOWN + 0.01)
        now = trio.current_time()
        peers.heartbeat(now)
        assert s._plan(now) == [("api", OwnerRecord("h1", 11, 7, 11), "h2")]
        await s._rename(s._plan(now))
        assert keys.renames[-1][0][2] == "h2" and s.successor("api") == "h2"
        await s.arm([VIP], now + 5.0)
        assert fence.until["api"] == now + L  # bounded by the echoed heartbeat's send time + L
        # h2 goes silent: the token ends L after the last echoed heartbeat, with no code running
        assert not fence.open_at(now + L + 0.001)
        # h2 suspected us and acks in a new generation: those echoes grant nothing until revalidated
        await trio.sleep(0.02)
        peers.heartbeat(trio.current_time(), gen=1)
        await s.arm([VIP], trio.current_time() + 5.0)
        assert fence.until["api"] == now + L
        plan = s._plan(trio.current_time())
        assert plan and plan[0][2] == "h2"  # same successor, rewritten to validate the generation
        await s._rename(plan)
        await s.arm([VIP], trio.current_time() + 5.0)
        assert fence.until["api"] > now + L

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_replaced_record_closes_the_token_whatever_the_controller_asks():
    async def main() -> None:
        now = trio.current_time()
        s, fence, keys, peers, _ = make(now)
        s.observe("api", OwnerRecord("h1", 11, 7, 11))
        await s.arm([VIP], now + 5.0)
        s.observe("api", OwnerRecord("h2", 12, 9, 12))  # the successor took it over
        await s.arm([VIP], now + 5.0)  # a late keepalive of ours
        assert not fence.open_at(trio.current_time())

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


class Passes:
    """Counts the planner's passes over the units (`Succession._plan`) from now on."""

    def __init__(self, s: Succession) -> None:
        self.n = 0
        plan = s._plan

        def counted(t: float) -> Any:
            self.n += 1
            return plan(t)

        s._plan = counted  # type: ignore[method-assign]


def test_generation_is_validated_only_when_every_record_naming_the_peer_was_rewritten():
    async def main() -> None:
        now = trio.current_time()
        s, fence, keys, peers, _ = make(now)
        await trio.sleep(HOLD_DOWN + 0.01)
        vip2 = VipSpec("web", ipaddress.ip_interface("10.0.0.101/24"), "eth0")
        for name, rev in (("api", 11), ("web", 12)):
            s.observe(name, OwnerRecord("h1", rev, 7, rev, successor="h2"))
        await s.arm([VIP], trio.current_time() + 5.0)
        await s.arm([vip2], trio.current_time() + 5.0)
        peers.heartbeat(trio.current_time())
        keys.fail = {"web"}  # h2 took "web" over meanwhile
        await s._rename(s._plan(trio.current_time()))
        # "web" is no longer ours: validating h2 is safe for "api", and web's token stays closed
        assert peers.links["h2"].validated == (S_INC, 0)
        await s.arm([VIP], trio.current_time() + 5.0)
        await s.arm([vip2], trio.current_time() + 5.0)
        assert fence.open_at(trio.current_time())  # api: bounded by h2's (now validated) grant
        assert fence.until["web"] <= trio.current_time()  # web: closed, whatever is asked

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_takeover_is_sent_only_while_the_owner_is_suspect():
    async def main() -> None:
        now = trio.current_time()
        s, fence, keys, peers, posted = make(now)
        named = OwnerRecord("h2", 11, 9, 13, successor="h1")
        assert await s.take_over("api", named, 7) == (False, named) and keys.taken == []
        peers.suspects.add("h2")
        s.on_peer_event(Suspected("h2", 1))
        assert posted == [PeerSuspected("h2")]
        won, rec = await s.take_over("api", named, 7)
        assert won and keys.taken == [named] and rec.epoch == 14

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_the_token_is_bounded_by_the_new_successor_before_the_record_names_it():
    """An owner that dies right after the rename commits must not hold a token past S's grant:
    the arm to min(H_etcd, granted(S)) happens before the transaction is sent."""
    async def main() -> None:
        now = trio.current_time()
        s, fence, keys, peers, _ = make(now)
        seen_at_send: list[float] = []
        real = keys.rename

        async def rename(items):  # type: ignore[no-untyped-def]
            seen_at_send.append(fence.until["api"])
            return await real(items)

        keys.rename = rename  # type: ignore[method-assign]
        s.observe("api", OwnerRecord("h1", 11, 7, 11))
        await s.arm([VIP], now + 5.0)
        await trio.sleep(HOLD_DOWN + 0.01)
        now = trio.current_time()
        peers.heartbeat(now)
        await s._rename(s._plan(now))
        assert seen_at_send == [now + L]  # not the etcd horizon (now + 5 s)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_live_successor_is_kept_until_a_better_one_settled_and_dropped_when_placement_drops_it():
    async def main() -> None:
        now = trio.current_time()
        fence, keys, peers, posted = Fence(), Keys(), Peers(now), []
        peers.links["h3"] = PeerLink("h3", MY_INC, Params(H, L, G), now)
        ranking = {"api": ("h1", "h3", "h2")}
        s = Succession("h1", fence, keys, peers, lease=L, interval=H, placement=lambda u: ranking[u],
                       broadcast=posted.append, clock=trio.current_time)

        def beat(t: float) -> None:
            for name in ("h2", "h3"):
                link = peers.links[name]
                m = link.on_send(t)
                link.on_receive(wire.Message(0, 0, S_INC, link.peer_seq + 1, MY_INC, m.seq, 0), t + 0.001)

        s.observe("api", OwnerRecord("h1", 11, 7, 11, successor="h2"))
        await s.arm([VIP], now + 60.0)
        for _ in range(3):
            await trio.sleep(REBALANCE_AFTER / 4)
            beat(trio.current_time())
            assert s._plan(trio.current_time()) in ([], [("api", s._records["api"], "h2")])  # h2 kept (revalidation only)
        await trio.sleep(REBALANCE_AFTER / 2)
        beat(trio.current_time())
        plan = s._plan(trio.current_time())
        assert [(u, want) for u, _, want in plan] == [("api", "h3")]  # the better-ranked peer, once settled
        # the placement drops the successor (say, its release hold-off): replaced at once
        s.observe("api", OwnerRecord("h1", 11, 7, 12, successor="h3"))
        ranking["api"] = ("h1", "h2")
        plan = s._plan(trio.current_time())
        assert [(u, want) for u, _, want in plan] == [("api", "h2")]

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_peer_suspected_before_it_was_ever_heard_is_named_without_a_hold_down():
    """At start every peer is suspected once before its first heartbeat arrives: that is no flap."""
    async def main() -> None:
        now = trio.current_time()
        s, fence, keys, peers, _ = make(now)
        s.observe("api", OwnerRecord("h1", 11, 7, 11))
        await s.arm([VIP], now + 5.0)
        s.on_peer_event(Suspected("h2", 1))  # never heard yet
        await trio.sleep(0.05)
        peers.heartbeat(trio.current_time())
        assert [w for _, _, w in s._plan(trio.current_time())] == ["h2"]
        s.on_peer_event(Suspected("h2", 2))  # heard, then lost: a flap
        peers.heartbeat(trio.current_time() + 0.01)
        assert not s._eligible("h2", trio.current_time() + 0.02)  # held down
        await trio.sleep(HOLD_DOWN)
        peers.heartbeat(trio.current_time())
        assert s._eligible("h2", trio.current_time())

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_rewriting_the_current_successor_counts_none_of_its_new_generation_until_it_commits():
    """The chaos soak's silent cut: S suspected O and took the unit over (O could not see it), then
    the link healed and S echoed O's heartbeats in its new suspicion generation. O's rewrite of the
    record naming S (to validate that generation) is in flight: those echoes must not re-open O's
    token meanwhile; the rewrite fails its compare, and O never serves again."""
    async def main() -> None:
        now = trio.current_time()
        s, fence, keys, peers, _ = make(now)
        await owning_and_heard(s, peers, now)
        await s._rename(s._plan(trio.current_time()))  # names h2, validates its generation 0
        granted = fence.until["api"]
        await trio.sleep(1.0)  # cut: no echo for a second; h2 suspected us and took over meanwhile
        peers.heartbeat(trio.current_time(), gen=1)  # healed: h2 echoes, in its new generation
        during: list[float] = []
        keys.fail.add("api")  # etcd's record is h2's now: the rewrite fails its compare

        async def rename(items):  # type: ignore[no-untyped-def]
            during.append(max(fence.until["api"], s._cap("api", s._owned["api"])))
            return await Keys.rename(keys, items)

        keys.rename = rename  # type: ignore[method-assign]
        plan = s._plan(trio.current_time())
        assert [w for _, _, w in plan] == ["h2"]
        await s._rename(plan)
        assert during and during[0] <= granted  # nothing re-opened while the rewrite was in flight
        await s.arm([VIP], trio.current_time() + 60.0)
        assert not fence.open_at(trio.current_time())  # and the record is h2's: never again

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_rename_with_an_unknown_outcome_counts_no_new_generation_of_its_target():
    async def main() -> None:
        from vipd.errors import EtcdUnavailable
        now = trio.current_time()
        s, fence, keys, peers, _ = make(now)
        await owning_and_heard(s, peers, now, gen=3)

        async def lost(items):  # type: ignore[no-untyped-def]
            raise EtcdUnavailable("no etcd endpoint answered")

        keys.rename = lost  # type: ignore[method-assign]
        await s._rename(s._plan(trio.current_time()))  # naming h2: perhaps applied, perhaps not
        await trio.sleep(1.0)  # h2 suspected us (and may have taken over), then heard us again:
        peers.heartbeat(trio.current_time(), gen=4)
        s._naming["api"] = ("h2", (S_INC, 4))  # a retry in flight, generation 4 seen at its start
        # only echoes of generations up to 3 (seen when the lost rename started) count: long over
        assert not s._cap("api", s._owned["api"]) > trio.current_time()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_an_unknown_outcome_rename_bounds_the_token_by_its_target_until_answered():
    """etcd may have applied a rename whose answer was lost: the target can then take over, so its
    grant bounds the token, and its generations are not validated behind our back."""
    async def main() -> None:
        from vipd.errors import EtcdUnavailable
        now = trio.current_time()
        s, fence, keys, peers, _ = make(now)
        await owning_and_heard(s, peers, now)

        async def lost(items):  # type: ignore[no-untyped-def]
            raise EtcdUnavailable("no etcd endpoint answered")

        real, keys.rename = keys.rename, lost  # type: ignore[method-assign]
        await s._rename(s._plan(trio.current_time()))
        assert "h2" in s._depends("api")
        await trio.sleep(1.0)  # h2 silent since: its grant ran out
        await s.arm([VIP], trio.current_time() + 60.0)
        assert not fence.open_at(trio.current_time())
        keys.rename = real  # type: ignore[method-assign]
        peers.heartbeat(trio.current_time())
        await s._rename(s._plan(trio.current_time()))  # answered: the record is known again
        assert s._uncertain == {} and s.successor("api") == "h2"

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_fenced_owner_does_not_validate_the_successor_its_stale_record_names():
    """The chaos soak's carrier cut: the owner, cut off, fenced at its lease deadline (nothing owned
    any more) while the successor had taken the unit over; healed, the successor's echoes came in its
    new generation. Validating it then ("no owned unit depends on it") let the owner's re-adoption
    of its own key, from its stale record, open the token for 343 ms next to the new owner."""
    async def main() -> None:
        now = trio.current_time()
        s, fence, keys, peers, _ = make(now)
        await owning_and_heard(s, peers, now)
        await s._rename(s._plan(trio.current_time()))  # names h2
        await s.disarm([VIP])  # fenced: the lease deadline passed while cut off
        await trio.sleep(1.0)
        peers.heartbeat(trio.current_time(), gen=1)  # h2 suspected us (and took over), then heard us
        s._validate_unused()
        assert peers.links["h2"].validated == (S_INC, 0)  # not the new generation
        await s.arm([VIP], trio.current_time() + 60.0)  # "adopted own key" from the stale record
        assert not fence.open_at(trio.current_time())

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_failed_token_arm_sends_no_rename():
    """The new successor's bound could not be armed (nft failed): naming it now would let it take
    over while our token may outlive its grant, so the rename is not sent; it is retried."""
    async def main() -> None:
        from vipd.errors import DataplaneError
        now = trio.current_time()
        s, fence, keys, peers, _ = make(now)
        await owning_and_heard(s, peers, now)

        async def broken(items, **kw):  # type: ignore[no-untyped-def]
            raise DataplaneError("nft: no answer")

        fence.arm_many = broken  # type: ignore[method-assign]
        await s._rename(s._plan(trio.current_time()))
        assert keys.renames == [] and s.successor("api") is None and s._uncertain == {}

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_no_successor_is_named_once_a_stop_began():
    """After `begin_stop` no token is armed, so none can be bounded by a new successor's grant:
    a plan made then (a placement change during the stop) sends no rename, or the new successor
    could take over while the old bound still serves the unit until the flush."""
    async def main() -> None:
        now = trio.current_time()
        s, fence, keys, peers, _ = make(now)
        await owning_and_heard(s, peers, now)
        plan = s._plan(trio.current_time())
        assert plan  # h2 would be named
        s.begin_stop()
        await s._rename(plan)
        assert keys.renames == [] and s.successor("api") is None and s._naming == {}

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_the_peers_the_tokens_depend_on_follow_renames_disarms_and_new_units():
    """Cached per change (thousands of units): a rename, a disarm and a newly owned unit are
    seen at once; every arm wakes the planner."""
    async def main() -> None:
        now = trio.current_time()
        s, fence, keys, peers, _ = make(now)
        await owning_and_heard(s, peers, now)
        assert s._peers_used() == (set(), set())
        await s._rename(s._plan(trio.current_time()))
        assert s._peers_used() == ({"h2"}, {"h2"})
        s._wake = trio.Event()
        await s.arm([VIP], trio.current_time() + 60.0)  # a re-arm: the planner looks again
        assert s._wake.is_set() and s._peers_used() == ({"h2"}, {"h2"})
        await s.disarm([VIP])
        assert s._peers_used() == (set(), {"h2"})  # not owned; its record still names us and h2
        await s.arm([VIP], trio.current_time() + 60.0)  # owned again
        assert s._peers_used() == ({"h2"}, {"h2"})

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_an_ack_re_arms_one_grant_not_every_unit():
    """Many units share one successor: they are in its grant's group, so acks re-arm one grant
    (about every other ack: when it moved a step) and pass over no unit; every VIP stays open
    while the acks flow and trails the grant by at most 2 steps; when the acks stop, every VIP
    closes at the last grant armed, no token touched."""
    async def main() -> None:
        units, s, fence, keys, peers = await owning_many_named(50)
        calls = 0
        cap = s._cap

        def counted(*a: Any) -> float:
            nonlocal calls
            calls += 1
            return cap(*a)

        s._cap = counted  # type: ignore[method-assign]
        async with trio.open_nursery() as n:
            n.start_soon(s.refresh)
            await trio.sleep(H)  # the first pass after the rename: every unit joins h2's group
            assert fence.group == {v.name: "h2" for v in units} and calls == 0
            fence.batches.clear()
            for _ in range(200):  # 2 s of heartbeats, each acked at once
                peers.heartbeat(trio.current_time())
                s.on_peer_event(Acked("h2", peers.links["h2"].granted_until() or 0.0))  # (wakes the refresh)
                await trio.sleep(H)
                now = trio.current_time()
                grant = peers.links["h2"].granted_until()
                assert grant is not None
                for v in units:
                    assert fence.until[v.name] > now
                    assert grant - fence.until[v.name] <= 2 * s._step + 1e-9
            n.cancel_scope.cancel()
        assert calls == 0  # no pass over the units
        assert all(tokens == 0 and grants == 1 and moved == 0 for tokens, grants, moved in fence.batches)
        assert 50 <= len(fence.batches) <= 110, len(fence.batches)  # a step is two acks (or three: rounding)
        last = fence.grant["h2"]
        assert all(fence.until[v.name] == last for v in units)  # silence: all end there, in the kernel

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_takeover_queued_behind_others_is_not_sent_once_the_owner_is_heard_again():
    """The owner's heartbeats resume while the takeover waits for its batch: the suspicion is asked
    again right before sending, so nothing is sent."""
    async def main() -> None:
        now = trio.current_time()
        s, fence, keys, peers, _ = make(now)
        named = OwnerRecord("h2", 11, 9, 20, successor="h1")
        peers.suspects.add("h2")

        async def recover() -> None:
            await trio.sleep(0.001)
            peers.suspects.discard("h2")

        async with trio.open_nursery() as n:
            n.start_soon(recover)
            assert await s.take_over("api", named, 7) == (False, named)
        assert keys.taken == []
        peers.suspects.add("h2")
        won, _ = await s.take_over("api", named, 7)
        assert won and keys.taken == [named]

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_the_planner_passes_over_the_units_only_when_what_it_reads_changes():
    """Acks flowing wake the planner every ~L/2 (a successor's grant check); with nothing changed it
    does not pass over the units (at most every PLAN_EVERY); when the successor falls silent, the
    rename to nobody still goes out within L/2 of its last ack."""
    from vipd.succession import PLAN_EVERY
    async def main() -> None:
        units, s, fence, keys, peers = await owning_many(20, trio.current_time())
        passes = Passes(s)
        async with trio.open_nursery() as n:
            await n.start(s.run)
            await trio.sleep(HOLD_DOWN + 0.01)
            for _ in range(5):
                peers.heartbeat(trio.current_time())
                s.on_peer_event(Acked("h2", 0.0))
                await trio.sleep(H)
            assert all(s.successor(v.name) == "h2" for v in units)
            passes.n = 0
            for _ in range(200):  # 2 s of acks
                peers.heartbeat(trio.current_time())
                s.on_peer_event(Acked("h2", 0.0))
                await trio.sleep(H)
            assert passes.n <= 2 / PLAN_EVERY + 2, passes.n
            silent = trio.current_time()
            for _ in range(100):  # h2 falls silent: we keep sending, nothing is echoed
                if s.successor(units[0].name) != "h2":
                    break
                peers.links["h2"].on_send(trio.current_time())
                await trio.sleep(H / 2)
            assert s.successor(units[0].name) is None
            assert trio.current_time() - silent <= L / 2 + 0.01
            n.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_successor_is_not_renamed_for_our_own_lateness_but_is_when_it_falls_silent():
    """Two live peers; the named one runs short of grant because this host stalled (sent nothing,
    read nothing): kept, no rename to the other peer nor to nobody, also once the first heartbeat
    after the stall is out and its echo is not back yet. The named one stops echoing
    while we keep sending and the other answers: renamed to the other once short, as before."""
    async def main() -> None:
        now = trio.current_time()
        fence, keys, peers = Fence(), Keys(), Peers(now)
        peers.links["h3"] = PeerLink("h3", MY_INC, Params(H, L, G), now)
        s = Succession("h1", fence, keys, peers, lease=L, interval=H, placement=lambda u: ("h1", "h2", "h3"),
                       broadcast=lambda e: None, clock=trio.current_time)

        def beat(t: float, echo: tuple[str, ...] = ("h2", "h3")) -> None:
            for name in ("h2", "h3"):
                link = peers.links[name]
                m = link.on_send(t)
                if name in echo:
                    link.on_receive(wire.Message(0, 0, S_INC, link.peer_seq + 1, MY_INC, m.seq, 0), t + 0.001)

        s.observe("api", OwnerRecord("h1", 11, 7, 11, successor="h2"))
        await s.arm([VIP], now + 60.0)
        for _ in range(int(HOLD_DOWN / H) + 2):
            beat(trio.current_time())
            await trio.sleep(H)
        for link in peers.links.values():
            link.validate(link.peer_gen)  # (as the first rename would have)
        assert s._plan(trio.current_time()) == []
        await trio.sleep(L * 0.7)  # a stall: nothing sent, nothing read; both grants run short
        assert not s._eligible("h2", trio.current_time())
        assert s._plan(trio.current_time()) == []
        beat(trio.current_time(), echo=())  # (a collector pause:) the first heartbeat after it is out,
        await trio.sleep(H / 2)  # its echoes not back yet: still no peer is late
        assert s._plan(trio.current_time()) == []
        assert s._next_check(trio.current_time()) > trio.current_time()  # (no spinning on a past check)
        for _ in range(6):  # h2 silent, h3 answers
            beat(trio.current_time(), echo=("h3",))
            await trio.sleep(H)
        assert [w for _, _, w in s._plan(trio.current_time())] == ["h3"]

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_unit_the_token_table_does_not_hold_is_never_armed_or_given_a_successor():
    """The token table's update failed for a unit's VIPs (covers() is False for them): arming it
    is a no-op, so it is never owned here, never named a successor, and the other units' batch
    goes out without it."""
    async def main() -> None:
        now = trio.current_time()
        outside = VipSpec("late", ipaddress.ip_interface("10.0.2.1/32"), "eth9")
        s, fence, keys, peers, _ = make(now)
        fence.covers = lambda vips: all(v.name != "late" for v in vips)  # type: ignore[method-assign]
        s.observe("api", OwnerRecord("h1", 11, 7, 11))
        s.observe("late", OwnerRecord("h1", 12, 7, 12))
        await s.arm_many([([VIP], now + 60.0), ([outside], now + 60.0)])
        await s.arm([outside], now + 60.0)
        assert "late" not in fence.token and fence.token["api"] > now
        await trio.sleep(HOLD_DOWN + 0.01)
        now = trio.current_time()
        peers.heartbeat(now)
        plan = s._plan(now)
        assert [(u, succ) for u, _, succ in plan] == [("api", "h2")], plan
        await s._rename(plan)
        assert s.successor("api") == "h2" and s.successor("late") is None
        assert "late" not in fence.token

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_unnamed_waits_for_every_record_naming_us_under_another_owner():
    """A stop keeps granting until no record of another owner names this host successor
    (`unnamed`); our own records, deleted keys and stale revisions count as they should."""
    async def main() -> None:
        s, *_ = make(trio.current_time())
        with trio.fail_after(0.01):
            await s.unnamed()  # nobody names us
        s.observe("own", OwnerRecord("h1", 3, 7, 3, successor="h2"))  # ours: not a grant we give
        s.observe("a", OwnerRecord("h2", 5, 9, 10, successor="h1"))
        s.observe("b", OwnerRecord("h3", 6, 8, 11, successor="h1"))
        done = trio.Event()

        async def wait() -> None:
            await s.unnamed()
            done.set()

        async with trio.open_nursery() as n:
            n.start_soon(wait)
            await trio.sleep(0.1)
            s.observe("a", OwnerRecord("h2", 5, 9, 12, successor="h3"))  # renamed
            s.observe("b", OwnerRecord("h3", 6, 8, 9, successor=None))  # an older revision: ignored
            await trio.sleep(0.1)
            assert not done.is_set()
            s.observe("b", OwnerRecord(None, revision=13))  # its key went
            with trio.fail_after(0.1):
                await done.wait()
        s.observe("a", OwnerRecord("h2", 5, 9, 14, successor="h1"))  # named again: waits again
        with trio.move_on_after(0.5) as scope:
            await s.unnamed()
        assert scope.cancelled_caught

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_placement_change_is_planned_at_once():
    """The placement dropped the successor (it is stopping): the planner renames when told, not at
    its next PLAN_EVERY pass, while the successor's grant still holds."""
    from vipd.succession import PLAN_EVERY

    async def main() -> None:
        candidates = ["h1", "h2"]
        units, s, fence, keys, peers = await owning_many(5, trio.current_time(), lambda u: tuple(candidates))
        async with trio.open_nursery() as n:
            await n.start(s.run)
            await trio.sleep(HOLD_DOWN + 0.01)
            await acked(s, peers, 5)
            assert all(s.successor(v.name) == "h2" for v in units)
            await acked(s, peers, 30)  # mid-way between two passes, h2 heard throughout
            candidates.remove("h2")
            s.placement_changed()
            t0 = trio.current_time()
            for _ in range(100):
                if all(s.successor(v.name) is None for v in units):
                    break
                await acked(s, peers, 1)  # h2 still answers: only the placement dropped it
            assert all(s.successor(v.name) is None for v in units)
            assert trio.current_time() - t0 < 0.2 * PLAN_EVERY
            n.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_stop_removes_every_token_in_one_flush_and_arms_none_after_it():
    """Daemon stop: `begin_stop` before the units move, then one flush of every owned unit's
    token; an arm asked for afterwards writes nothing, and each unit's own disarm waits for the
    flush and sends nothing more (they queued on the lock behind arms and renames)."""
    async def main() -> None:
        now = trio.current_time()
        units, s, fence, keys, peers = await owning_many(5, now)
        assert set(fence.token) == {v.name for v in units}
        disarmed: list[list[str]] = []
        real = fence.disarm

        async def counted(vips: Sequence[VipSpec]) -> None:
            disarmed.append(sorted(v.name for v in vips))
            await real(vips)

        fence.disarm = counted  # type: ignore[method-assign]
        batches = len(fence.batches)
        s.begin_stop()
        async with trio.open_nursery() as n:
            n.start_soon(s.disarm, [units[0]])  # a unit's own disarm, before the flush ran
            n.start_soon(s.flush_tokens)
            n.start_soon(s.arm, [units[1]], now + 120.0)  # a keepalive's arm, after the signal
        assert fence.token == {} and len(fence.batches) == batches  # all gone; nothing armed again
        assert disarmed == [sorted(v.name for v in units)]  # one flush, no per-unit batch
        for v in units[1:]:
            await s.disarm([v])
        assert len(disarmed) == 1

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_failed_stop_flush_leaves_each_units_disarm_to_remove_its_token():
    async def main() -> None:
        now = trio.current_time()
        units, s, fence, keys, peers = await owning_many(2, now)
        real = fence.disarm
        calls: list[int] = []

        async def failing_once(vips: Sequence[VipSpec]) -> None:
            calls.append(len(vips))
            if len(calls) == 1:
                from vipd.errors import FenceError
                raise FenceError("flush: netlink says no")
            await real(vips)

        fence.disarm = failing_once  # type: ignore[method-assign]
        s.begin_stop()
        await s.flush_tokens()
        assert set(fence.token) == {v.name for v in units}  # the flush failed: still there
        await s.disarm([units[0]])
        await s.disarm([units[1]])
        assert fence.token == {} and calls == [2, 1, 1]

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_acks_wake_the_loop_only_while_something_here_follows_them():
    """`wants_ack` (asked by the heartbeat thread before an Acked wakes the loop): wanted for a peer
    not heard since its last suspicion, while a pass over the units is pending, and while a grant
    is not handed to the thread; not wanted at rest, every unit in a group whose grant the thread
    re-arms."""
    async def main() -> None:
        units, s, fence, keys, peers = await owning_many(5, trio.current_time())
        fence.grant_id = lambda grant: 1  # type: ignore[method-assign]
        handed: list[dict[str, int]] = []
        taken = [False]  # whether the heartbeat thread takes the grants handed to it
        peers.hand_grants = lambda ids: handed.append(ids) or taken[0]  # type: ignore[method-assign]
        await trio.sleep(HOLD_DOWN + 0.01)
        peers.heartbeat(trio.current_time())
        assert s.wants_ack("h2")  # never heard
        s.on_peer_event(Acked("h2", 0.0))
        await s._rename(s._plan(trio.current_time()))
        assert all(s.successor(v.name) == "h2" for v in units)
        async with trio.open_nursery() as n:
            n.start_soon(s.refresh)
            assert s.wants_ack("h2")  # the renames changed what the tokens read: a pass is pending
            await trio.sleep(H)
            assert fence.group == {v.name: "h2" for v in units} and handed == [{"h2": 1}]
            assert s.wants_ack("h2")  # the thread did not take the grant: this loop re-arms it on acks
            taken[0] = True
            for _ in range(4):
                peers.heartbeat(trio.current_time())
                s.on_peer_event(Acked("h2", 0.0))
                await trio.sleep(H)
            assert handed[-1] == {"h2": 1}
            assert not s.wants_ack("h2")  # at rest: grouped, the grant handed
            s.observe("v0", OwnerRecord("h1", 11, 7, keys.revision + 5, successor="h2"))
            assert s.wants_ack("h2")  # a record moved: the next ack runs the pass
            s.on_peer_event(Acked("h2", 0.0))
            await trio.sleep(H)
            assert not s.wants_ack("h2")
            s._uncertain["v1"] = {"h2": None}  # a rename of unknown outcome: v1 leaves the group,
            s._version += 1  # its token carries its whole cap, which follows the acks
            s.on_peer_event(Acked("h2", 0.0))
            await trio.sleep(H)
            assert s._direct == {"v1"} and s.wants_ack("h2")
            s._uncertain.clear()
            s._version += 1
            s.on_peer_event(Acked("h2", 0.0))
            await trio.sleep(H)
            assert not s._direct and not s.wants_ack("h2")
            s.on_peer_event(Suspected("h2", 1))
            assert s.wants_ack("h2")  # heard again after a suspicion: the planner wakes for it
            n.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_new_generation_is_validated_by_one_rewrite_of_more_units_than_a_transaction_holds():
    """The peer named successor of 250 units (3 rename transactions) suspected us and was heard
    again: its echoes carry a new generation, which counts only once every record naming it was
    rewritten after we saw it. One pass of rewrites (3 transactions) validates it and every
    token opens again. Before, each transaction counted only its own 100 units: the generation
    was never validated, every pass rewrote the 250 again, and their tokens stayed closed."""
    from vipd.succession import RENAME_BATCH

    async def main() -> None:
        units, s, fence, keys, peers = await owning_many(250, trio.current_time())
        rename = keys.rename

        async def slow(items):  # type: ignore[no-untyped-def]
            await trio.sleep(0.02)  # (an etcd round trip: the planner's loop awaits it)
            return await rename(items)

        keys.rename = slow  # type: ignore[method-assign]

        async def beat(rounds: int, gen: int) -> None:
            for _ in range(rounds):
                peers.heartbeat(trio.current_time(), gen=gen)
                s.on_peer_event(Acked("h2", 0.0))
                await s.arm_many([([v], trio.current_time() + 60.0) for v in units])  # (the keepalives)
                await trio.sleep(H)

        async with trio.open_nursery() as n:
            await n.start(s.run)
            await trio.sleep(HOLD_DOWN + 0.01)
            await beat(50, 0)
            assert all(s.successor(v.name) == "h2" for v in units)
            assert len(keys.renames) == -(-250 // RENAME_BATCH)
            named = len(keys.renames)
            await beat(100, 1)  # h2 suspected us (generation 1) and hears us again
            assert peers.links["h2"].validated == (S_INC, 1)
            assert all(s.successor(v.name) == "h2" for v in units)
            assert len(keys.renames) - named == -(-250 // RENAME_BATCH)  # one pass of rewrites, no more
            assert all(fence.until[v.name] > trio.current_time() for v in units)  # served again
            n.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_the_transactions_of_a_pass_go_out_side_by_side_and_validate_once_all_committed():
    """1,000 units naming h2 are rewritten after h2's generation moved: 10 transactions,
    RENAME_PARALLEL in flight at once (one after the other, the VIPs stayed dark for all ten round
    trips), and the generation is validated only once the last of them committed."""
    from vipd.succession import RENAME_BATCH, RENAME_PARALLEL

    async def main() -> None:
        units, s, fence, keys, peers = await owning_many_named(1000)
        peers.heartbeat(trio.current_time(), gen=1)  # h2 suspected us, and hears us again
        rename, flying, most, validated_early = keys.rename, 0, 0, False

        async def slow(items):  # type: ignore[no-untyped-def]
            nonlocal flying, most, validated_early
            flying += 1
            most = max(most, flying)
            await trio.sleep(0.05)  # (an etcd round trip)
            validated_early |= peers.links["h2"].validated == (S_INC, 1)
            flying -= 1
            return await rename(items)

        keys.rename = slow  # type: ignore[method-assign]
        plan = s._plan(trio.current_time())
        assert len(plan) == 1000
        t0 = trio.current_time()
        await s._rename_all(plan)
        batches = -(-1000 // RENAME_BATCH)
        assert 1 < most <= RENAME_PARALLEL
        assert trio.current_time() - t0 <= -(-batches // most) * 0.05 + 0.01 < batches * 0.05
        assert not validated_early and peers.links["h2"].validated == (S_INC, 1)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_the_planner_makes_no_pass_once_a_stop_began():
    """A stopping host's units disarm one by one, and each disarm changes what the planner reads:
    before, each woke a pass over every unit, for renames that are no longer sent."""
    async def main() -> None:
        units, s, fence, keys, peers = await owning_many(20, trio.current_time())
        passes = Passes(s)
        async with trio.open_nursery() as n:
            await n.start(s.run)
            await trio.sleep(HOLD_DOWN + 0.01)
            await acked(s, peers, 5)
            assert passes.n and all(s.successor(v.name) == "h2" for v in units)
            s.begin_stop()
            await s.flush_tokens()  # (as Daemon.stop does: each unit's disarm waits for it)
            passes.n = 0
            for v in units:
                await s.disarm([v])
                await acked(s, peers, 1)
            await trio.sleep(2.0)  # (past PLAN_EVERY too)
            assert passes.n == 0 and keys.renames and len(keys.renames) == 1
            n.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_pass_with_one_transaction_lost_to_etcd_validates_nothing_until_that_one_is_answered(caplog):
    """etcd unreachable for one of a pass's side-by-side transactions (300 units naming h2, whose
    generation moved): the others commit, the lost one's units may be named in etcd or not
    (unknown outcome), so h2's new generation stays unvalidated and their tokens stay bounded
    as before; one `successor_rename_failed` line, no traceback. The next pass rewrites them and
    validates it."""
    import logging

    from vipd.errors import EtcdUnavailable

    async def main() -> None:
        caplog.set_level(logging.INFO, logger="vipd")
        units, s, fence, keys, peers = await owning_many_named(300)
        peers.heartbeat(trio.current_time(), gen=1)
        rename, lost = keys.rename, []

        async def flaky(items):  # type: ignore[no-untyped-def]
            await trio.sleep(0.02)
            if not lost and any(name == "v150" for name, _, _ in items):
                lost.extend(name for name, _, _ in items)
                raise EtcdUnavailable("etcd: connection refused")
            return await rename(items)

        keys.rename = flaky  # type: ignore[method-assign]
        await s._rename_all(s._plan(trio.current_time()))
        assert len(lost) == 100
        assert peers.links["h2"].validated == (S_INC, 0)
        assert set(s._uncertain) == set(lost)
        assert sum("successor_rename_failed" in r.getMessage() for r in caplog.records) == 1
        assert "Traceback" not in caplog.text
        plan = s._plan(trio.current_time())
        assert len(plan) == 300  # (every unit still names a peer whose generation is not validated)
        await s._rename_all(plan)
        assert peers.links["h2"].validated == (S_INC, 1) and not s._uncertain

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_successor_renamed_away_for_being_late_is_named_again_after_a_hold_that_doubles(caplog):
    """The only peer falls silent: its units are renamed to nobody, as before. It answers again:
    not named again before HOLD_DOWN, named after. Late again soon after: renamed to nobody
    again, and this time named again only after twice the hold (a pair of loaded hosts renamed
    every unit to nobody and back every second)."""
    async def main() -> None:
        now = trio.current_time()
        s, fence, keys, peers, _ = make(now)
        s.observe("api", OwnerRecord("h1", 11, 7, 11, successor="h2"))
        await s.arm([VIP], now + 60.0)
        await acked(s, peers, int(HOLD_DOWN / H) + 2)
        peers.links["h2"].validate(peers.links["h2"].peer_gen)  # (as the first rename would have)
        assert s._plan(trio.current_time()) == []

        async def silent() -> None:  # we keep sending, h2 echoes nothing
            for _ in range(int(L / H) + 1):
                peers.links["h2"].on_send(trio.current_time())
                await trio.sleep(H)

        async def renamed_back_after(hold: float) -> None:
            """h2 answers again: kept off every record for `hold` (less one heartbeat), then named."""
            s.observe("api", OwnerRecord("h1", 11, 7, keys.revision, successor=None))
            start = trio.current_time()
            while trio.current_time() - start < hold - 2 * H:
                await acked(s, peers, 1)
                assert s._plan(trio.current_time()) == [], trio.current_time() - start
            await acked(s, peers, 3)
            assert [w for _, _, w in s._plan(trio.current_time())] == ["h2"]
            s.observe("api", OwnerRecord("h1", 11, 7, keys.revision, successor="h2"))

        def sent() -> list[str | None]:  # the renames of a pass, as its transaction goes out
            return [w for _, _, w in s._still_late(s._plan(trio.current_time()), trio.current_time())]

        await silent()
        assert sent() == [None]
        await renamed_back_after(HOLD_DOWN)
        await acked(s, peers, 5)
        await silent()
        assert sent() == [None]
        await renamed_back_after(2 * HOLD_DOWN)
        assert s._next_check(trio.current_time()) > trio.current_time()

    import logging
    caplog.set_level(logging.INFO, logger="vipd")
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    held = [r.getMessage() for r in caplog.records if "successor_held_off" in r.getMessage()]
    assert len(held) == 2 and all("peer=h2" in m and "why=late" in m for m in held)  # one line a hold
    assert "hold=1.0" in held[0] and "hold=2.0" in held[1]


def test_a_rename_away_from_a_late_successor_is_withdrawn_when_its_echo_arrives_before_it_goes_out():
    """Planned while h2 is late; h2's echo arrives before the transaction goes out: nothing is
    sent and h2 is not held off (still nameable), but a rename away from h2 that the placement
    asked for (it dropped h2 for that unit) still goes. Still late then: sent, and h2 held off."""
    async def main() -> None:
        now = trio.current_time()
        s, fence, keys, peers, _ = make(now, placement=lambda u: ("h1", "h2") if u == "api" else ("h1",))
        other = VipSpec("other", ipaddress.ip_interface("10.0.9.1/32"), "eth0")
        s.observe("api", OwnerRecord("h1", 11, 7, 11, successor="h2"))
        s.observe("other", OwnerRecord("h1", 12, 7, 12, successor="h2"))
        await s.arm_many([([VIP], now + 60.0), ([other], now + 60.0)])
        await acked(s, peers, int(HOLD_DOWN / H) + 2)
        peers.links["h2"].validate(peers.links["h2"].peer_gen)
        for _ in range(int(L / H) + 1):  # we keep sending, h2 echoes nothing
            peers.links["h2"].on_send(trio.current_time())
            await trio.sleep(H)
        plan = s._plan(trio.current_time())
        assert sorted((u, w) for u, _, w in plan) == [("api", None), ("other", None)]
        await acked(s, peers, 1)  # the echo arrives while the pass is still going
        assert [u for u, _, _ in s._still_late(plan, trio.current_time())] == ["other"]
        assert "h2" not in s._late_hold
        s.observe("other", OwnerRecord("h1", 12, 7, 13))
        for _ in range(int(L / H) + 1):
            peers.links["h2"].on_send(trio.current_time())
            await trio.sleep(H)
        plan = s._plan(trio.current_time())
        assert s._still_late(plan, trio.current_time()) == plan and plan
        assert s._late_hold["h2"][1] == HOLD_DOWN and not s._eligible("h2", trio.current_time())

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))

"""vipd/metrics_text.py writes the per-VIP families byte for byte as prometheus_client would: the
reference here builds the same families with prometheus_client's own Metric classes (HELP texts
read back from our output, so they are not written twice) and renders them with generate_latest."""

from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from vipd import metrics_text
from vipd.metrics import Metrics, _VipSeries
from vipd.model import State

# Label values that need escaping, non-ASCII, and values Go formats in exponent form.
NAMES = ["web", 'a"quoted"', "back\\slash", "new\nline", "ünï", "x" * 80]


def filled() -> _VipSeries:
    v = _VipSeries()
    for i, name in enumerate(NAMES):
        v.state[name] = list(State)[i % len(State)]
        v.epoch[name] = 10 ** (i + 3) + i  # 1003 ... 100000005: "1.00000005e+08"
        v.healthy[name] = i % 2 == 0
        v.present[name] = i % 3 == 0
        v.transitions[(name, "backup", "acquiring")] = i + 1
        v.transitions[(name, "acquiring", "owner")] = 2 ** 40
        v.announcements[name] = 3 * i
        if i % 2:
            v.conflicts[name] = i
        v.errors[(name, "fence")] = 1
        v.takeovers[(name, "expired" if i % 2 else "released")] = i
    return v


class Reference:
    """The families as prometheus_client builds them (a Collector)."""

    def __init__(self, v: _VipSeries, docs: dict[str, str]) -> None:
        self.v, self.docs = v, docs

    def _fam(self, cls: type, name: str, labels: list[str], values: dict) -> Metric:  # type: ignore[type-arg]
        m = cls(name, self.docs[name], labels=labels)
        for key, value in values.items():
            m.add_metric(list(key), value)
        return m

    def collect(self) -> Iterator[Metric]:
        v, G, C = self.v, GaugeMetricFamily, CounterMetricFamily
        yield self._fam(G, "vipd_vip_owner", ["vip"], {(n,): int(s is State.OWNER) for n, s in v.state.items()})
        yield self._fam(G, "vipd_vip_state", ["vip", "state"],
                        {(n, s.value): int(s is st) for n, st in v.state.items() for s in State})
        yield self._fam(G, "vipd_vip_epoch", ["vip"], {(n,): e for n, e in v.epoch.items()})
        yield self._fam(C, "vipd_ownership_transitions", ["vip", "from_state", "to_state"], v.transitions)
        yield self._fam(C, "vipd_announcements", ["vip"], {(n,): c for n, c in v.announcements.items()})
        yield self._fam(C, "vipd_address_conflicts", ["vip"], {(n,): c for n, c in v.conflicts.items()})
        yield self._fam(G, "vipd_healthy", ["vip"], {(n,): int(h) for n, h in v.healthy.items()})
        yield self._fam(C, "vipd_dataplane_errors", ["vip", "op"], v.errors)
        yield self._fam(G, "vipd_vip_address_present", ["vip"], {(n,): int(p) for n, p in v.present.items()})
        yield self._fam(C, "vipd_takeovers", ["vip", "cause"], v.takeovers)


def test_the_per_vip_families_are_written_exactly_as_prometheus_client_writes_them() -> None:
    v = filled()
    ours = metrics_text.render(v)
    docs = {f.name: f.documentation for f in text_string_to_metric_families(ours.decode())}
    assert len(docs) == 10
    registry = CollectorRegistry()
    registry.register(Reference(v, docs))  # type: ignore[arg-type]
    assert ours == generate_latest(registry)


def test_an_empty_host_writes_every_family_with_no_series() -> None:
    registry = CollectorRegistry()
    ours = metrics_text.render(_VipSeries())
    docs = {f.name: f.documentation for f in text_string_to_metric_families(ours.decode())}
    registry.register(Reference(_VipSeries(), docs))  # type: ignore[arg-type]
    assert ours == generate_latest(registry)


def test_a_scrape_parses_and_holds_both_the_per_vip_and_the_host_families() -> None:
    m = Metrics("h1")
    m.record_transition('a"b', State.BACKUP, State.OWNER)
    m.set_epoch('a"b', 7)
    m.observe_keepalive(0.01)
    fams = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    assert fams["vipd_vip_owner"].samples[0].labels == {"vip": 'a"b'} and fams["vipd_vip_owner"].samples[0].value == 1
    owner_state = [s for s in fams["vipd_vip_state"].samples if s.value == 1]
    assert [s.labels["state"] for s in owner_state] == ["owner"]
    assert fams["vipd_lease_keepalive_seconds"].type == "histogram"
    assert {s.labels["node"] for s in fams["vipd_info"].samples} == {"h1"}


async def test_an_async_scrape_writes_what_a_sync_one_does_from_a_snapshot() -> None:
    m = Metrics("h1")
    for i, name in enumerate(NAMES):
        m.record_transition(name, State.BACKUP, State.OWNER)
        m.set_epoch(name, i)
    snap = m._vips.snapshot()
    m.set_epoch("later", 1)  # after the snapshot: not in it
    assert "later" not in snap.epoch and snap.epoch == {n: i for i, n in enumerate(NAMES)}
    assert await m.render_async() == m.render()

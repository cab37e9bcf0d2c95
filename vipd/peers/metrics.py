"""Prometheus collector for fast takeover: heartbeats per peer, suspicions and detection latency,
token refreshes and lapses, successor renames. Read at scrape time from the live objects (no
bookkeeping on the 10 ms path). Takeovers by peer detection vs lease expiry are counted by
vipd_takeovers{cause="peer"} / {cause="expired"} (vipd/metrics.py)."""

from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from vipd.peers.protocol import PeerLink


class PeerCollector(Collector):
    def __init__(self, links: Callable[[], dict[str, PeerLink]], fence: Any, succession: Any,
                 grants: Callable[[], Any] = lambda: None) -> None:
        self._links = links
        self._fence = fence
        self._succession = succession
        self._grants = grants  # the heartbeat thread's GrantWriter (vipd/peers/grants.py), if any

    def collect(self) -> Iterator[Any]:
        sent = CounterMetricFamily("vipd_peer_heartbeats_sent", "Heartbeat datagrams sent to the peer", labels=["peer"])
        received = CounterMetricFamily("vipd_peer_heartbeats_received", "Authentic heartbeats received from the peer",
                                       labels=["peer"])
        lost = CounterMetricFamily("vipd_peer_heartbeats_lost", "Gaps in the peer's sequence (heartbeats that never "
                                   "arrived)", labels=["peer"])
        rejected = CounterMetricFamily("vipd_peer_heartbeats_rejected", "Datagrams refused (forged, replayed, stale, "
                                       "wrong cluster key)", labels=["peer", "reason"])
        suspicions = CounterMetricFamily("vipd_peer_suspicions", "Times the peer's heartbeats stopped for the grace",
                                         labels=["peer"])
        detection = GaugeMetricFamily("vipd_peer_detection_seconds", "Last suspicion: seconds from the peer's last "
                                      "heartbeat to the suspicion", labels=["peer"])
        suspected = GaugeMetricFamily("vipd_peer_suspected", "1 while the peer is suspected", labels=["peer"])
        for name, link in sorted(self._links().items()):
            st = link.stats
            sent.add_metric([name], st.sent)
            received.add_metric([name], st.received)
            lost.add_metric([name], st.lost)
            for reason, n in sorted(dict(st.rejected).items()):  # (a copy: the heartbeat thread adds)
                rejected.add_metric([name, reason], n)
            suspicions.add_metric([name], st.suspicions)
            if st.detection_latency is not None:
                detection.add_metric([name], st.detection_latency)
            suspected.add_metric([name], 1 if link.suspected else 0)
        yield from (sent, received, lost, rejected, suspicions, detection, suspected)
        if self._fence is not None:
            yield CounterMetricFamily("vipd_fence_token_refreshes", "nftables token elements armed",
                                      value=self._fence.refreshes())
            yield CounterMetricFamily("vipd_fence_token_lapses", "Tokens that ran out while this host owned the VIP "
                                      "(no grant or keepalive in time)", value=self._fence.lapses())
        writer = self._grants()
        if writer is not None:
            yield CounterMetricFamily("vipd_fence_grant_writes", "Successors' grants re-armed by the heartbeat "
                                      "thread (batches)", value=writer.writes)
            yield CounterMetricFamily("vipd_fence_grant_write_failures", "Grant re-arms the kernel refused in the "
                                      "heartbeat thread (they end at their previous deadlines)", value=writer.failures)
        yield CounterMetricFamily("vipd_successor_renames", "Owner-key rewrites naming (or re-validating) a "
                                  "successor", value=self._succession.renames)

"""DSR metrics, read from the director's maps at scrape time (no counters kept twice):

    vipd_dsr_backend_packets_total{vip,service,backend}  frames directed (or delivered locally) per backend
    vipd_dsr_backend_bytes_total{vip,service,backend}
    vipd_dsr_backend_up{vip,service,backend}             1 while the backend is in the service's table
    vipd_dsr_table_generation{vip,service}               table rewrites (each one atomic)
    vipd_dsr_program_attached{interface}                 1 while vipd's tc filter is on the interface
    vipd_dsr_frames_total{verdict,reason}                every frame the program saw, by outcome
    vipd_dsr_available                                   0 when DSR cannot run here (log says why)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from vipd.dsr.service import DsrService


class DsrCollector(Collector):
    def __init__(self, service: "DsrService") -> None:
        self.service = service  # its `attached` is refreshed by its reconcile: no netlink call at scrape time

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        svc = self.service
        avail = GaugeMetricFamily("vipd_dsr_available", "1 when this host can direct DSR traffic")
        avail.add_metric([], 0.0 if svc.unavailable else 1.0)
        yield avail
        pk = CounterMetricFamily("vipd_dsr_backend_packets", "Frames directed to (or delivered locally for) a backend",
                                 labels=["vip", "service", "backend"])
        by = CounterMetricFamily("vipd_dsr_backend_bytes", "Bytes directed to (or delivered locally for) a backend",
                                 labels=["vip", "service", "backend"])
        up = GaugeMetricFamily("vipd_dsr_backend_up", "1 while the backend is in the service's table",
                               labels=["vip", "service", "backend"])
        gen = GaugeMetricFamily("vipd_dsr_table_generation", "Maglev table rewrites of the service",
                                labels=["vip", "service"])
        for s in svc.status():
            gen.add_metric([s["vip"], s["service"]], float(s["generation"]))
            for b in s["backends"]:
                labels = [s["vip"], s["service"], b["backend"]]
                pk.add_metric(labels, float(b["packets"]))
                by.add_metric(labels, float(b["bytes"]))
                up.add_metric(labels, 1.0 if b["state"] == "active" else 0.0)
        yield from (pk, by, up, gen)
        att = GaugeMetricFamily("vipd_dsr_program_attached", "1 while vipd's DSR program is attached",
                                labels=["interface"])
        for name, ok in sorted(svc.attached.items()):
            att.add_metric([name], 1.0 if ok else 0.0)
        yield att
        frames = CounterMetricFamily("vipd_dsr_frames", "Frames the DSR program saw, by verdict and reason",
                                     labels=["verdict", "reason"])
        maps = svc.director.maps
        if maps is not None:
            for reason, n in maps.reason_counts().items():
                verdict, _, why = reason.partition("_") if reason.startswith(("pass_", "drop_")) else (reason, "", reason)
                frames.add_metric([verdict, why or reason], float(n))
        yield frames


def register(registry: CollectorRegistry, service: "DsrService") -> DsrCollector:
    c = DsrCollector(service)
    registry.register(c)
    return c

"""The per-VIP series written straight as Prometheus text (exposition format 0.0.4).

prometheus_client's `generate_latest` builds a Metric and a Sample object for every series and
formats each in Python: 2,000 VIPs are ~32,000 lines, ~100 ms for its writer alone, run in the
event loop (`bench/metrics_render.py`: 13 ms here). The per-VIP families are plain dicts
(vipd/metrics.py), so they are written here as the lines prometheus_client would write for them:
the same names (counters with `_total`), HELP and TYPE lines, labels in sorted order, values as Go
formats floats, and label values escaped the same way; `tests/unit/test_metrics_text.py` renders
the same families through prometheus_client and compares the bytes. The
escaped label value of each VIP and the text of each value are memoised (VIP names come from the
config; values are mostly 0, 1 and small counts).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Protocol

from prometheus_client.utils import floatToGoString

from vipd.model import State

_MEMO_MAX = 65536
_escaped: dict[str, str] = {}
_numbers: dict[float, str] = {}


def _esc(value: str) -> str:
    """A label value as prometheus_client escapes it."""
    out = _escaped.get(value)
    if out is None:
        if len(_escaped) > _MEMO_MAX:
            _escaped.clear()
        out = _escaped[value] = value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return out


def _num(value: float) -> str:
    out = _numbers.get(value)
    if out is None:
        if len(_numbers) > _MEMO_MAX:
            _numbers.clear()
        out = _numbers[value] = floatToGoString(value)
    return out


def _head(out: list[str], name: str, doc: str, kind: str) -> None:
    doc = doc.replace("\\", r"\\").replace("\n", r"\n")
    out.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")


def _family(out: list[str], name: str, doc: str, kind: str, labels: tuple[str, ...],
            values: Iterable[tuple[tuple[str, ...], float]]) -> None:
    """One family from (label values in `labels`' order, value) pairs; `labels` need not be sorted."""
    name = f"{name}_total" if kind == "counter" else name
    _head(out, name, doc, kind)
    order = sorted(range(len(labels)), key=lambda i: labels[i])
    keys = [labels[i] for i in order]
    for key, value in values:
        pairs = ",".join(f'{k}="{_esc(key[i])}"' for k, i in zip(keys, order))
        out.append(f"{name}{{{pairs}}} {_num(value)}\n")


def _by_vip(out: list[str], name: str, doc: str, kind: str, values: Mapping[str, float]) -> None:
    """One family labelled by `vip` alone (most of them): one f-string per line."""
    name = f"{name}_total" if kind == "counter" else name
    _head(out, name, doc, kind)
    out.extend(f'{name}{{vip="{_esc(vip)}"}} {_num(value)}\n' for vip, value in values.items())


class VipSeries(Protocol):
    state: dict[str, State]
    epoch: dict[str, int]
    healthy: dict[str, bool]
    present: dict[str, bool]
    transitions: dict[tuple[str, str, str], int]
    announcements: dict[str, int]
    conflicts: dict[str, int]
    errors: dict[tuple[str, str], int]
    takeovers: dict[tuple[str, str], int]


def _states(out: list[str], states: Iterable[tuple[str, State]]) -> None:
    _head(out, "vipd_vip_state", "1 for the VIP's current ownership state", "gauge")
    prefixes = [(s, f'vipd_vip_state{{state="{_esc(s.value)}",vip="') for s in State]
    for vip, st in states:
        e = _esc(vip)
        out.extend(f'{p}{e}"}} {"1.0" if s is st else "0.0"}\n' for s, p in prefixes)


def render(v: VipSeries) -> bytes:
    """The per-VIP families, in the order vipd has always exposed them."""
    out: list[str] = []
    _by_vip(out, "vipd_vip_owner", "1 while this host owns the VIP", "gauge",
            {vip: 1 if st is State.OWNER else 0 for vip, st in v.state.items()})
    _states(out, v.state.items())
    _by_vip(out, "vipd_vip_epoch", "Ownership epoch (owner key create_revision) while owner", "gauge", v.epoch)
    _family(out, "vipd_ownership_transitions", "Ownership state changes", "counter", ("vip", "from_state", "to_state"),
            v.transitions.items())
    _by_vip(out, "vipd_announcements", "Gratuitous ARP / unsolicited NA frames sent", "counter", v.announcements)
    _by_vip(out, "vipd_address_conflicts", "Claims refused: another machine answers for the VIP", "counter",
            v.conflicts)
    _by_vip(out, "vipd_healthy", "1 while this host may serve the VIP (host and VIP checks pass)", "gauge",
            {vip: int(h) for vip, h in v.healthy.items()})
    _family(out, "vipd_dataplane_errors", "Failed kernel operations", "counter", ("vip", "op"), v.errors.items())
    _by_vip(out, "vipd_vip_address_present", "1 while the VIP's address is in the kernel (compare with "
            "vipd_vip_owner)", "gauge", {vip: int(p) for vip, p in v.present.items()})
    _family(out, "vipd_takeovers", "VIPs this host took over, by what freed them (released: a planned "
            "hand-over; expired: the previous owner's lease ran out)", "counter", ("vip", "cause"), v.takeovers.items())
    return "".join(out).encode()

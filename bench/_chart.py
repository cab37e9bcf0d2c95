#!/usr/bin/env python3
"""The failover chart: client-observed outage per fault per daemon (median bar, min..max whisker,
each run a dot), and below it the time two hosts held the VIP at once.

    .venv/bin/python bench/_chart.py bench/out/failover-<ts>.json [out.png]   # re-draw from a JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

FAULT_LABELS = {"sigterm": "planned\nhandover", "sigkill": "daemon\nSIGKILL", "sigstop": "daemon\nhang (SIGSTOP)",
                "linkcut": "owner\nlink cut", "etcd-restart": "etcd\nrestart"}
COLORS = {"vipd": "#1f77b4", "vipd-tuned": "#17becf", "keepalived": "#ff7f0e", "keepalived-tuned": "#d62728", "vip-manager": "#2ca02c"}


def render(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    daemons = [d for d, r in results["daemons"].items() if r.get("faults")]
    faults = [f for f in FAULT_LABELS if any(f in results["daemons"][d]["faults"] for d in daemons)]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9.5, 6.4), sharex=True, gridspec_kw={"height_ratios": [3, 1.6]})
    width = 0.8 / max(1, len(daemons))
    top = top2 = 1.0
    for j, d in enumerate(daemons):
        color = COLORS.get(d, None)
        for i, f in enumerate(faults):
            x = i - 0.4 + width * (j + 0.5)
            fr = results["daemons"][d]["faults"].get(f)
            if fr is None:
                ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=7, color="grey", rotation=90)
                continue
            ok = [r for r in fr["runs"] if "error" not in r]
            s = fr["summary"]
            o = s["outage_ms"]
            if o["n"]:
                ax.bar(x, o["median"], width * 0.9, color=color, alpha=0.85,
                       label=d if i == 0 or not ax.get_legend_handles_labels()[1].count(d) else None)
                ax.vlines(x, o["min"], o["max"], color="black", linewidth=1)
                ax.scatter([x] * len(ok), [r["outage_ms"] for r in ok], s=6, color="black", zorder=3)
                ax.text(x, o["max"], f"{o['median']:.0f}", ha="center", va="bottom", fontsize=6.5, color=color)
                top = max(top, o["max"])
            if s["errors"]:
                ax.text(x, (o["max"] or 0) + 50, f"{len(s['errors'])} failed", ha="center", fontsize=6, color="red",
                        rotation=90, va="bottom")
            dual = [r.get("dual_ms", 0.0) for r in ok]
            if dual:
                med = sorted(dual)[len(dual) // 2]
                ax2.bar(x, med, width * 0.9, color=color, alpha=0.85)
                ax2.vlines(x, min(dual), max(dual), color="black", linewidth=1)
                ge = "≥" if s.get("dual_open_at_undo") else ""
                ax2.text(x, max(dual), f"{ge}{med:.0f}", ha="center", va="bottom", fontsize=6.5, color=color)
                top2 = max(top2, max(dual))
    handles, labels = ax.get_legend_handles_labels()
    seen: dict[str, Any] = {}
    for h, lab in zip(handles, labels):
        seen.setdefault(lab, h)
    ax.legend(seen.values(), seen.keys(), fontsize=8, loc="upper left")
    ax.set_ylim(0, top * 1.12)
    ax2.set_ylim(0, top2 * 1.25)
    ax.set_ylabel("client outage, ms\n(bar median, line min..max)")
    runs = results.get("runs_per_fault")
    ax.set_title(f"VIP failover, 3 hosts, ICMP probe every {results.get('probe_interval_ms', 10):g} ms, "
                 f"{runs} run{'s' if runs != 1 else ''} per fault, fault at a random moment", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax2.set_ylabel("two hosts held\nthe VIP, ms")
    ax2.grid(axis="y", alpha=0.3)
    ax2.set_xticks(range(len(faults)))
    ax2.set_xticklabels([FAULT_LABELS[f] for f in faults], fontsize=8)
    ax2.text(0.995, 0.97, "median shown; ≥: still overlapping when the bench undid the fault (6 s after it);\n"
             "an outage of 0 with an overlap: the old host kept the address and its kernel kept answering",
             transform=ax2.transAxes, ha="right", va="top", fontsize=6.5, color="dimgrey")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(__doc__)
        sys.exit(2)
    src = Path(sys.argv[1])
    dst = Path(sys.argv[2]) if len(sys.argv) > 2 else src.with_suffix(".png")
    render(json.loads(src.read_text()), dst)
    print(dst)

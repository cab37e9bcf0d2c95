"""What `vipd doctor` reports: findings with a severity and a fix, rendered as text or JSON.

A finding with severity ``error`` blocks: vipd cannot do its job on this host as configured (the
daemon refuses L2 mode on a proxy-ARP segment, for instance). ``warning``: it works, with a cost
or a risk the detail names. ``info``: context (measured figures, what was not checked and why).
``ok``: the check passed. The exit status of `vipd doctor` is 1 when any finding blocks, else 0.
"""

from __future__ import annotations

import enum
import json
import textwrap
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping


class Severity(enum.IntEnum):
    OK = 0
    INFO = 1
    WARNING = 2
    ERROR = 3

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Finding:
    """One check's outcome. ``check`` is a stable dotted id (e.g. "l2.proxy_arp"), ``subject`` what
    it is about (an interface, a VIP, an etcd endpoint, "host"), ``data`` machine-readable figures."""

    check: str
    severity: Severity
    subject: str
    summary: str
    detail: str = ""
    fix: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)

    @property
    def blocks(self) -> bool:
        return self.severity is Severity.ERROR

    def as_dict(self) -> dict[str, Any]:
        return {"check": self.check, "severity": self.severity.label, "blocks": self.blocks,
                "subject": self.subject, "summary": self.summary, "detail": self.detail, "fix": self.fix,
                "data": dict(self.data)}


def ok(check: str, subject: str, summary: str, **data: Any) -> Finding:
    return Finding(check, Severity.OK, subject, summary, data=data)


def info(check: str, subject: str, summary: str, detail: str = "", **data: Any) -> Finding:
    return Finding(check, Severity.INFO, subject, summary, detail, data=data)


def exit_status(findings: Iterable[Finding]) -> int:
    return 1 if any(f.blocks for f in findings) else 0


def to_json(findings: Iterable[Finding]) -> str:
    items = [f.as_dict() for f in findings]
    return json.dumps({"blocking": any(i["blocks"] for i in items), "findings": items}, indent=2, default=str)


def _wrap(prefix: str, text: str, width: int = 100) -> list[str]:
    return textwrap.wrap(text, width=width, initial_indent=prefix, subsequent_indent=" " * len(prefix))


def render(findings: Iterable[Finding], *, verbose: bool = False) -> str:
    """One line per finding (severity, check, subject: summary), then `why:` and `fix:` lines for
    anything that is not ok; a closing verdict line."""
    out: list[str] = []
    items = list(findings)
    for f in items:
        out.append(f"{f.severity.label.upper():<8}{f.check:<22}{f.subject}: {f.summary}")
        if f.severity is not Severity.OK or verbose:
            if f.detail:
                out += _wrap(" " * 30 + "why: ", f.detail)
            if f.fix:
                out += _wrap(" " * 30 + "fix: ", f.fix)
    blocking = [f for f in items if f.blocks]
    warnings = sum(1 for f in items if f.severity is Severity.WARNING)
    out.append("")
    out.append(f"{len(blocking)} blocking, {warnings} warnings, {len(items)} checks: "
               + ("vipd cannot work as configured on this host" if blocking else "nothing blocks"))
    return "\n".join(out)

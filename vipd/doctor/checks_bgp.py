"""Routed VIPs need a BGP speaker that exports them: is BIRD 2 or FRR installed, and does its config
export every routed VIP (a read of the config files, as shipped in conf/bird2-vipd.conf and
conf/frr-vipd.conf; nothing is asked of a running daemon)?

BIRD: a `protocol direct` on interface "lo", and every VIP inside the VIPD_VIPS prefix set (or, for
a hand-written config, inside some prefix set or `net ~` literal of the files). FRR: `redistribute
connected` and a prefix-list permitting every VIP.
"""

from __future__ import annotations

import glob
import ipaddress
import os
import re
import shutil
from typing import Callable, Iterable, Optional

from vipd.config import Config
from vipd.doctor.findings import Finding, Severity, ok

BIRD_CONF = "/etc/bird/bird.conf"
FRR_CONF = "/etc/frr/frr.conf"
_INCLUDE_RE = re.compile(r'^\s*include\s+"([^"]+)"\s*;', re.M)
_PREFIX_RE = re.compile(r"(\d+\.\d+\.\d+\.\d+/\d+)(\{(\d+),(\d+)\}|\+|-)?")
_DEFINE_RE = re.compile(r"define\s+VIPD_VIPS\s*=\s*\[([^\]]*)\]", re.S)
_DIRECT_LO_RE = re.compile(r'protocol\s+direct\b(?:(?!\bprotocol\b).)*?interface\s+"lo"', re.S)
_FRR_PL_RE = re.compile(r"^\s*ip prefix-list \S+ (?:seq \d+ )?permit (\S+)(?: ge (\d+))?(?: le (\d+))?", re.M)


def read_with_includes(path: str, depth: int = 0) -> str:
    """A BIRD config with its `include "..."` files (globs, relative to the file) inlined; 8 levels."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return ""
    if depth >= 8:
        return text
    base = os.path.dirname(path)

    def inline(m: re.Match[str]) -> str:
        pattern = m.group(1) if os.path.isabs(m.group(1)) else os.path.join(base, m.group(1))
        return "\n".join(read_with_includes(p, depth + 1) for p in sorted(glob.glob(pattern)))

    return _INCLUDE_RE.sub(inline, text)


def _strip_comments(text: str) -> str:
    return re.sub(r"#.*", "", re.sub(r"/\*.*?\*/", "", text, flags=re.S))


def bird_prefixes(text: str) -> list[tuple[ipaddress.IPv4Network, int, int]]:
    """(prefix, min length, max length) of VIPD_VIPS, or of every prefix pattern in the file when
    VIPD_VIPS is not defined."""
    text = _strip_comments(text)
    m = _DEFINE_RE.search(text)
    out = []
    for p, suffix, lo, hi in _PREFIX_RE.findall(m.group(1) if m else text):
        net = ipaddress.IPv4Network(p, strict=False)
        if lo:
            out.append((net, int(lo), int(hi)))
        elif suffix == "+":
            out.append((net, net.prefixlen, 32))
        else:
            out.append((net, net.prefixlen, net.prefixlen))
    return out


def covered(ip: ipaddress.IPv4Address, plen: int, prefixes: Iterable[tuple[ipaddress.IPv4Network, int, int]]) -> bool:
    return any(ip in net and lo <= plen <= hi for net, lo, hi in prefixes)


def frr_prefixes(text: str) -> list[tuple[ipaddress.IPv4Network, int, int]]:
    out = []
    for p, ge, le in _FRR_PL_RE.findall(text):
        try:
            net = ipaddress.IPv4Network(p, strict=False)
        except ValueError:
            continue
        out.append((net, int(ge) if ge else net.prefixlen, int(le) if le else (32 if ge else net.prefixlen)))
    return out


def bgp_findings(cfg: Config, *, bird_conf: str = BIRD_CONF, frr_conf: str = FRR_CONF,
                 which: Callable[[str], Optional[str]] = shutil.which) -> list[Finding]:
    routed = [v for v in cfg.vips if v.on_loopback and v.version == 4]
    if not routed:
        return []
    have_bird = which("bird") is not None
    have_frr = which("vtysh") is not None or which("/usr/lib/frr/bgpd") is not None
    if not have_bird and not have_frr:
        return [Finding("bgp.speaker", Severity.WARNING, "host", "routed VIPs are configured but neither BIRD nor FRR "
                        "is installed", "a VIP on lo reaches nobody unless a BGP speaker announces it",
                        "apt install bird2 (or frr) and include conf/bird2-vipd.conf (conf/frr-vipd.conf)")]
    out: list[Finding] = []
    for name, present, path, parse in (("bird", have_bird, bird_conf, bird_prefixes),
                                       ("frr", have_frr, frr_conf, frr_prefixes)):
        if not present:
            continue
        text = read_with_includes(path) if name == "bird" else (open(path).read() if os.path.exists(path) else "")
        if not text:
            out.append(Finding("bgp.export", Severity.WARNING, name, f"{path} is missing or empty",
                               f"{name} is installed but has no config to export the VIPs",
                               f"include conf/{'bird2' if name == 'bird' else 'frr'}-vipd.conf"))
            continue
        if name == "bird" and not _DIRECT_LO_RE.search(_strip_comments(text)):
            out.append(Finding("bgp.export", Severity.WARNING, name, f"{path}: no `protocol direct` on interface \"lo\"",
                               "BIRD only learns vipd's VIPs from lo through a direct protocol",
                               "include conf/bird2-vipd.conf (it has protocol direct vipd_vips)"))
            continue
        if name == "frr" and not re.search(r"^\s*redistribute connected", text, re.M):
            out.append(Finding("bgp.export", Severity.WARNING, name, f"{path}: no `redistribute connected`",
                               "FRR announces vipd's VIPs from lo as connected routes", "merge conf/frr-vipd.conf"))
            continue
        prefixes = parse(text)
        missing = [v.name for v in routed if not covered(v.ip, v.address.max_prefixlen, prefixes)]  # type: ignore[arg-type]
        if missing:
            out.append(Finding("bgp.export", Severity.WARNING, name,
                               f"{path} does not export {', '.join(missing)}",
                               "their /32s are outside every exported prefix set (VIPD_VIPS / the prefix-list)",
                               "widen VIPD_VIPS (BIRD) or the VIPD-VIPS prefix-list (FRR) to cover them",
                               {"missing": missing}))
        else:
            out.append(ok("bgp.export", name, f"{path} exports all {len(routed)} routed VIPs"))
    return out

"""BIRD 2 in lab namespaces: a router on the lab segment, a BGP speaker per host, and `birdc` readers.

    {prefix}r   the router (key "r")   .1   ::1   MAC 02:76:74:00:00:a0

Every BIRD runs in the foreground in its namespace through Lab.popen (`bird -f -c CONF -s SOCK -P PID`),
with its config, control socket, pid file and log in its own directory (the test's tmp dir): nothing in
/etc/bird or /run/bird is read or written, and Lab.down() stops whatever is left. The control socket
is a path, so `birdc -s SOCK` works from the root namespace.

Configs are the shipped ones: a host's bird.conf defines VIPD_* and includes conf/bird2-vipd.conf, the
router's includes conf/router-bird2.conf and adds one `protocol bgp ... from vipd_host` per host; so
the lab tests exactly what the README tells operators to install.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

from vipd.lab import netns
from vipd.lab.topology import Host, Lab

if TYPE_CHECKING:
    from vipd.lab.cluster import Cluster

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
HOST_SNIPPET = CONF_DIR / "bird2-vipd.conf"
ROUTER_SNIPPET = CONF_DIR / "router-bird2.conf"
ROUTER_AS, HOST_AS = 65000, 65001
ROUTER_SYSCTLS = {"net.ipv4.ip_forward": 1, "net.ipv4.fib_multipath_hash_policy": 1}
_PROTO_RE = re.compile(r"^(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+ ?\S*?)\s*(\S.*)?$")


def add_router(lab: Lab, offset: int = 1) -> Host:
    """The router namespace {prefix}r on the lab segment (forwarding on, L4 multipath hash)."""
    router = lab.add_node("router", "r", offset, 0xA0)
    netns.sysctl(router.ns, ROUTER_SYSCTLS)
    return router


def host_config(router_id: str, source: str, peer: str, vips: str, *, local_as: int = HOST_AS,
                peer_as: int = ROUTER_AS, snippet: Path = HOST_SNIPPET) -> str:
    """A host's bird.conf: the definitions conf/bird2-vipd.conf asks for, then the snippet itself.
    `vips` is a prefix (e.g. "198.18.0.0/24"): only /32s inside it are announced."""
    return (f"log stderr all;\nrouter id {router_id};\n"
            f"define VIPD_VIPS = [ {vips}{{32,32}} ];\ndefine VIPD_SOURCE = {source};\n"
            f"define VIPD_PEER = {peer};\ndefine VIPD_LOCAL_AS = {local_as};\ndefine VIPD_PEER_AS = {peer_as};\n"
            f"protocol device {{ scan time 10; }}\ninclude \"{snippet}\";\n")


def router_config(router_id: str, neighbours: Mapping[str, str], vips: str, *, router_as: int = ROUTER_AS,
                  host_as: int = HOST_AS, snippet: Path = ROUTER_SNIPPET) -> str:
    """The router's bird.conf: conf/router-bird2.conf and one session per (name -> source address)."""
    sessions = "".join(f"protocol bgp {name} from vipd_host {{ neighbor {addr} as VIPD_HOST_AS; }}\n"
                       for name, addr in neighbours.items())
    return (f"log stderr all;\nrouter id {router_id};\n"
            f"define VIPD_VIPS = [ {vips}{{32,32}} ];\ndefine ROUTER_AS = {router_as};\n"
            f"define VIPD_HOST_AS = {host_as};\nprotocol device {{ scan time 10; }}\n"
            f"include \"{snippet}\";\n{sessions}")


@dataclass(frozen=True)
class BirdRoute:
    """One route of `birdc show route` (BIRD lists each protocol's route to a prefix separately)."""

    net: str
    proto: str  # the protocol that brought it (for BGP: the session's name)
    primary: bool  # BIRD's best route ("*")
    nexthops: tuple[str, ...]  # "via" addresses; empty for device / unreachable routes


def parse_routes(text: str) -> list[BirdRoute]:
    """`birdc show route ...` output -> routes, in BIRD's order (the primary first per prefix)."""
    routes: list[BirdRoute] = []
    net = ""
    cur: dict[str, object] | None = None

    def flush() -> None:
        if cur is not None:
            routes.append(BirdRoute(str(cur["net"]), str(cur["proto"]), bool(cur["primary"]),
                                    tuple(cur["via"])))  # type: ignore[arg-type]

    for line in text.splitlines():
        m = re.match(r"^(\S+)?\s+(unicast|unreachable|blackhole|prohibit)\s+\[(\S+)[^\]]*\]\s*(\*)?", line)
        if m and (m[1] is None or "/" in m[1]):
            flush()
            net = m[1] or net
            cur = {"net": net, "proto": m[3], "primary": m[4] == "*", "via": []}
            continue
        via = re.match(r"^\s+via\s+(\S+)", line)
        if via and cur is not None:
            cur["via"].append(via[1])  # type: ignore[union-attr,attr-defined]
    flush()
    return routes


def parse_protocols(text: str) -> dict[str, tuple[str, str, str]]:
    """`birdc show protocols` -> {name: (protocol, state, info)}; info is e.g. "Established"."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4 or parts[0] in ("Name", "BIRD") or line.startswith(" "):
            continue
        # Name Proto Table State Since(1 or 2 words) Info...: the state is the 4th column
        name, proto, _table, state = parts[:4]
        rest = parts[4:]
        while rest and re.match(r"^[\d:.\-]+$", rest[0]):  # "Since": a time, or a date and a time
            rest = rest[1:]
        out[name] = (proto, state, " ".join(rest))
    return out


class BirdError(RuntimeError):
    """BIRD answered a command with an error (its reply code kept: 8001 is "Network not found")."""

    def __init__(self, text: str, code: int) -> None:
        super().__init__(f"BIRD: {text} (code {code})")
        self.code = code


NETWORK_NOT_FOUND = 8001


class Bird:
    """One BIRD 2 process in a lab namespace; files in `workdir`."""

    def __init__(self, lab: Lab, node: Host, workdir: str | Path, config: str) -> None:
        self.lab = lab
        self.node = node
        self.dir = Path(workdir)
        self.config = config
        self.conf = self.dir / "bird.conf"
        self.ctl = self.dir / "bird.ctl"
        self.pidfile = self.dir / "bird.pid"
        self.log = self.dir / "bird.log"
        self.proc: subprocess.Popen[bytes] | None = None
        if len(str(self.ctl)) > 100:  # sun_path is 108 bytes
            raise ValueError(f"control socket path too long for a unix socket: {self.ctl}")

    def __repr__(self) -> str:
        return f"Bird({self.node.name}, {self.dir})"

    def start(self, timeout: float = 5.0) -> "Bird":
        """Check the config (`bird -p`), start BIRD, wait until its control socket answers."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self.config)
        check = subprocess.run(["bird", "-p", "-c", str(self.conf)], capture_output=True, text=True, timeout=10)
        if check.returncode != 0:
            raise RuntimeError(f"{self}: config rejected: {(check.stderr or check.stdout).strip()}")
        for stale in (self.ctl, self.pidfile):
            stale.unlink(missing_ok=True)
        self.proc = self.lab.popen(self.node, ["bird", "-f", "-c", str(self.conf), "-s", str(self.ctl),
                                               "-P", str(self.pidfile)], log=self.log)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self}: exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if "Daemon is up" in self.command("show status"):
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self}: control socket not answering after {timeout}s: {self.log_tail()}")
            time.sleep(0.02)

    def stop(self, timeout: float = 3.0) -> None:
        """SIGTERM (BIRD shuts its sessions down), SIGKILL after `timeout`; idempotent."""
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ------------------------------------------------------------------ reading it

    def birdc(self, *args: str, timeout: float = 5.0) -> str:
        """`birdc -s SOCK ARGS...` (the oracle); its output without the banner line."""
        r = subprocess.run(["birdc", "-s", str(self.ctl), *args], capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            if r.stdout.rstrip().endswith("Network not found"):  # birdc drops the reply codes
                raise BirdError("Network not found", NETWORK_NOT_FOUND)
            raise RuntimeError(f"birdc {' '.join(args)} on {self.node.name}: {(r.stderr or r.stdout).strip()}")
        lines = r.stdout.splitlines()
        return "\n".join(lines[1:] if lines and lines[0].startswith("BIRD ") else lines)

    def command(self, line: str, timeout: float = 2.0) -> str:
        """The same through the control socket directly (no process per call: for tight polling).
        Returns the reply text as birdc prints it."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.ctl))
            f = s.makefile("rwb")
            _reply(f)  # the "0001 BIRD x.y.z ready." banner
            f.write(line.encode() + b"\n")
            f.flush()
            return "\n".join(_reply(f))

    def routes(self, prefix: str, *, fast: bool = False) -> list[str]:
        """Next hops of every route to exactly `prefix` in BIRD's table, the primary's first."""
        try:
            text = self.command(f"show route {prefix}") if fast else self.birdc("show", "route", prefix)
        except BirdError as e:
            if e.code == NETWORK_NOT_FOUND:
                return []
            raise
        return [hop for r in parse_routes(text) for hop in r.nexthops]

    def route_table(self, prefix: str | None = None) -> list[BirdRoute]:
        """`birdc show route [PREFIX]`, parsed (every route BIRD has when no prefix is given)."""
        try:
            return parse_routes(self.birdc("show", "route", *([prefix] if prefix else [])))
        except BirdError as e:
            if e.code == NETWORK_NOT_FOUND:
                return []
            raise

    def protocols(self) -> dict[str, str]:
        """{name: state}: a BGP session's BGP state ("Established", "Active", ...), else up/down."""
        return {name: (info.split()[0] if proto == "BGP" and info else state)
                for name, (proto, state, info) in parse_protocols(self.birdc("show", "protocols")).items()}

    def wait_established(self, names: Iterable[str], timeout: float = 10.0) -> None:
        want = set(names)
        deadline = time.monotonic() + timeout
        while True:
            states = self.protocols()
            if all(states.get(n) == "Established" for n in want):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{self}: sessions {states} not all Established after {timeout}s\n"
                                     f"{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _reply(f: object) -> list[str]:
    """One reply of BIRD's control protocol: "NNNN-text" / " text" lines up to a final "NNNN text".
    Codes >= 8000 are errors (BirdError)."""
    out: list[str] = []
    while True:
        raw = f.readline()  # type: ignore[attr-defined]
        if not raw:
            raise OSError("BIRD closed the control socket")
        line = raw.decode(errors="replace").rstrip("\n")
        if line[:4].isdigit() and len(line) >= 5:
            code, sep, text = int(line[:4]), line[4], line[5:]
            if code >= 8000:
                raise BirdError(text, code)
            if code not in (0, 1):
                out.append(text)
            if sep == " ":
                return out
        else:
            out.append(line[1:] if line.startswith(" ") else line)


def kernel_nexthops(lab: Lab, node: Host, prefix: str) -> list[str]:
    """The gateways of the kernel's main-table route to exactly `prefix` in `node` (several when
    it is a multipath route; empty when there is none)."""
    out = lab.run(node, ["ip", "-j", "route", "show", "exact", prefix]).stdout
    hops: list[str] = []
    for r in json.loads(out or "[]"):
        if "gateway" in r:
            hops.append(r["gateway"])
        hops += [h["gateway"] for h in r.get("nexthops", []) if "gateway" in h]
    return hops


def sources_for(hosts: Sequence[Host], base: int = 60) -> dict[str, str]:
    """A fixed BGP source address per host, in the lab subnet: h<i> -> .(base + i). On the host's lo
    (vipd keeps it there), reached by the router through the host's NIC (ARP answers for any local
    address: arp_ignore=0), so router and hosts peer directly."""
    out = {}
    for h in hosts:
        i = int(h.name[1:])
        out[h.name] = str(ipaddress.ip_interface(h.ip).network[base + i])
    return out


@dataclass(frozen=True)
class RouteState:
    t: float  # time.monotonic() when first seen
    nexthops: tuple[str, ...]  # sorted next hops of every route BIRD has to the prefix


def watch_routes(bird: Bird, prefix: str, until: Callable[[tuple[str, ...]], bool], timeout: float,
                 interval: float = 0.002) -> list[RouteState]:
    """Poll BIRD's table (control socket, ~0.1 ms a read) until `until(next hops)` holds; returns each
    distinct state seen, with when it was first seen (the last one satisfies `until`). AssertionError
    with what was seen if `timeout` passes first."""
    seen: list[RouteState] = []
    deadline = time.monotonic() + timeout
    while True:
        t = time.monotonic()
        hops = tuple(sorted(bird.routes(prefix, fast=True)))
        if not seen or seen[-1].nexthops != hops:
            seen.append(RouteState(t, hops))
        if until(hops):
            return seen
        if t > deadline:
            raise AssertionError(f"{bird}: {prefix} went through {[s.nexthops for s in seen]}, "
                                 f"condition not met after {timeout}s")
        time.sleep(interval)


VIP_RANGE = "198.18.0.0/24"  # RFC 2544 benchmarking space: routed only inside the lab


class BgpLab:
    """The router (BIRD, sessions only with the hosts' fixed source addresses) and a BIRD speaker on
    every host, for a Lab that is up. vipd keeps each host's source address on lo: `configure` gives a
    Cluster the matching [bgp] tables; `start` (after vipd runs) starts every BIRD and waits for the
    sessions; `stop` stops them all (also done by Lab.down)."""

    def __init__(self, lab: Lab, workdir: str | Path, vips: str = VIP_RANGE, conf_dir: Path = CONF_DIR) -> None:
        self.lab = lab
        self.dir = Path(workdir)
        self.router = add_router(lab)
        self.sources = sources_for(lab.hosts)
        peer = str(self.router.ip.ip)
        self.router_bird = Bird(lab, self.router, self.dir / "router",
                                router_config(peer, self.sources, vips, snippet=conf_dir / ROUTER_SNIPPET.name))
        self.speakers = {h.name: Bird(lab, h, self.dir / h.name,
                                      host_config(str(h.ip.ip), self.sources[h.name], peer, vips,
                                                  snippet=conf_dir / HOST_SNIPPET.name))
                         for h in lab.hosts}

    def bgp_table(self, host: Host) -> dict[str, object]:
        """vipd's [bgp] for `host`: its fixed source address, the router as the only peer."""
        return {"source": self.sources[host.name], "peers": [str(self.router.ip.ip)]}

    def configure(self, cluster: "Cluster") -> None:
        for h in self.lab.hosts:
            cluster.host_tables.setdefault(h.name, {})["bgp"] = self.bgp_table(h)

    def wait_sources(self, timeout: float = 10.0) -> None:
        """Until vipd holds every host's source address on lo."""
        deadline = time.monotonic() + timeout
        for h in self.lab.hosts:
            want = ipaddress.ip_address(self.sources[h.name])
            while not any(a.ip == want and a.ifindex == 1 for a in self.lab.addresses(h)):  # 1: lo
                if time.monotonic() > deadline:
                    raise AssertionError(f"{h.name}: vipd did not put its BGP source {want} on lo in {timeout}s")
                time.sleep(0.02)

    def start(self, timeout: float = 10.0) -> None:
        self.wait_sources(timeout)
        self.router_bird.start()
        for b in self.speakers.values():
            b.start()
        self.router_bird.wait_established(self.sources, timeout)

    def stop(self) -> None:
        for b in (*self.speakers.values(), self.router_bird):
            b.stop()

    def birds(self) -> list[Bird]:
        return [self.router_bird, *self.speakers.values()]

    def bird_pids(self) -> list[int]:
        """Processes named bird in any of the lab's namespaces."""
        pids = []
        for ns in self.lab.namespaces:
            for pid in netns.pids_in(ns):
                try:
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "bird":
                        pids.append(pid)
                except OSError:
                    pass
        return pids

    def host_of(self, nexthop: str) -> str:
        return next(name for name, src in self.sources.items() if src == nexthop)

    def announcers(self, prefix: str) -> list[str]:
        """Hosts the router's BIRD has a route to `prefix` through (`birdc show route`), sorted."""
        return sorted(self.host_of(h) for h in self.router_bird.routes(prefix))

"""A throw-away multi-host L2 lab in network namespaces.

    {prefix}br   holds the bridge {prefix}br and one port {prefix}p<key> per other namespace
    {prefix}e    the etcd node            (key "e")      .2    ::2
    {prefix}c    the client               (key "c")      .3    ::3
    {prefix}h<i> host i, i = 1..n_hosts   (key "h<i>")   .10+i         (h1: 10.213.0.11, fd00:213::11)
    {prefix}<x>  an extra node attached later by Lab.add_node (key: one letter; vipd.lab.bgp's router is "r")
    VIPs: vip4(i) = .100+i, vip6(i) (vip6(1) = fd00:213::101), with the subnet's prefix length
    (an IPv6 host part is spelled like the IPv4 one: .11 <-> ::11, i.e. the decimal digits read as hex)

Every namespace has `lo` up and one NIC named {prefix}n (the same name everywhere, so one VIP config
fits every host) whose veth peer is a port of the bridge. Veths are created directly in their
namespaces: nothing ever appears in the root namespace, which gets no address, route or link.
MACs are fixed (02:76:74:00:00:<i> for host i, ...:c0 client, ...:e0 etcd) so a frame's source names
its sender. IPv6 addresses of the lab itself are added with `nodad` (usable at once); IPv6 is disabled
in the bridge namespace so the segment carries no noise of its own.

Host sysctls: `promote_secondaries=1` (what systemd's 50-default.conf sets on every Debian host: a
VIP in the NIC's subnet is a secondary address, and removing a primary must not take it along).
Everything else is the kernel default on purpose: arp_ignore=0 (with one NIC a host answers ARP
exactly for the addresses it holds), arp_accept=0 and IPv6 DAD on (what real clients and hosts do;
vipd must cope with them). Override with `host_sysctls`.

Cutting a host off (Lab.cut/restore at its bridge port, Lab.partition/heal with nftables) is
vipd.lab.partition's, mixed into Lab.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

from vipd.lab import netns
from vipd.lab.partition import Partitions

IPv4Interface = ipaddress.IPv4Interface
IPv6Interface = ipaddress.IPv6Interface
AnyIP = Union[str, ipaddress.IPv4Address, ipaddress.IPv6Address, ipaddress.IPv4Interface, ipaddress.IPv6Interface]

_PREFIX_RE = re.compile(r"^vt[a-z0-9]+$")
_IFNAMSIZ = 15
DEFAULT_HOST_SYSCTLS = {
    "net.ipv4.conf.all.promote_secondaries": 1,
    "net.ipv4.conf.default.promote_secondaries": 1,
}
_BRIDGE_SYSCTLS = {"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1}
STOP_GRACE = 3.0  # seconds a process gets between SIGTERM and SIGKILL at down()


def to_ip(value: AnyIP) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address from an address, an interface ("10.0.0.1/24") or a string of either."""
    if isinstance(value, (ipaddress.IPv4Interface, ipaddress.IPv6Interface)):
        return value.ip
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return value
    return ipaddress.ip_interface(str(value)).ip


@dataclass(eq=False)
class Host:
    """One lab namespace with its NIC (hosts h1..hN, and the client and etcd nodes)."""

    name: str  # "h1".., "client", "etcd"
    ns: str  # its network namespace
    ifname: str  # its NIC inside ns
    ip: IPv4Interface
    ip6: IPv6Interface
    mac: str
    port: str  # the NIC's veth peer, a bridge port in the bridge namespace
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)  # started through Lab.popen

    def __repr__(self) -> str:
        return f"Host({self.name}, ns={self.ns}, {self.ifname} {self.ip} {self.ip6} {self.mac})"


class Lab(Partitions):
    """Namespaces + bridge + veths, processes started inside them, and their complete removal.

    Use as a context manager (or up()/down()); down() is idempotent, runs after a partial up(), and is
    registered with atexit while the lab is up.
    """

    def __init__(self, prefix: str, n_hosts: int = 3, subnet: str = "10.213.0.0/24",
                 subnet6: str = "fd00:213::/64", *, host_sysctls: Mapping[str, Any] | None = None) -> None:
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"lab prefix {prefix!r} must match {_PREFIX_RE.pattern}")
        if not 1 <= n_hosts <= 89:
            raise ValueError("n_hosts must be between 1 and 89")
        self.prefix = prefix
        self.net = ipaddress.IPv4Network(subnet)
        self.net6 = ipaddress.IPv6Network(subnet6)
        if self.net.prefixlen > 24 or self.net6.prefixlen > 112:
            raise ValueError("the lab needs at least a /24 (IPv4) and a /112 (IPv6)")
        self.host_sysctls = {**DEFAULT_HOST_SYSCTLS, **(host_sysctls or {})}
        self.bridge_ns = prefix + "br"
        self.bridge = prefix + "br"
        self.nic = prefix + "n"

        self.etcd = self._node("etcd", "e", 2, 0xE0)
        self.client = self._node("client", "c", 3, 0xC0)
        self.hosts = [self._node(f"h{i}", f"h{i}", 10 + i, i) for i in range(1, n_hosts + 1)]
        self.nodes: list[Host] = [self.etcd, self.client, *self.hosts]
        for name in (self.bridge, self.nic, *(h.port for h in self.nodes)):
            if len(name) > _IFNAMSIZ:
                raise ValueError(f"link name {name!r} longer than {_IFNAMSIZ}: shorten the prefix {prefix!r}")
        self.namespaces: list[str] = [self.bridge_ns, *(h.ns for h in self.nodes)]
        self._owned: list[str] = []  # namespaces this lab created (only those are ever deleted)
        self._procs: list[subprocess.Popen[bytes]] = []
        self._cleanups: list[Callable[[], None]] = []
        self._lock = threading.RLock()
        self._up = False

    def _node(self, name: str, key: str, offset: int, mac_low: int) -> Host:
        """Namespace {prefix}{key}: NIC {prefix}n with .offset and its IPv6 twin, MAC ...:<mac_low>."""
        return Host(name=name, ns=self.prefix + key, ifname=self.nic,
                    ip=IPv4Interface(f"{self.net[offset]}/{self.net.prefixlen}"),
                    ip6=IPv6Interface(f"{self.net6[_hex_like(offset)]}/{self.net6.prefixlen}"),
                    mac=f"02:76:74:00:00:{mac_low:02x}", port=f"{self.prefix}p{key}")

    # ------------------------------------------------------------------ life cycle

    @property
    def etcd_ns(self) -> str:
        return self.etcd.ns

    @property
    def etcd_ip(self) -> ipaddress.IPv4Address:
        return self.etcd.ip.ip

    def up(self) -> "Lab":
        """Create every namespace, link and address (~0.1-0.2 s). On any failure everything created
        so far is removed and the error raised."""
        with self._lock:
            if self._up:
                return self
            clash = [n for n in self.namespaces if netns.exists(n)]
            if clash:
                raise FileExistsError(f"namespaces {clash} already exist (a lab left behind? "
                                      f"vipd.lab.topology.purge({self.prefix!r}) removes it)")
            self._up = True
            atexit.register(self.down)
            try:
                self._build()
            except BaseException:
                self.down()
                raise
            return self

    def _build(self) -> None:
        for n in self.namespaces:  # one by one: exactly the namespaces created here are ours to delete
            netns.ip("netns", "add", n)
            self._owned.append(n)
        sysctls = [(self.bridge_ns, _BRIDGE_SYSCTLS)] + [(h.ns, self.host_sysctls) for h in self.hosts]
        netns.run_all((netns.sysctl_argv(ns, s), None) for ns, s in sysctls if s)
        # Each veth is born with its ends in their namespaces: the root namespace never holds a lab link.
        netns.ip_batch(f"link add {h.ifname} netns {h.ns} address {h.mac} type veth "
                       f"peer name {h.port} netns {self.bridge_ns}" for h in self.nodes)
        batches = [(self.bridge_ns, ["link set lo up",
                                     f"link add {self.bridge} type bridge stp_state 0 forward_delay 0 "
                                     f"mcast_snooping 0",
                                     *(f"link set {h.port} master {self.bridge} up" for h in self.nodes),
                                     f"link set {self.bridge} up"])]
        for h in self.nodes:
            batches.append((h.ns, ["link set lo up", f"link set {h.ifname} up",
                                   f"addr add {h.ip} dev {h.ifname}",
                                   f"addr add {h.ip6} dev {h.ifname} nodad"]))
        netns.run_all((["ip", "-n", ns, "-batch", "-"], "".join(line + "\n" for line in lines))
                      for ns, lines in batches)

    def add_node(self, name: str, key: str, offset: int, mac_low: int) -> Host:
        """Attach one more namespace {prefix}{key} (key: one letter, e.g. "r" for a router) to the
        segment of a lab that is up: lo up, NIC {prefix}n with .offset and its IPv6 twin, MAC
        02:76:74:00:00:<mac_low>, no host sysctls. It becomes one of `nodes`: popen/run/ip work in
        it and down() removes it like the others."""
        with self._lock:
            if not self._up:
                raise RuntimeError(f"lab {self.prefix} is not up")
            node = self._node(name, key, offset, mac_low)
            taken = [h for h in self.nodes if h.name == name or h.ns == node.ns or h.ip == node.ip or h.mac == node.mac]
            if not re.fullmatch(r"[a-z]", key) or taken or len(node.port) > _IFNAMSIZ:
                raise ValueError(f"node {name!r} key {key!r} .{offset}: bad key or clashes with {taken}")
            netns.ip("netns", "add", node.ns)
            self._owned.append(node.ns)
            self.namespaces.append(node.ns)
            self.nodes.append(node)
            netns.ip_batch([f"link add {node.ifname} netns {node.ns} address {node.mac} type veth "
                            f"peer name {node.port} netns {self.bridge_ns}"])
            netns.ip_batch([f"link set {node.port} master {self.bridge} up"], ns=self.bridge_ns)
            netns.ip_batch(["link set lo up", f"link set {node.ifname} up", f"addr add {node.ip} dev {node.ifname}",
                            f"addr add {node.ip6} dev {node.ifname} nodad"], ns=node.ns)
            return node

    def down(self) -> None:
        """Stop monitors/probes, kill every process started in the lab (and any other process found
        in its namespaces), delete its namespaces (and with them every link). Idempotent; raises
        RuntimeError only if something could not be removed, after trying everything."""
        with self._lock:
            if not self._up:
                return
            atexit.unregister(self.down)
            problems: list[str] = []
            while self._cleanups:
                fn = self._cleanups.pop()
                try:
                    fn()
                except Exception as e:  # keep tearing down; report at the end
                    problems.append(f"cleanup {fn!r}: {e!r}")
            self._stop_procs()
            owned = [n for n in self._owned if netns.exists(n)]
            for n in owned:
                survivors = netns.kill_pids(netns.pids_in(n), ns=n, grace=STOP_GRACE)
                if survivors:
                    problems.append(f"processes {survivors} survive in {n}")
            try:
                netns.delete(owned)
            except netns.CommandError as e:
                problems.append(str(e))
            self._owned = []
            self._up = False
            if problems:
                raise RuntimeError(f"lab {self.prefix} teardown: " + "; ".join(problems))

    def _stop_procs(self) -> None:
        live = [p for p in self._procs if p.poll() is None]  # unreaped: pid (= pgid) not reused
        for sig in (signal.SIGCONT, signal.SIGTERM):
            for p in live:
                _killpg(p.pid, sig)
        deadline = time.monotonic() + STOP_GRACE
        for p in live:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in live:
            if p.poll() is None:
                _killpg(p.pid, signal.SIGKILL)
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        self._procs.clear()
        for h in self.nodes:
            h.procs.clear()

    def __enter__(self) -> "Lab":
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    @property
    def is_up(self) -> bool:
        return self._up

    def add_cleanup(self, fn: Callable[[], None]) -> None:
        """Run fn at down() (before processes are killed); monitors and probes register here."""
        with self._lock:
            self._cleanups.append(fn)

    def remove_cleanup(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if fn in self._cleanups:
                self._cleanups.remove(fn)

    # ------------------------------------------------------------------ addresses and names

    def vip4(self, i: int) -> IPv4Interface:
        """The address of VIP number i (0..99): .100+i, with the subnet's prefix length."""
        if not 0 <= i <= 99:
            raise ValueError("VIP number must be in 0..99")
        return IPv4Interface(f"{self.net[100 + i]}/{self.net.prefixlen}")

    def vip6(self, i: int) -> IPv6Interface:
        """The IPv6 address of VIP number i (0..99): vip6(1) = fd00:213::101."""
        if not 0 <= i <= 99:
            raise ValueError("VIP number must be in 0..99")
        return IPv6Interface(f"{self.net6[_hex_like(100 + i)]}/{self.net6.prefixlen}")

    def host(self, name: str) -> Host:
        for h in self.nodes:
            if h.name == name or h.ns == name:
                return h
        raise KeyError(name)

    def host_by_mac(self, mac: str) -> Host | None:
        mac = mac.lower()
        return next((h for h in self.nodes if h.mac == mac), None)

    def _ns(self, where: Host | str) -> str:
        ns = where.ns if isinstance(where, Host) else where
        if ns not in self.namespaces:
            raise ValueError(f"{ns!r} is not a namespace of lab {self.prefix}")
        return ns

    # ------------------------------------------------------------------ doing things inside the lab

    def popen(self, ns: Host | str, argv: Sequence[str], *, log: str | Path,
              env: Mapping[str, str] | None = None, stdout: Any = None) -> subprocess.Popen[bytes]:
        """Start `argv` inside a lab namespace (`ip netns exec NS argv...`), in its own process group,
        stdout+stderr appended to `log` (stdout elsewhere if given, e.g. subprocess.PIPE). `env` is the
        complete environment, as for subprocess. down() terminates it (SIGTERM, SIGKILL after 3 s)."""
        ns = self._ns(ns)
        if not self._up:
            raise RuntimeError(f"lab {self.prefix} is not up")
        path = Path(log)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as f:
            proc = subprocess.Popen(netns.exec_argv(ns, argv), stdin=subprocess.DEVNULL,
                                    stdout=f if stdout is None else stdout, stderr=f,
                                    env=None if env is None else dict(env), start_new_session=True)
        with self._lock:
            self._procs.append(proc)
            for h in self.nodes:
                if h.ns == ns:
                    h.procs.append(proc)
        return proc

    def run(self, ns: Host | str, argv: Sequence[str], *, check: bool = True,
            timeout: float = netns.CMD_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run a short command inside a lab namespace and wait for it (output captured)."""
        return netns.run(netns.exec_argv(self._ns(ns), argv), check=check, timeout=timeout)

    def ip(self, ns: Host | str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`ip -n NS ARGS...` for a lab namespace."""
        return netns.ip(*args, ns=self._ns(ns), check=check)

    def ping(self, src: Host | str, dst: AnyIP, *, count: int = 1, timeout: float = 1.0) -> bool:
        """True when `dst` answers an ICMP echo from `src` within `timeout` seconds (per packet)."""
        dst_ip = to_ip(dst)
        argv = ["ping", f"-{dst_ip.version}", "-n", "-q", "-c", str(count), "-i", "0.01",
                "-W", f"{timeout:g}", str(dst_ip)]
        return self.run(src, argv, check=False, timeout=count * (timeout + 0.1) + 5).returncode == 0

    def announce(self, host: Host, ip: AnyIP, count: int = 1, interval: float = 0.0) -> None:
        """Gratuitous ARP request (IPv4) / unsolicited NA with Override (IPv6) for `ip` at the host's
        MAC, out of its NIC: the frames vipd itself sends (vipd.dataplane.announce)."""
        from vipd.dataplane.frames import garp_request, unsolicited_na

        addr = to_ip(ip)
        frame = garp_request(host.mac, addr) if addr.version == 4 else unsolicited_na(host.mac, addr)
        netns.send_frames(self._ns(host), host.ifname, frame, count, interval)

    def addresses(self, host: Host | str) -> list[netns.Addr]:
        """Every address in the host's namespace (one netlink dump)."""
        return netns.addresses(self._ns(host))

    def holders(self, ip: AnyIP, hosts: Sequence[Host] | None = None) -> list[str]:
        """Names of the hosts (h1..hN by default) that hold `ip` now, on any interface (one netlink
        dump per host, ~0.1 ms each; an IPv6 address that failed DAD is held by nobody)."""
        want = to_ip(ip)
        return [h.name for h in (self.hosts if hosts is None else hosts)
                if any(a.ip == want and a.usable for a in netns.addresses(h.ns))]

    def __repr__(self) -> str:
        return f"Lab({self.prefix}, hosts={[h.name for h in self.hosts]}, up={self._up})"


def _hex_like(n: int) -> int:
    """11 -> 0x11: the IPv6 host part spelled like the IPv4 one (10.213.0.11 <-> fd00:213::11)."""
    return int(str(n), 16)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def purge(prefix: str) -> list[str]:
    """Remove what a crashed lab with this prefix left behind: kill the processes inside its
    namespaces and delete them. Only names a Lab(prefix) creates are touched. Returns them."""
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"lab prefix {prefix!r} must match {_PREFIX_RE.pattern}")
    pattern = re.compile(re.escape(prefix) + r"(br|[a-z]|h[0-9]+)$")  # [a-z]: e, c and add_node()'s
    names = [n for n in netns.list_ns(prefix) if pattern.match(n)]
    for n in names:
        netns.kill_pids(netns.pids_in(n), ns=n, grace=STOP_GRACE)
    netns.delete(names)
    return names

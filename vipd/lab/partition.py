"""Cutting a lab host off: link cuts at its bridge port, and nftables partitions inside its namespace.

Mixed into vipd.lab.topology.Lab (lab.cut/restore, lab.partition/heal/partitioned); it uses the
Lab's bridge namespace, `ip` and namespace check.
"""

from __future__ import annotations

import subprocess
from typing import TYPE_CHECKING, Callable, Sequence

from vipd.lab import netns

if TYPE_CHECKING:
    from vipd.lab.topology import Host

PARTITION_TABLE = "vtchaos"  # Lab.partition()'s nftables table inside a host namespace
LOSS_TABLE = "vtloss"  # Lab.one_way()/segment_loss()'s nftables table (bridge family) in the switch namespace


class Partitions:
    """Link cuts (the bridge port) and partitions (an nftables table in the host) for Lab."""

    # Lab's (declared here, defined there): the bridge namespace, `ip -n NS ...`, the namespace check
    bridge_ns: str
    ip: Callable[..., subprocess.CompletedProcess[str]]
    _ns: Callable[[Host | str], str]

    # ------------------------------------------------------------------ link cuts (the bridge port)

    def cut(self, host: Host, *, silent: bool = False) -> None:
        """Disconnect `host` from the segment: it loses etcd and clients. Default: its bridge port
        goes down, so the host sees its NIC lose carrier. silent=True: the port stays up but the
        bridge drops its frames (port state disabled) - a partition the host cannot see."""
        if silent:
            self._port_state(host, 0)
        else:
            self.ip(self.bridge_ns, "link", "set", host.port, "down")

    def restore(self, host: Host) -> None:
        """Undo cut() (either kind)."""
        self.ip(self.bridge_ns, "link", "set", host.port, "up")
        self._port_state(host, 3)

    def _port_state(self, host: Host, state: int) -> None:
        # 0 disabled, 3 forwarding (`ip link set type bridge_slave state` is silently ignored here)
        netns.run(["bridge", "-n", self.bridge_ns, "link", "set", "dev", host.port, "state", str(state)])


    # ------------------------------------------------------------------ partitions (nftables)

    def partition(self, host: Host, peers: Sequence[Host]) -> None:
        """Drop every IPv4/IPv6 packet between `host` and the node addresses of `peers`, with an
        nftables table PARTITION_TABLE inside the host's namespace (created or replaced in one atomic
        batch). The host keeps its link and everything else: e.g. peers=[lab.etcd] cuts it off etcd
        but not from the clients. heal() removes the table."""
        v4 = ", ".join(str(p.ip.ip) for p in peers)
        v6 = ", ".join(str(p.ip6.ip) for p in peers)
        t = f"inet {PARTITION_TABLE}"
        script = (f"table {t}\ndelete table {t}\ntable {t} {{\n"
                  f"  chain in {{ type filter hook input priority -300; policy accept;\n"
                  f"    ip saddr {{ {v4} }} drop\n    ip6 saddr {{ {v6} }} drop\n  }}\n"
                  f"  chain out {{ type filter hook output priority -300; policy accept;\n"
                  f"    ip daddr {{ {v4} }} drop\n    ip6 daddr {{ {v6} }} drop\n  }}\n}}\n")
        netns.run(netns.exec_argv(self._ns(host), ["nft", "-f", "-"]), input=script)

    def heal(self, host: Host) -> None:
        """Undo partition() (a no-op when the host is not partitioned)."""
        netns.run(netns.exec_argv(self._ns(host), ["nft", "-f", "-"]),
                  input=f"table inet {PARTITION_TABLE}\ndelete table inet {PARTITION_TABLE}\n")

    def partitioned(self, host: Host) -> bool:
        return netns.run(netns.exec_argv(self._ns(host), ["nft", "list", "table", "inet", PARTITION_TABLE]),
                         check=False).returncode == 0

    # ------------------------------------------------------------------ losses in the switch (nftables, bridge family)

    def one_way(self, pairs: Sequence[tuple[Host, Host]]) -> None:
        """Drop every frame the bridge forwards from src's port to dst's port, for each (src, dst),
        in one direction only (unicast and each flooded copy alike). Replaces earlier losses."""
        rules = "\n".join(f"    iifname \"{src.port}\" oifname \"{dst.port}\" drop" for src, dst in pairs)
        self._loss(rules)

    def segment_loss(self, percent: int) -> None:
        """Drop each forwarded frame with probability percent/100, on every port. Replaces earlier losses."""
        if not 0 <= percent <= 100:
            raise ValueError("percent must be 0..100")
        self._loss(f"    numgen random mod 100 < {percent} drop")

    def heal_loss(self) -> None:
        netns.run(netns.exec_argv(self.bridge_ns, ["nft", "-f", "-"]),
                  input=f"table bridge {LOSS_TABLE}\ndelete table bridge {LOSS_TABLE}\n")

    def _loss(self, rules: str) -> None:
        t = f"bridge {LOSS_TABLE}"
        script = (f"table {t}\ndelete table {t}\ntable {t} {{\n"
                  f"  chain vtforward {{ type filter hook forward priority -300; policy accept;\n{rules}\n  }}\n}}\n")
        netns.run(netns.exec_argv(self.bridge_ns, ["nft", "-f", "-"]), input=script)

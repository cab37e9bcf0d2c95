"""A real 3-member etcd cluster in a namespace Lab, for fault tests and benchmarks.

Each member runs in its own namespace attached to the lab segment (Lab.add_node, keys x, y, z:
10.213.0.4-6 with the default subnet, MACs 02:76:74:00:00:e1..e3), client port 2379 and peer port
2380 on its lab address, a static initial cluster. Flags default to etcd's own defaults (heartbeat
100 ms, election 1000 ms, no pre-vote: what a stock etcd 3.4 runs); `heartbeat_ms`, `election_ms`,
`pre_vote` and `extra_args` change them. Every member also gets the watch progress interval of
vipd.lab.etcd (vipd's watches need it).

Faults: kill (SIGKILL) / start (same data dir), stop (SIGSTOP) / cont (SIGCONT), cut / restore
(the member's bridge port down: it loses every peer and client). leader() asks every member
(/v3/maintenance/status, from inside its own namespace) and returns the member a majority names.
close() stops every member and removes the data dirs; the namespaces go with the Lab.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from vipd.lab import netns
from vipd.lab.etcd import EtcdServer
from vipd.lab.topology import Host, Lab

_MEMBER_KEYS = ("x", "y", "z", "w", "v")  # namespace suffixes (one letter each, see Lab.add_node)
_FIRST_OFFSET = 4  # member i (0-based) is .4+i
STATUS_TIMEOUT = 1.0  # seconds per member for a /v3/maintenance/status
FAULTS = ("leader-kill", "leader-cut", "leader-pause", "follower-kill")  # see EtcdCluster.inject


@dataclass(frozen=True)
class MemberStatus:
    member_id: int
    leader: int  # 0: this member knows no leader
    raft_term: int


class Member(EtcdServer):
    """One member of an EtcdCluster: an EtcdServer whose --initial-cluster lists every member."""

    def __init__(self, node: Host, initial_cluster: str, data_dir: Path, extra: Sequence[str]) -> None:
        super().__init__(data_dir, host=str(node.ip.ip), client_port=2379, peer_port=2380, netns=node.ns,
                         fast=False, extra_args=extra, name=node.name)
        self.node = node
        self.initial_cluster = initial_cluster

    def args(self) -> list[str]:
        args = super().args()
        args[args.index("--initial-cluster") + 1] = self.initial_cluster
        return args

    def status(self, timeout: float = STATUS_TIMEOUT) -> MemberStatus | None:
        """This member's own view, or None when it does not answer within timeout (dead, paused)."""

        def ask() -> dict[str, Any]:
            req = urllib.request.Request(self.endpoint + "/v3/maintenance/status", data=b"{}", method="POST")
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(req, timeout=timeout) as r:
                data: dict[str, Any] = json.load(r)
                return data

        if self.pid is None:
            return None
        try:
            d = netns.call_in(self.node.ns, ask)
        except (OSError, ValueError):
            return None
        return MemberStatus(int(d["header"]["member_id"]), int(d.get("leader", 0)), int(d.get("raftTerm", 0)))

    def __repr__(self) -> str:
        return f"Member({self.name}, {self.endpoint}, pid={self.pid})"


class EtcdCluster:
    def __init__(self, lab: Lab, workdir: str | Path, *, size: int = 3, heartbeat_ms: int | None = None,
                 election_ms: int | None = None, pre_vote: bool = False, extra_args: Sequence[str] = ()) -> None:
        if not 1 <= size <= len(_MEMBER_KEYS):
            raise ValueError(f"an EtcdCluster has 1..{len(_MEMBER_KEYS)} members")
        self.lab = lab
        self.dir = Path(workdir)
        self.flags: list[str] = []
        if heartbeat_ms is not None:
            self.flags += ["--heartbeat-interval", str(heartbeat_ms)]
        if election_ms is not None:
            self.flags += ["--election-timeout", str(election_ms)]
        if pre_vote:
            self.flags += ["--pre-vote"]
        self.flags += list(extra_args)
        nodes = [lab.add_node(f"etcd{i + 1}", _MEMBER_KEYS[i], _FIRST_OFFSET + i, 0xE1 + i) for i in range(size)]
        initial = ",".join(f"{n.name}=http://{n.ip.ip}:2380" for n in nodes)
        self.members = [Member(n, initial, self.dir / n.name, self.flags) for n in nodes]
        self._cut: set[str] = set()

    # ------------------------------------------------------------------ life cycle

    def start(self, timeout: float = 20.0) -> "EtcdCluster":
        """Start every member at once (a member is healthy only once a quorum elected a leader)."""
        errors: list[BaseException] = []

        def one(m: Member) -> None:
            try:
                m.start(timeout)
            except BaseException as e:  # handed to the caller below
                errors.append(e)

        threads = [threading.Thread(target=one, args=(m,), daemon=True) for m in self.members]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self.close()
            raise errors[0]
        if self.wait_for_leader(timeout) is None:
            self.close()
            raise RuntimeError(f"etcd cluster elected no leader within {timeout}s")
        return self

    def close(self) -> None:
        """Stop every member (SIGCONT first: a paused etcd cannot exit), remove the data dirs."""
        for m in self.members:
            if m.node.name in self._cut:
                self.restore(m)
        for m in self.members:
            m.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "EtcdCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ who is who

    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def member(self, name: str) -> Member:
        return next(m for m in self.members if m.name == name)

    def statuses(self) -> dict[str, MemberStatus | None]:
        """Every member's own view, asked in parallel (a dead or paused member costs STATUS_TIMEOUT)."""
        out: dict[str, MemberStatus | None] = {}

        def one(m: Member) -> None:
            out[m.name] = m.status()

        threads = [threading.Thread(target=one, args=(m,), daemon=True) for m in self.members]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return {m.name: out.get(m.name) for m in self.members}

    def leader(self) -> Member | None:
        """The member that a majority of members name as leader (and that names itself), or None."""
        st = self.statuses()
        ids = {s.member_id: name for name, s in st.items() if s is not None}
        votes: dict[int, int] = {}
        for s in st.values():
            if s is not None and s.leader:
                votes[s.leader] = votes.get(s.leader, 0) + 1
        for lid, n in votes.items():
            name = ids.get(lid)
            own = st.get(name) if name else None
            if n > len(self.members) // 2 and own is not None and own.leader == lid:
                return self.member(name)  # type: ignore[arg-type]
        return None

    def followers(self) -> list[Member]:
        lead = self.leader()
        return [m for m in self.members if m is not lead]

    def wait_for_leader(self, timeout: float = 15.0, exclude: Sequence[Member] = ()) -> Member | None:
        """Poll leader() until there is one not in exclude; None after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            lead = self.leader()
            if lead is not None and lead not in exclude:
                return lead
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)  # no event to wait on: a leader is only visible by asking

    # ------------------------------------------------------------------ faults

    def kill(self, m: Member) -> None:
        """SIGKILL (a crash). start() brings it back with its data."""
        m.kill()

    def start_member(self, m: Member, timeout: float = 20.0) -> None:
        m.start(timeout)

    def stop(self, m: Member) -> None:
        """SIGSTOP: sockets stay open, nothing answers (a hung member)."""
        m.pause()

    def cont(self, m: Member) -> None:
        m.resume()

    def cut(self, m: Member) -> None:
        """Take the member's bridge port down: it reaches no peer and no client."""
        self.lab.cut(m.node)
        self._cut.add(m.node.name)

    def restore(self, m: Member) -> None:
        self.lab.restore(m.node)
        self._cut.discard(m.node.name)

    def inject(self, fault: str, hold: float = 3.0, timeout: float = 20.0) -> Member:
        """One fault of FAULTS, held for `hold` seconds, then undone; returns the member it hit.

        leader-kill: SIGKILL the leader, wait for a new one, hold, start it again (it rejoins).
        leader-cut: cut the leader's link, wait for a new leader, hold (the cut-off member keeps
        campaigning, raising its term), restore (without pre-vote its term deposes the new leader).
        leader-pause: SIGSTOP the leader for `hold`, then SIGCONT (it comes back believing it leads).
        follower-kill: SIGKILL a follower, hold, start it again."""
        lead = self.wait_for_leader(timeout)
        if lead is None:
            raise RuntimeError(f"no etcd leader to inject {fault} into\n{self.log_tail()}")
        if fault == "follower-kill":
            victim = next(m for m in self.members if m is not lead)
            self.kill(victim)
            time.sleep(hold)
            self.start_member(victim)
            return victim
        if fault == "leader-pause":
            self.stop(lead)
            time.sleep(hold)
            self.cont(lead)
            return lead
        if fault not in ("leader-kill", "leader-cut"):
            raise ValueError(f"unknown fault {fault!r}; one of {FAULTS}")
        if fault == "leader-kill":
            self.kill(lead)
        else:
            self.cut(lead)
        if self.wait_for_leader(timeout, exclude=[lead]) is None:
            raise RuntimeError(f"{fault}: no new leader within {timeout}s\n{self.log_tail()}")
        time.sleep(hold)
        if fault == "leader-kill":
            self.start_member(lead)
        else:
            self.restore(lead)
        return lead

    def log_tail(self, lines: int = 10) -> str:
        return "\n".join(f"--- {m.name} ---\n{m.log_tail(lines)}" for m in self.members)

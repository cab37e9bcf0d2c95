"""FRR (zebra + bgpd) in a lab namespace, to check conf/frr-vipd.conf for real against the lab's BIRD
router (vipd.lab.bgp). FRR drops to its `frr` user, so its files live in a fresh directory under /tmp
that the user can reach; stop() removes it, Lab.down() stops what is left."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from vipd.lab.bgp import CONF_DIR, HOST_AS, ROUTER_AS
from vipd.lab.topology import Host, Lab

FRR_SNIPPET = CONF_DIR / "frr-vipd.conf"
FRR_DIR = Path("/usr/lib/frr")


def frr_config(source: str, peer: str, vips: str, *, local_as: int = HOST_AS, peer_as: int = ROUTER_AS,
               snippet: Path = FRR_SNIPPET) -> str:
    """conf/frr-vipd.conf with its example values replaced by this host's."""
    text = snippet.read_text()
    for example, value in (("198.18.255.1", source), ("192.0.2.1", peer), ("198.18.0.0/24", vips),
                           ("65001", str(local_as)), ("65000", str(peer_as))):
        text = text.replace(example, value)
    return text


class Frr:
    """zebra + bgpd in `node`'s namespace with `bgpd_config` (see frr_config)."""

    def __init__(self, lab: Lab, node: Host, bgpd_config: str) -> None:
        self.lab = lab
        self.node = node
        self.bgpd_config = bgpd_config
        self.dir: Path | None = None
        self.procs: list[subprocess.Popen[bytes]] = []

    @staticmethod
    def available() -> bool:
        return all(os.access(FRR_DIR / d, os.X_OK) for d in ("zebra", "bgpd"))

    def start(self, timeout: float = 5.0) -> "Frr":
        self.dir = Path(tempfile.mkdtemp(prefix="vtg-frr-"))
        self.dir.chmod(0o755)
        (self.dir / "zebra.conf").write_text(f"hostname {self.node.name}\n")
        (self.dir / "bgpd.conf").write_text(self.bgpd_config)
        subprocess.run(["chown", "-R", "frr:frr", str(self.dir)], check=True, timeout=10)
        common = ["--vty_socket", str(self.dir), "-z", str(self.dir / "zserv.api"),
                  "--log", f"file:{self.dir}/frr.log"]
        for daemon in ("zebra", "bgpd"):
            self.procs.append(self.lab.popen(self.node, [str(FRR_DIR / daemon), "-f", str(self.dir / f"{daemon}.conf"),
                                                         "-i", str(self.dir / f"{daemon}.pid"), *common],
                                             log=self.dir / f"{daemon}.out"))
            deadline = time.monotonic() + timeout
            while not (self.dir / ("zserv.api" if daemon == "zebra" else "bgpd.vty")).exists():
                if self.procs[-1].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"FRR {daemon} on {self.node.name} did not start: {self.log_tail()}")
                time.sleep(0.02)
        return self

    def stop(self) -> None:
        procs, self.procs = self.procs, []
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(3)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(5)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def log_tail(self, lines: int = 20) -> str:
        out: list[str] = []
        for name in ("zebra.out", "bgpd.out", "frr.log"):
            try:
                out += (self.dir / name).read_text(errors="replace").splitlines()[-lines:]  # type: ignore[operator]
            except (OSError, TypeError):
                pass
        return "\n".join(out)

"""VIPs a host serves while its own token fence drops them (bench/scale.py): every VIP in the group
of a successor's grant that is not alive (vipd/succession.py) is dark in its owner's kernel until
the grant is re-armed. Read every `every` seconds in a thread, per host, with
vipd.lab.fence_tokens.dark_groups (a few small dumps while nothing is dark). The thread's own CPU
time is reported (it shares the machine with the hosts it reads)."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

from vipd.lab.fence_tokens import dark_groups, netfilter_socket


class FenceSampler:
    def __init__(self, hosts: list[Any], every: float = 0.02) -> None:
        self._hosts = hosts
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fence-sampler", daemon=True)
        self.samples = 0
        self.dark_samples = 0  # samples in which some host had a dead grant with VIPs in its group
        self.most = 0  # the most VIPs dark at once, on one host
        self.vip_seconds = 0.0  # sum over reads of (VIPs dark) x (time since that host's previous read)
        self.cpu_s = 0.0
        self.started = time.monotonic()
        self.episodes: list[tuple[float, str, int]] = []  # (seconds after start, host, VIPs dark), the first 50

    def start(self) -> None:
        self.started = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        cpu0 = time.thread_time()
        with contextlib.ExitStack() as stack:
            socks = {h.name: stack.enter_context(contextlib.closing(netfilter_socket(h.ns))) for h in self._hosts}
            last = {h.name: time.monotonic() for h in self._hosts}
            while not self._stop.is_set():
                dark_here = False
                for h in self._hosts:
                    try:
                        dark = sum(dark_groups(socks[h.name]).values())
                    except OSError:
                        continue  # the host's namespace went away (the run ends)
                    now = time.monotonic()
                    self.most = max(self.most, dark)
                    if dark and len(self.episodes) < 50:
                        self.episodes.append((round(now - self.started, 3), h.name, dark))
                    self.vip_seconds += dark * (now - last[h.name])  # (as if dark since its last read)
                    last[h.name] = now
                    dark_here = dark_here or dark > 0
                self.samples += 1
                self.dark_samples += dark_here
                self._stop.wait(self._every)
        self.cpu_s = time.thread_time() - cpu0

    def result(self) -> dict[str, Any]:
        return {"samples": self.samples, "dark_samples": self.dark_samples, "most_at_once": self.most,
                "vip_seconds": round(self.vip_seconds, 2), "sampler_cpu_s": round(self.cpu_s, 2),
                "episodes": self.episodes}

"""Operator hooks: a command run on a VIP's transitions, never in the transition's path.

``[hooks]`` in the config (all keys optional)::

    [hooks]
    timeout = 10.0                                   # seconds; then the hook's process group is killed
    owner  = ["/usr/local/sbin/vip-hook", "up"]      # became owner (address added and announced)
    backup = ["/usr/local/sbin/vip-hook", "down"]    # lost ownership (released, or handed over)
    fenced = ["/usr/local/sbin/vip-hook", "fenced"]  # the address was pulled because the lease is unproven
    fault  = ["/usr/local/sbin/vip-hook", "fault"]   # a dataplane error, a conflict, a failed health check

A hook gets the daemon's environment plus ``VIPD_EVENT``, ``VIPD_VIP``, ``VIPD_ADDRESS`` (the bare
IP), ``VIPD_PREFIXLEN``, ``VIPD_INTERFACE``, ``VIPD_REASON``, ``VIPD_NODE`` and ``VIPD_EPOCH``.
stdin is /dev/null; stdout and stderr are collected: ``on_result`` gets the last 2 KiB, the log
line of a failed or killed hook the last 200 characters.

:meth:`HookRunner.fire` only queues the hook and returns at once. Hooks of one VIP run one after
the other in the order fired (an ``owner`` hook is never overtaken by the ``backup`` hook that
follows it); hooks of different VIPs run concurrently. Each runs in a new session (its own process
group); at ``timeout`` the whole group gets SIGKILL, and so does it when the runner is cancelled
(:func:`vipd.procs.run_command`).
"""

from __future__ import annotations

import collections
import ipaddress
import os
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import trio

from vipd import log
from vipd.hooks_config import DEFAULT_TIMEOUT, EVENTS, HooksConfig
from vipd.procs import CommandResult, run_command

# ------------------------------------------------------------------------------- runner

@dataclass(frozen=True)
class HookResult:
    event: str
    vip: str
    result: CommandResult | None  # None when the program could not be started
    error: str = ""


def hook_env(event: str, *, vip: str, address: object, interface: str, reason: str, node: str,
             epoch: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The hook's environment: ``base`` (default: the daemon's) plus the VIPD_* variables."""
    env = dict(os.environ if base is None else base)
    ip, prefixlen = _split_address(address)
    values = {"VIPD_EVENT": event, "VIPD_VIP": vip, "VIPD_ADDRESS": ip, "VIPD_PREFIXLEN": prefixlen,
              "VIPD_INTERFACE": interface, "VIPD_REASON": reason, "VIPD_NODE": node, "VIPD_EPOCH": str(epoch)}
    env.update({k: v.replace("\0", "") for k, v in values.items()})
    return env


def _split_address(address: object) -> tuple[str, str]:
    if isinstance(address, (ipaddress.IPv4Interface, ipaddress.IPv6Interface)):
        return str(address.ip), str(address.network.prefixlen)
    text = str(address)
    try:
        iface = ipaddress.ip_interface(text)
    except ValueError:
        return text, ""
    return str(iface.ip), str(iface.network.prefixlen) if "/" in text else ""


class HookRunner:
    """Runs the configured hooks in its own nursery (start it with ``nursery.start(runner.run)``).

    ``on_result`` (optional) is called with a HookResult after every hook (for metrics, tests).
    """

    def __init__(self, commands: Mapping[str, Sequence[str]], timeout: float = DEFAULT_TIMEOUT, *,
                 node: str = "", on_result: Callable[[HookResult], None] | None = None) -> None:
        unknown = set(commands) - set(EVENTS)
        if unknown:
            raise ValueError(f"unknown hook events: {sorted(unknown)}")
        self.commands = {e: tuple(argv) for e, argv in commands.items() if argv}
        self.timeout = timeout
        self.node = node
        self.on_result = on_result
        self._nursery: trio.Nursery | None = None
        self._queues: dict[str, collections.deque[tuple[str, dict[str, str]]]] = {}
        self._pending = 0
        self._idle = trio.Event()
        self._idle.set()

    @classmethod
    def from_config(cls, cfg: HooksConfig, *, node: str = "",
                    on_result: Callable[[HookResult], None] | None = None) -> "HookRunner":
        return cls(dict(cfg.commands), cfg.timeout, node=node, on_result=on_result)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the hook tasks until cancelled; cancelling kills hooks still running."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def fire(self, event: str, *, vip: str, address: object = "", interface: str = "", reason: str = "",
             epoch: int = 0) -> bool:
        """Queue the hook for ``event``; returns at once. True when a hook was queued; False when
        none is configured for the event, or the runner is not running (logged)."""
        if event not in EVENTS:
            raise ValueError(f"unknown hook event {event!r}")
        argv = self.commands.get(event)
        if argv is None:
            return False
        if self._nursery is None:
            log.warning("hook_dropped", hook=event, vip=vip, reason="hook runner is not running")
            return False
        env = hook_env(event, vip=vip, address=address, interface=interface, reason=reason, node=self.node,
                       epoch=epoch)
        queue = self._queues.get(vip)
        if queue is None:
            queue = self._queues[vip] = collections.deque()
            if self._idle.is_set():
                self._idle = trio.Event()
            self._nursery.start_soon(self._drain, vip, queue)
        queue.append((event, env))
        self._pending += 1
        return True

    def pending(self) -> int:
        """Hooks queued or running."""
        return self._pending

    async def wait_idle(self) -> None:
        """Until no hook is queued or running (e.g. at shutdown, bounded by the caller's scope)."""
        while not self._idle.is_set():
            await self._idle.wait()

    async def _drain(self, vip: str, queue: collections.deque[tuple[str, dict[str, str]]]) -> None:
        try:
            while queue:
                event, env = queue.popleft()
                try:
                    await self._run_one(event, vip, env)
                finally:
                    self._pending -= 1
        finally:
            del self._queues[vip]
            self._pending -= len(queue)  # cancelled with hooks still queued
            if not self._queues:
                self._idle.set()

    async def _run_one(self, event: str, vip: str, env: dict[str, str]) -> None:
        argv = self.commands[event]
        try:
            res = await run_command(argv, timeout=self.timeout, env=env)
        except OSError as e:
            log.error("hook_failed", hook=event, vip=vip, program=argv[0], error=e.strerror or e)
            self._report(HookResult(event, vip, None, e.strerror or str(e)))
            return
        fields = dict(hook=event, vip=vip, program=argv[0], seconds=f"{res.duration:.3f}")
        if res.timed_out:
            log.error("hook_killed", **fields, timeout=self.timeout, output=res.output[-200:] or None)
        elif res.returncode != 0:
            log.warning("hook_failed", **fields, exit=res.returncode, output=res.output[-200:] or None)
        else:
            log.info("hook_done", **fields)
        self._report(HookResult(event, vip, res))

    def _report(self, result: HookResult) -> None:
        if self.on_result is not None:
            self.on_result(result)

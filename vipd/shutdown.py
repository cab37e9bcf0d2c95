"""A planned stop, bounded: it ends within `stop_bound(request_timeout)` seconds, always.

1. Every controller is asked to stop (ShutdownRequested(revoke=True)): an owner removes its
   addresses, then marks its key released (batched: one write per key, no delete); a backup just
   stops. They get SHUTDOWN_GRACE seconds together. (Asking the holders first was tried: the
   revoke, which waits for every unit, came ~1 s after the last mark instead of ~0.1 s, and the
   stop took as long: 3.47 / 3.62 / 3.50 s vs 3.29 / 2.93 / 4.00 s at 3,000 VIPs.)
   Right before, no token fence is armed any more, and one batch removes every owned unit's
   token (vipd/succession_tokens.py `flush_tokens`, its safety argument there): each unit's own
   token disarm, the first step of its removal, only waits for that flush.
2. Once no unit's address can be in the kernel (every unit stopped, or past its removal with only
   its key's mark pending: Controller.address_gone), the host lease is revoked (2 x
   request_timeout at most): etcd deletes every key of ours in one revision and the other hosts
   take over at once, with no address of ours left to overlap with theirs (a watcher saw each
   "released" mark that landed before the deletion: no conflict probe for those).
   If a unit's address may still be in the kernel (a netlink call that hangs, a removal that
   failed: even a stopped unit counts), the lease is NOT revoked and the token fence table stays.
   That is the lease path: the kernel ends the address at its lifetime, before the lease can
   expire in etcd (the fence margin), and only then can another host win. One log line
   (`shutdown_grace_exceeded`) names the units and the state they hung in. systemd's
   ExecStopPost (`vipd cleanup`) then removes the addresses and revokes the recorded lease, which
   shortens it again.
   Side by side with step 1, within SHUTDOWN_GRACE too, and before the revoke: the heartbeats go
   on until no owner key of another host names this host successor (vipd/succession.py
   `unnamed`: the presence said "stopping" at the signal, so their placement dropped this host
   and they rename). The revoke deletes the presence, the other hosts drop their link to this
   one and the grant with it: an owner still naming it would have its VIPs dark until it renamed.
3. Our nftables tables are removed (NFT_GRACE), the hooks of the releases get HOOK_GRACE.

With the default request_timeout (1 s) the bound is 3 + 2 + 1 + 2 = 8 s, inside the unit's
TimeoutStopSec=10; the lab's profile (0.5 s) gives 7 s.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Protocol, Sequence

import trio

from vipd import log
from vipd.errors import DataplaneError, EtcdError

SHUTDOWN_GRACE = 3.0  # s the controllers get to remove addresses and give keys back
NFT_GRACE = 1.0  # s to drop our nftables tables
HOOK_GRACE = 2.0  # s for the "backup" hooks of the releases to finish
LOG_UNITS = 20  # units named in the one shutdown_grace_exceeded line (thousands may hang together)


def stop_bound(request_timeout: float) -> float:
    """The longest a planned stop takes, in seconds."""
    return SHUTDOWN_GRACE + 2 * request_timeout + NFT_GRACE + HOOK_GRACE


class Stoppable(Protocol):
    name: str
    stopped: trio.Event
    state: Any

    @property
    def address_gone(self) -> bool: ...


async def wait_stopped(running: Sequence[Stoppable], grace: float = SHUTDOWN_GRACE) -> list[Stoppable]:
    """Wait up to `grace` for every controller to stop; returns the ones whose addresses may still
    be in the kernel (logged), stopped or not (a fenced unit whose removal failed stops, and its
    address serves until its lifetime ends: revoking then would let another host claim it at
    once). A unit still busy with its key only (its addresses are gone: the
    marks of thousands of keys queue behind each other on a loaded host) does not hold the revoke
    back: the revoke deletes its key too, and no address of ours is left to overlap."""
    with trio.move_on_after(grace):
        for c in running:
            await c.stopped.wait()
    late = [c for c in running if not c.stopped.is_set()]
    hung = [c for c in running if not c.address_gone]  # (a stopped one whose removal failed, too)
    if late and not hung:
        log.info("shutdown_keys_left_to_revoke", grace=grace, units=len(late),
                 reason="addresses removed, keys still being marked: the lease revoke deletes them")
    if hung:
        shown = ",".join(f"{c.name}:{c.state.state.value}/{c.state.sub.value}" for c in hung[:LOG_UNITS])
        log.warning("shutdown_grace_exceeded", grace=grace, units=len(hung),
                    vips=shown + (f",... ({len(hung) - LOG_UNITS} more)" if len(hung) > LOG_UNITS else ""),
                    reason="still letting go: their addresses may be in the kernel, so the lease is not "
                           "revoked; they fail over by the lease path (the address lifetime ends first)")
    return hung


async def within(seconds: float, fn: Callable[[], Awaitable[Any]]) -> None:
    """Await fn() for at most `seconds`."""
    with trio.move_on_after(seconds):
        await fn()


async def revoke(revoke_fn: Callable[[int], Awaitable[Any]], lease_id: int, timeout: float,
                 forget: Callable[[], None]) -> None:
    """Give the lease back at once (every address is gone), bounded."""
    if not lease_id:
        return
    try:
        with trio.move_on_after(timeout):
            await revoke_fn(lease_id)
            log.info("lease_revoked", lease=f"{lease_id:x}")
            forget()
    except EtcdError as e:
        log.warning("lease_revoke_failed", error=e)


async def drop_tables(tables: Sequence[Any]) -> None:
    """Remove our nftables tables (the armed sets were flushed by the releases), bounded."""
    with trio.move_on_after(NFT_GRACE) as scope:
        for table in tables:
            try:
                await table.remove_all()
            except DataplaneError as e:
                log.warning("nft_cleanup_failed", error=e)
    if scope.cancelled_caught:
        log.warning("nft_cleanup_failed", error=f"took longer than {NFT_GRACE:g}s; `vipd cleanup` drops them")

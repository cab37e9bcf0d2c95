"""The host lease: one etcd lease per host (not per VIP), kept alive, with a proven "valid until".

valid_until = the instant the last acknowledged keepalive was *sent* + the TTL etcd granted. etcd can
only expire the lease after it has seen that keepalive, so the lease cannot expire before this instant.
Every deadline in vipd derives from it.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Protocol

import trio

from vipd import log
from vipd.election.presence import Presence, PresenceClient
from vipd.errors import EtcdAuthError, EtcdError, EtcdUnavailable, LeaseLost
from vipd.model import EtcdRestored, Event, LeaseGone, LeaseValid

UNREACHABLE_LOG_EVERY = 5.0  # s between "still cannot reach etcd" warnings while granting


class LeaseClient(PresenceClient, Protocol):
    async def grant(self, ttl: int) -> tuple[int, int]: ...
    async def keepalive(self, lease_id: int) -> int: ...
    async def put(self, key: str, value: str, lease_id: int = 0) -> int: ...


class LeaseMetrics(Protocol):
    def observe_keepalive(self, seconds: float) -> None: ...
    def set_etcd_reachable(self, up: bool) -> None: ...
    def set_lease_valid_until(self, valid_until: float) -> None: ...


class HostLease:
    def __init__(self, client: LeaseClient, *, ttl: int, keepalives_per_ttl: int, presence_key: str,
                 presence: Callable[[], str], publish: Callable[[Event], None], metrics: LeaseMetrics,
                 record_path: str | None = None) -> None:
        self._client = client
        self._ttl = ttl
        self._per_ttl = keepalives_per_ttl
        self._presence_key = presence_key
        self._presence = presence
        # hosts/<node> is created only if absent or ours: a second host with this node name is refused
        self._presence_claim = Presence(client, presence_key, endpoint=getattr(client, "endpoint", None),
                                        state_dir=os.path.dirname(record_path) if record_path else "")
        self._presence_dirty = trio.Event()
        self._publish = publish
        self._metrics = metrics
        self._record_path = record_path
        self.lease_id = 0
        self.granted_ttl = 0
        self.valid_until = 0.0
        self._renew = trio.Event()

    def renew(self) -> None:
        """Send the next keepalive now (a claim found less than a second of lease left)."""
        self._renew.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Grant, keep alive, re-grant when lost; forever. Reports started after the first grant.

        Raises EtcdAuthError (a configuration problem: never retried)."""
        backoff = 0.1
        started = False
        failures, first_failure, next_log = 0, 0.0, 0.0
        while True:
            try:
                await self._grant()
            except EtcdAuthError:
                raise
            except EtcdError as e:
                self._metrics.set_etcd_reachable(False)
                now = trio.current_time()
                failures, first_failure = failures + 1, first_failure if failures else now
                if now >= next_log:  # the first failure, then one line every UNREACHABLE_LOG_EVERY
                    log.warning("lease_grant_failed", error=e, attempts=failures,
                                failing_for=f"{now - first_failure:.1f}", retry_in=f"{backoff:.1f}")
                    next_log = now + UNREACHABLE_LOG_EVERY
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            if failures:
                log.info("lease_grant_restored", attempts=failures,
                         failed_for=f"{trio.current_time() - first_failure:.1f}")
                failures, next_log = 0, 0.0
            backoff = 0.1
            if not started:
                started = True
                task_status.started()
            await self._keep_alive()

    async def _grant(self) -> None:
        sent = trio.current_time()
        lease_id, ttl = await self._client.grant(self._ttl)
        self.lease_id, self.granted_ttl = lease_id, ttl
        self._record(lease_id)
        await self._presence_claim.claim(self._presence(), lease_id)  # DuplicateNode: never valid, never campaigns
        self._metrics.set_etcd_reachable(True)
        log.info("lease_granted", lease=f"{lease_id:x}", ttl=ttl, asked=self._ttl)
        self._valid(sent + ttl)

    def _valid(self, valid_until: float) -> None:
        self.valid_until = valid_until
        self._metrics.set_lease_valid_until(valid_until)
        self._publish(LeaseValid(self.lease_id, valid_until))

    async def _keep_alive(self) -> None:
        """Returns when the lease is gone in etcd. While etcd is unreachable, keeps trying the same
        lease: past its deadline the lease is announced gone (controllers have fenced by then), but
        if etcd comes back with the lease still alive it is used again."""
        period = self.granted_ttl / self._per_ttl
        next_at = trio.current_time() + period
        failing = announced_gone = False
        last_ok = trio.current_time()  # when the last acknowledged keepalive (or the grant) was sent
        while True:
            with trio.move_on_at(next_at):
                await self._renew.wait()
            self._renew = trio.Event()
            sent = trio.current_time()
            next_at = sent + period
            try:
                remaining = await self._client.keepalive(self.lease_id)
            except LeaseLost:
                log.warning("lease_lost", lease=f"{self.lease_id:x}")
                self._gone(announced_gone)
                return
            except (EtcdUnavailable, EtcdError) as e:
                self._metrics.set_etcd_reachable(False)
                if not failing:
                    log.warning("keepalive_failed", lease=f"{self.lease_id:x}", error=e)
                failing = True
                if not announced_gone and trio.current_time() >= self.valid_until:
                    log.warning("lease_deadline_passed", lease=f"{self.lease_id:x}")
                    self._gone(False)
                    announced_gone = True
                next_at = min(next_at, trio.current_time() + min(period, 0.1))
                continue
            self._metrics.observe_keepalive(trio.current_time() - sent)
            self._metrics.set_etcd_reachable(True)
            left = self.valid_until - trio.current_time()  # what the lease had left at this ack
            self._valid(sent + min(self.granted_ttl, max(remaining, 0)))
            if failing:
                # unrenewed: how long etcd could not renew the lease; left: how close it came to expiry
                log.info("etcd_restored", lease=f"{self.lease_id:x}", unrenewed=f"{sent - last_ok:.2f}",
                         left=f"{left:.2f}")
                self._publish(EtcdRestored())
                failing = announced_gone = False
            last_ok = sent

    def presence_changed(self) -> None:
        """The presence value (health, weight) changed: sync_presence puts it again."""
        self._presence_dirty.set()

    async def sync_presence(self) -> None:
        """Keep `hosts/<node>` equal to presence(), on the current lease; retried until it lands."""
        while True:
            await self._presence_dirty.wait()
            self._presence_dirty = trio.Event()
            if not self.lease_id:
                continue  # the next grant puts it
            try:
                await self._presence_claim.update(self._presence(), self.lease_id)
            except EtcdError as e:
                log.warning("presence_update_failed", error=e)
                self._presence_dirty.set()
                await trio.sleep(0.5)

    def _gone(self, already: bool) -> None:
        self._metrics.set_lease_valid_until(0.0)
        if not already:
            self._publish(LeaseGone(self.lease_id))

    def _record(self, lease_id: int) -> None:
        """Write the lease id where `vipd cleanup` (ExecStopPost) finds it to revoke after a crash."""
        if not self._record_path:
            return
        try:
            os.makedirs(os.path.dirname(self._record_path), exist_ok=True)
            tmp = self._record_path + ".tmp"
            with open(tmp, "w") as f:
                f.write(f"{lease_id}\n")
            os.replace(tmp, self._record_path)
        except OSError as e:
            log.warning("lease_record_failed", path=self._record_path, error=e.strerror)


def lease_record_path(cfg: Any) -> str:
    """Where the daemon records its lease id for `vipd cleanup` (a file in state_dir)."""
    return os.path.join(cfg.state_dir, "lease")


def read_recorded_lease(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def forget_recorded_lease(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

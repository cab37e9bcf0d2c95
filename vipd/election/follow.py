"""List a prefix, then watch it, forever: level-triggered (every failure re-lists)."""

from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator, Callable, Protocol, Sequence

import trio

from vipd import log
from vipd.errors import EtcdAuthError, EtcdCompacted, EtcdError, EtcdWatchIdle


LOG_EVERY = 5.0  # s between "still failing" warnings


class FollowClient(Protocol):
    async def get_prefix(self, prefix: str) -> tuple[list[Any], int]: ...
    def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[Any]: ...


async def follow(client: FollowClient, prefix: str, on_snapshot: Callable[[Sequence[Any], int], None],
                 on_event: Callable[[Any], None], *,
                 task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """on_snapshot(kvs, revision) after every listing; on_event(WatchEvent) for each change after it.
    Reports started after the first listing. Only EtcdAuthError escapes."""
    backoff = 0.1
    started = failed = False
    failures, next_log = 0, 0.0  # while failing: a warning at once, then every LOG_EVERY seconds
    while True:
        try:
            kvs, revision = await client.get_prefix(prefix)
            if failed:
                log.info("watch_restored", prefix=prefix, revision=revision, attempts=failures)
                failed, failures, next_log = False, 0, 0.0
            on_snapshot(kvs, revision)
            if not started:
                started = True
                task_status.started()
            backoff = 0.1
            async with contextlib.aclosing(client.watch_prefix(prefix, revision + 1)) as batches:
                async for batch in batches:
                    for ev in batch.events:
                        on_event(ev)
        except EtcdAuthError:
            raise
        except EtcdCompacted:
            log.info("watch_compacted", prefix=prefix)
        except EtcdWatchIdle:
            # etcd without --experimental-watch-progress-notify-interval sends no progress on a quiet
            # stream; a re-list + re-watch is cheap and proves the stream (level-triggered).
            log.debug("watch_refreshed", prefix=prefix)
        except EtcdError as e:
            failures += 1
            if trio.current_time() >= next_log:
                log.warning("watch_failed", prefix=prefix, error=e, attempts=failures)
                next_log = trio.current_time() + LOG_EVERY
            failed = True
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 0.5)  # backups must see changes soon after etcd returns

"""List a prefix, then watch it, forever. A broken or silent watch resumes (on another member) from
the last revision it delivered, so no event is missed and no leader is needed to carry on; only a
compacted revision (or the first start) re-lists."""

from __future__ import annotations

import contextlib
from typing import Any, AsyncGenerator, Callable, Protocol, Sequence

import trio

from vipd import log
from vipd.errors import EtcdAuthError, EtcdCompacted, EtcdError, EtcdWatchIdle


LOG_EVERY = 5.0  # s between "still failing" warnings


class FollowClient(Protocol):
    async def get_prefix(self, prefix: str) -> tuple[Sequence[Any], int]: ...
    def watch_prefix(self, prefix: str, start_revision: int) -> AsyncGenerator[Any, None]: ...


async def follow(client: FollowClient, prefix: str, on_snapshot: Callable[[Sequence[Any], int], None],
                 on_event: Callable[[Any], None], *,
                 task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """on_snapshot(kvs, revision) after every listing; on_event(WatchEvent) for each change after it.
    Reports started after the first listing. Only EtcdAuthError escapes."""
    backoff = 0.1
    started = failed = False
    revision = 0  # everything up to here was delivered (0: list first)
    failures, next_log = 0, 0.0  # while failing: a warning at once, then every LOG_EVERY seconds
    while True:
        try:
            if not revision:
                kvs, revision = await client.get_prefix(prefix)
                on_snapshot(kvs, revision)
                if not started:
                    started = True
                    task_status.started()
            async with contextlib.aclosing(client.watch_prefix(prefix, revision + 1)) as batches:
                async for batch in batches:
                    if failed:
                        log.info("watch_restored", prefix=prefix, revision=revision)
                        failed = False
                    backoff = 0.1
                    for ev in batch.events:
                        on_event(ev)
                    revision = max(revision, batch.revision)
        except EtcdAuthError:
            raise
        except EtcdCompacted:
            log.info("watch_compacted", prefix=prefix)
            revision = 0
        except EtcdWatchIdle:
            # etcd without --experimental-watch-progress-notify-interval sends no progress on a quiet
            # stream (or the member hangs): resume, preferring another member.
            log.debug("watch_refreshed", prefix=prefix)
        except EtcdError as e:
            failures += 1
            if trio.current_time() >= next_log:
                log.warning("watch_failed", prefix=prefix, error=e, attempts=failures)
                next_log = trio.current_time() + LOG_EVERY
            failed = True
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 0.5)  # backups must see changes soon after etcd returns

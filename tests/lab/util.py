"""Helpers shared by the lab tests."""

from __future__ import annotations

import time


def wait_for(pred, timeout: float, what: str, interval: float = 0.02):  # type: ignore[no-untyped-def]
    """pred()'s first truthy value, polled every `interval` s; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)

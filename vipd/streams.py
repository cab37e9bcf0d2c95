"""Reading one bounded request from a trio stream (the control socket and the metrics endpoint)."""

from __future__ import annotations

import trio


async def read_until(stream: trio.abc.ReceiveStream, end: bytes, limit: int) -> bytes:
    """Bytes until `end` has arrived, `limit` bytes were read, or the peer closed (whatever came)."""
    data = b""
    while end not in data and len(data) < limit:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        data += chunk
    return data

"""The local control socket: `vipd release NAME`, `vipd state`, `vipd drain`, `vipd undrain` and
`vipd reload` talk to the running daemon.

One request line in, one JSON line out. Root-only (mode 0600 in the state directory). drain and
reload wait for their outcome (bounded: SLOW_REQUEST); the others answer at once.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any, Protocol

import trio

from vipd import log
from vipd.errors import ConfigError
from vipd.streams import read_until


SLOW_REQUEST = 30.0  # s: drain (hand-over of every VIP) and reload answer within this


class Controllable(Protocol):
    def release(self, name: str, reason: str = ...) -> str: ...
    def status(self) -> dict[str, dict[str, object]]: ...


async def _answer_slow(daemon: Any, line: str) -> dict[str, Any] | None:
    """drain / undrain / reload (None for any other request)."""
    words = line.split()
    if words == ["drain"]:
        return {"ok": True, "result": await daemon.drain.drain()}
    if words == ["undrain"]:
        return {"ok": True, "result": daemon.drain.undrain()}
    if words == ["reload"]:
        try:
            return {"ok": True, "result": await daemon.reloader.reload()}
        except ConfigError as e:
            return {"ok": False, "refused": True, "error": str(e)}
    return None


class NotOwner(Exception):
    """Daemon.release may raise this: the VIP is not owned here, nothing was released."""


def _answer(daemon: Controllable, line: str) -> dict[str, Any]:
    words = line.split()
    if words[:1] == ["release"] and len(words) == 2:
        try:
            result = daemon.release(words[1])
        except KeyError:
            return {"ok": False, "error": f"no VIP named {words[1]!r}"}
        except NotOwner as e:
            return {"ok": False, "not_owner": True, "error": f"{words[1]} is not owned by this host ({e})"}
        if result.startswith("not owner"):  # the daemon's answer when it holds nothing to release
            return {"ok": False, "not_owner": True, "error": f"{words[1]} is not owned by this host "
                                                             f"({result[len('not owner'):].strip(' ()') or '-'})"}
        return {"ok": True, "result": result}
    if words == ["state"]:
        return {"ok": True, "result": daemon.status()}
    return {"ok": False, "error": f"unknown request {line!r}"}


async def serve(daemon: Controllable, path: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    task_status.started()

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            with trio.move_on_after(5):
                data = await read_until(stream, b"\n", 4096)
            line = data.decode(errors="replace").strip()
            with trio.move_on_after(SLOW_REQUEST):
                reply = await _answer_slow(daemon, line) or _answer(daemon, line)
                log.info("control_request", request=line, ok=reply["ok"])
                try:
                    await stream.send_all(json.dumps(reply).encode() + b"\n")
                except trio.BrokenResourceError:
                    pass

    try:
        await trio.serve_listeners(handle, [listener])
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


def request(path: str, line: str, timeout: float = 5.0) -> dict[str, Any]:  # SLOW_REQUEST + 5 for drain/reload
    """Blocking client used by the CLI."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(line.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data or b'{"ok": false, "error": "no answer"}')

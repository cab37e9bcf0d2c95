"""Lab applications for DSR tests and the benchmark (run inside lab namespaces, never in the root one).

    serve PORT NAME        TCP server: per connection, logs {"peer": ip, "local": vip} on stdout, sends
                           NAME + "\\n", then serves the request line: "stream" (paced data until the
                           client closes), "get N" (N bytes, then close), or anything else (close).
    fan IP PORT N          N connections one after the other; prints {"backends": {name: count}}
    stream IP PORT [SPORT] one long download; every 0.1 s prints {"bytes": .., "backend": ..}; on SIGTERM
                           or a broken connection prints {"done": .., "error": .., "max_gap": ..} and exits
    get IP[,IP..] PORT BYTES N  N sequential downloads of BYTES each (from the addresses in turn);
                           prints {"seconds": .., "bytes": ..}
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import threading
import time

CHUNK = 16384


def say(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _family(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def serve(port: int, name: str) -> None:
    srv = socket.socket(socket.AF_INET6)
    srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("::", port))
    srv.listen(512)
    while True:
        conn, peer = srv.accept()
        threading.Thread(target=_handle, args=(conn, peer, name), daemon=True).start()


def _plain(ip: str) -> str:
    return ip[7:] if ip.startswith("::ffff:") else ip


def _handle(conn: socket.socket, peer: tuple[str, int], name: str) -> None:
    say({"peer": _plain(peer[0]), "port": peer[1], "local": _plain(conn.getsockname()[0])})
    try:
        conn.sendall(name.encode() + b"\n")
        req = conn.recv(128).decode().strip()
        if req == "stream":
            data = b"x" * CHUNK
            while True:
                conn.sendall(data)
                time.sleep(0.005)  # ~3 MB/s: a long stream, not a flood
        elif req.startswith("get "):
            left = int(req.split()[1])
            data = b"x" * 65536
            while left > 0:
                left -= conn.send(data[:min(left, len(data))])
    except OSError:
        pass
    finally:
        conn.close()


def _connect(ip: str, port: int, sport: int = 0, timeout: float = 5.0) -> socket.socket:
    s = socket.socket(_family(ip), socket.SOCK_STREAM)
    s.settimeout(timeout)
    if sport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", sport))
    s.connect((ip, port))
    return s


def _name(s: socket.socket) -> str:
    buf = b""
    while not buf.endswith(b"\n"):
        b = s.recv(1)
        if not b:
            raise ConnectionError("closed before the backend named itself")
        buf += b
    return buf.decode().strip()


def fan(ip: str, port: int, n: int) -> None:
    counts: dict[str, int] = {}
    errors = 0
    for _ in range(n):
        try:
            with _connect(ip, port) as s:
                name = _name(s)
                s.sendall(b"bye\n")
            counts[name] = counts.get(name, 0) + 1
        except OSError:
            errors += 1
    say({"backends": counts, "errors": errors})


def stream(ip: str, port: int, sport: int = 0) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    total, error, max_gap = 0, None, 0.0
    s = _connect(ip, port, sport)
    backend = _name(s)
    s.sendall(b"stream\n")
    s.settimeout(0.1)
    last_data = last_report = time.monotonic()
    while not stop.is_set():
        try:
            b = s.recv(65536)
            if not b:
                error = "closed by the peer"
                break
            now = time.monotonic()
            max_gap = max(max_gap, now - last_data)
            last_data = now
            total += len(b)
        except socket.timeout:
            pass
        except OSError as e:
            error = f"{type(e).__name__}: {e}"
            break
        if time.monotonic() - last_report >= 0.1:
            last_report = time.monotonic()
            say({"bytes": total, "backend": backend, "sport": s.getsockname()[1]})
    s.close()
    say({"done": total, "backend": backend, "error": error, "max_gap": round(max_gap, 3)})


def get(ips: str, port: int, size: int, n: int) -> None:
    t0, got = time.monotonic(), 0
    targets = ips.split(",")
    for i in range(n):
        with _connect(targets[i % len(targets)], port, timeout=30) as s:
            _name(s)
            s.sendall(f"get {size}\n".encode())
            while True:
                b = s.recv(1 << 20)
                if not b:
                    break
                got += len(b)
    say({"seconds": time.monotonic() - t0, "bytes": got})


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "serve":
        serve(int(args[0]), args[1])
    elif cmd == "fan":
        fan(args[0], int(args[1]), int(args[2]))
    elif cmd == "stream":
        stream(args[0], int(args[1]), int(args[2]) if len(args) > 2 else 0)
    elif cmd == "get":
        get(args[0], int(args[1]), int(args[2]), int(args[3]))
    else:
        raise SystemExit(f"unknown command {cmd}")

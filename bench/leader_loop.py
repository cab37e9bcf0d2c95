#!/usr/bin/env python3
"""A minimal leader loop over etcd's v2 API, standing in for Patroni in front of vip-manager.

    leader_loop.py --endpoint http://10.213.0.2:2379 --key /service/vtf/leader --name h1 --ttl 3

One process per host. It campaigns for `key` by creating it with this host's name and a TTL
(`PUT value=NAME ttl=TTL prevExist=false`), keeps it while leader by refreshing the TTL every
TTL/3 seconds (`PUT ttl=TTL refresh=true prevExist=true prevValue=NAME`: Patroni's ratio of
loop_wait to ttl, 10 s / 30 s), and while follower watches the key (`GET ?wait=true&waitIndex=N`)
so that it campaigns as soon as the key is deleted or expires. vip-manager on the same host holds
the VIP while the key's value equals its --trigger-value (this NAME).

A leader that cannot refresh steps down once TTL seconds passed since its last successful refresh
(the key may have expired by then). On SIGTERM/SIGINT a leader deletes the key (`DELETE
prevValue=NAME`: a planned handover) and exits 0. Every request has a 1 s timeout (vip-manager's
own per-request timeout); after an error it retries every 0.25 s (vip-manager's retry-after).

Logs one line per event on stdout, in vipd's format (`2026-11-23T18:40:01.123Z info event=leader
key=... name=h1`): start, leader, lost, follower (with the current leader), etcd_error (on the first
failure of a series), etcd_ok (first success after errors), released, stopped. Standard library only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

REQUEST_TIMEOUT = 1.0
RETRY_AFTER = 0.25

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def log(event: str, level: str = "info", **kv: Any) -> None:
    t = time.time()
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"

    def q(v: Any) -> str:
        s = str(v)
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"' if (not s or any(c in s for c in ' "=')) else s

    print(f"{ts} {level} event={event} " + " ".join(f"{k}={q(v)}" for k, v in kv.items()), flush=True)


class Stop(Exception):
    pass


class Etcd2:
    def __init__(self, endpoint: str, key: str) -> None:
        self.url = endpoint.rstrip("/") + "/v2/keys/" + key.lstrip("/")

    def call(self, method: str, params: dict[str, Any], timeout: float = REQUEST_TIMEOUT) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body). etcd's v2 errors (4xx with errorCode) are returned, not raised;
        connection problems and timeouts raise OSError."""
        data = None
        url = self.url
        if method in ("PUT", "POST"):
            data = urllib.parse.urlencode(params).encode()
        elif params:
            url += "?" + urllib.parse.urlencode(params)
        req = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        try:
            try:
                with _opener.open(req, timeout=timeout) as r:
                    return r.status, json.load(r)
            except urllib.error.HTTPError as e:
                body = json.loads(e.read() or b"{}")
                if not isinstance(body, dict) or "errorCode" not in body:
                    raise OSError(f"HTTP {e.code}") from None
                return e.code, body
        except (ValueError, http.client.HTTPException) as e:  # a truncated body / connection: a failed request
            raise OSError(f"{type(e).__name__}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--endpoint", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--ttl", type=int, default=3)
    a = p.parse_args(argv)
    etcd = Etcd2(a.endpoint, a.key)
    refresh_every = a.ttl / 3

    def on_signal(signum: int, frame: Any) -> None:
        raise Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log("start", key=a.key, name=a.name, ttl=a.ttl, refresh_every=f"{refresh_every:g}", endpoint=a.endpoint)

    leader = False
    last_ok = 0.0  # monotonic time of the last successful create/refresh (leader only)
    failing = False
    follower_of: str | None = None

    def error(what: str, e: object) -> None:
        nonlocal failing
        if not failing:
            log("etcd_error", "warning", op=what, error=e)
        failing = True

    def ok() -> None:
        nonlocal failing
        if failing:
            log("etcd_ok")
        failing = False

    try:
        while True:
            if leader:
                t = time.monotonic()
                try:
                    st, body = etcd.call("PUT", {"ttl": a.ttl, "refresh": "true", "prevExist": "true",
                                                 "prevValue": a.name})
                except OSError as e:
                    error("refresh", e)
                    if time.monotonic() - last_ok >= a.ttl:
                        leader = False
                        log("lost", "warning", reason="no refresh for a TTL")
                    time.sleep(RETRY_AFTER)
                    continue
                ok()
                if st in (200, 201):
                    last_ok = t
                    time.sleep(max(0.0, t + refresh_every - time.monotonic()))
                else:  # 100 key not found (expired / deleted), 101 compare failed (someone else's)
                    leader = False
                    log("lost", "warning", code=body.get("errorCode"), message=body.get("message"))
                continue
            # follower: try to create the key; if it exists, watch it until it changes
            t = time.monotonic()
            try:
                st, body = etcd.call("PUT", {"value": a.name, "ttl": a.ttl, "prevExist": "false"})
            except OSError as e:
                error("campaign", e)
                time.sleep(RETRY_AFTER)
                continue
            ok()
            if st in (200, 201):
                leader, last_ok, follower_of = True, t, None
                log("leader", key=a.key, name=a.name)
                time.sleep(max(0.0, t + refresh_every - time.monotonic()))
                continue
            if body.get("errorCode") != 105:  # 105: key already exists
                error("campaign", f"{st} {body}")
                time.sleep(RETRY_AFTER)
                continue
            index = int(body.get("index", 0))
            try:
                st, cur = etcd.call("GET", {})
                holder = cur.get("node", {}).get("value") if st == 200 else None
                if holder != follower_of:
                    follower_of = holder
                    if holder == a.name:  # our own key (e.g. we restarted within its TTL): wait it out
                        log("follower", leader=holder, note="own key from an earlier run")
                    else:
                        log("follower", leader=holder)
                if st == 200:
                    index = max(index, int(cur["node"]["modifiedIndex"]))
                # returns when the key changes (expire / delete / set); a quiet key times out: campaign again
                etcd.call("GET", {"wait": "true", "waitIndex": index + 1}, timeout=a.ttl + 1.0)
            except OSError as e:
                if "timed out" not in str(e):
                    error("watch", e)
                    time.sleep(RETRY_AFTER)
    except Stop as e:
        if leader:
            try:
                st, body = etcd.call("DELETE", {"prevValue": a.name})
                log("released", status=st, code=body.get("errorCode"))
            except OSError as err:
                log("release_failed", "warning", error=err)
        log("stopped", signal=e)
        return 0


if __name__ == "__main__":
    sys.exit(main())

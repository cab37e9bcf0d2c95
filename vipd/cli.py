"""argv -> subcommand. Exit codes: 0 ok, 1 runtime error, 2 invalid configuration or usage."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import trio

from vipd import config, log
from vipd.errors import ConfigError, EtcdAuthError, EtcdError, VipdError


def _first_vipd_error(exc: BaseException) -> VipdError | None:
    """trio raises exception groups; find the typed error inside to report it plainly."""
    if isinstance(exc, VipdError):
        return exc
    for sub in getattr(exc, "exceptions", ()):
        found = _first_vipd_error(sub)
        if found is not None:
            return found
    return None


def _load(args: argparse.Namespace) -> config.Config:
    cfg = config.load(args.config)
    config.check_host(cfg)
    return cfg


def cmd_check(args: argparse.Namespace) -> int:
    cfg = _load(args)
    print(f"{args.config}: ok (node {cfg.node}, {len(cfg.vips)} VIPs, etcd {', '.join(cfg.etcd.endpoints)})")
    if any(v.services for v in cfg.vips):
        from vipd.dsr.bpf import unavailable

        why = unavailable()
        print("DSR: ready" if why is None else f"DSR unavailable here: {why} (every other feature runs)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args)
    log.setup(cfg.log_level)
    from vipd import app

    trio.run(app.run, cfg)
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    from vipd import control

    try:
        reply = control.request(cfg.control_socket, f"release {args.name}")
    except OSError as e:
        print(f"vipd release: cannot reach the daemon at {cfg.control_socket}: {e.strerror or e}", file=sys.stderr)
        return 1
    if not reply.get("ok"):
        print(f"vipd release: {reply.get('error')}", file=sys.stderr)
        return 1
    print(f"{args.name}: {reply['result']}")
    return 0


def cmd_state(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    from vipd import control

    try:
        reply = control.request(cfg.control_socket, "state")
    except OSError as e:
        print(f"vipd state: cannot reach the daemon at {cfg.control_socket}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(json.dumps(reply.get("result"), indent=2, sort_keys=True))
    return 0 if reply.get("ok") else 1


def cmd_status(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    from vipd.status import collect, render

    rows = trio.run(collect, cfg)
    print(json.dumps(rows, indent=2) if args.json else render(rows))
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    log.setup(cfg.log_level)
    from vipd.cleanup import cleanup

    trio.run(cleanup, cfg)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from vipd.lab.demo import main as demo_main

    return demo_main(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vipd", description="Virtual-IP failover daemon bound to etcd leases.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def add(name: str, fn, help: str) -> argparse.ArgumentParser:  # type: ignore[no-untyped-def]
        sp = sub.add_parser(name, help=help)
        sp.add_argument("-c", "--config", default=config.DEFAULT_PATH, help="TOML file (default %(default)s)")
        sp.set_defaults(fn=fn)
        return sp

    add("run", cmd_run, "run the daemon")
    add("check", cmd_check, "validate the configuration without touching the host")
    add("status", cmd_status, "every VIP's owner, epoch and lease time left, read from etcd").add_argument(
        "--json", action="store_true")
    add("release", cmd_release, "hand one VIP over on purpose").add_argument("name")
    add("state", cmd_state, "this host's view of its VIPs (from the running daemon)")
    add("cleanup", cmd_cleanup, "remove vipd's addresses and revoke the recorded lease (ExecStopPost)")
    demo = sub.add_parser("demo", help="a live multi-host failover in network namespaces (root)")
    demo.set_defaults(fn=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:  # noqa: BLE001 - unwrap trio's exception groups into a plain message
        err = _first_vipd_error(exc)
        if err is None:
            raise
        if isinstance(err, ConfigError):
            print(f"vipd: invalid configuration: {err}", file=sys.stderr)
            return 2
        if isinstance(err, EtcdAuthError):
            print(f"vipd: etcd refused our credentials: {err}", file=sys.stderr)
            return 1
        if isinstance(err, EtcdError):
            print(f"vipd: etcd: {err}", file=sys.stderr)
            return 1
        print(f"vipd: {err}", file=sys.stderr)
        return 1

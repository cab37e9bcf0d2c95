"""argv -> subcommand.

Exit codes (README "Exit codes"): 0 ok; 1 runtime error (etcd unreachable, another vipd holds the
state_dir, the metrics port is taken, the daemon cannot be reached); 2 invalid configuration or
usage, nothing changed; 3 `vipd release`: the VIP is not owned by this host, nothing released;
130 interrupted."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from vipd import __version__, config, log
from vipd.errors import ConfigError, EtcdAuthError, EtcdError, VipdError

EXIT_OK, EXIT_RUNTIME, EXIT_CONFIG, EXIT_NOT_OWNER, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _first_vipd_error(exc: BaseException) -> VipdError | None:
    """trio raises exception groups; find the typed error inside to report it plainly."""
    if isinstance(exc, VipdError):
        return exc
    for sub in getattr(exc, "exceptions", ()):
        found = _first_vipd_error(sub)
        if found is not None:
            return found
    return None


def _load(args: argparse.Namespace, *, allow_missing_interfaces: bool = False) -> tuple[config.Config, list[str]]:
    cfg = config.load(args.config)
    return cfg, config.check_host(cfg, allow_missing_interfaces=allow_missing_interfaces)


def cmd_check(args: argparse.Namespace) -> int:
    cfg, warnings = (config.load(args.config), []) if args.no_host else \
        _load(args, allow_missing_interfaces=args.allow_missing_interfaces)
    print(f"{args.config}: ok (node {cfg.node}, {len(cfg.vips)} VIPs, etcd {', '.join(cfg.etcd.endpoints)})")
    for w in warnings:
        print(f"warning: {w}")
    if any(v.services for v in cfg.vips):
        from vipd.dsr.bpf import unavailable

        why = unavailable()
        print("DSR: ready" if why is None else f"DSR unavailable here: {why} (every other feature runs)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from vipd import signals
    from vipd.heap import full_collections_held

    signals.catch_early()  # a stop (or reload) during startup must still stop (reload) cleanly
    # No full collection while the config and the daemon's modules load (pyroute2 with the host
    # check, then trio, httpx, prometheus_client, vipd.app), then all of it frozen: it lives for the
    # whole run. Two full collections walked the half-loaded heap, and later ones the modules again.
    with full_collections_held():
        cfg, warnings = _load(args, allow_missing_interfaces=True)
        from vipd import instance

        # before anything touches the host or etcd: one daemon per state_dir, and a free metrics port
        lock = instance.acquire(cfg.state_dir, "vipd run")
        if cfg.metrics_listen:
            instance.check_port_free(cfg.metrics_listen)
        log.setup(cfg.log_level)
        for w in warnings:
            log.warning("config_warning", warning=w)
        import trio

        from vipd import app

    try:
        trio.run(app.run, cfg, args.config)
    finally:
        os.close(lock)
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
        return EXIT_NOT_OWNER if reply.get("not_owner") else 1
    print(f"{args.name}: {reply['result']}; {comeback(cfg, args.name)}")
    return 0


def comeback(cfg: config.Config, name: str) -> str:
    """Whether preemption brings a released VIP back to this host, and when (from the config and,
    when etcd answers within a second, the placement every host computes)."""
    pl, holdoff = cfg.placement, cfg.timing.release_holdoff
    if not pl.preempt:
        return "preemption is off: it stays with its new owner until that one lets it go"
    import trio

    from vipd.status import collect

    async def preferred_host() -> str | None:
        with trio.move_on_after(1.0):
            rows = (await collect(cfg))["vips"]
            return next((r["preferred"] for r in rows if r["vip"] == cfg.unit_of(name)), None)
        return None

    try:
        preferred = trio.run(preferred_host)
    except (VipdError, KeyError):
        preferred = None
    back = f"in about {max(holdoff, pl.preempt_delay):g} s (preempt_delay {pl.preempt_delay:g} s, " \
           f"release_holdoff {holdoff:g} s)"
    if preferred == cfg.node:
        return f"preemption is on and this host is its preferred host: it comes back here {back}; " \
               "`vipd drain` keeps VIPs away"
    if preferred is not None:
        return f"preemption is on: its preferred host is {preferred}, so it stays away from this host"
    return f"preemption is on: if this host is its preferred host it comes back {back}"


def _slow_request(cfg: config.Config, what: str, line: str) -> dict | None:  # type: ignore[type-arg]
    from vipd import control

    try:
        return control.request(cfg.control_socket, line, timeout=control.SLOW_REQUEST + 5)
    except OSError as e:
        print(f"vipd {what}: cannot reach the daemon at {cfg.control_socket}: {e.strerror or e}", file=sys.stderr)
        return None


def cmd_drain(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    if args.node is not None and args.node != cfg.node:
        print(f"vipd drain: --node {args.node} is not this host ({cfg.node}); run it on {args.node}", file=sys.stderr)
        return EXIT_CONFIG
    reply = _slow_request(cfg, "drain", "drain")
    if reply is None:
        return EXIT_RUNTIME
    if not reply.get("ok"):
        print(f"vipd drain: {reply.get('error')}", file=sys.stderr)
        return EXIT_RUNTIME
    res = reply["result"]
    for vip, to in sorted(res["vips"].items()):
        print(f"{vip}: handed over to {to}" if to else f"{vip}: released; no other host has taken it yet")
    print(f"{cfg.node}: drained ({len(res['vips'])} VIPs handed over); it takes no VIP until `vipd undrain`"
          + (f"; still letting go: {', '.join(res['still_here'])}" if res["still_here"] else ""))
    return EXIT_OK


def cmd_undrain(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    reply = _slow_request(cfg, "undrain", "undrain")
    if reply is None:
        return EXIT_RUNTIME
    was = reply.get("result", {}).get("was_drained")
    print(f"{cfg.node}: eligible again" + ("" if was else " (it was not drained)"))
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)  # an invalid file is refused here already, with the key (exit 2)
    reply = _slow_request(cfg, "reload", "reload")
    if reply is None:
        return EXIT_RUNTIME
    if not reply.get("ok"):
        print(f"vipd reload: refused: {reply.get('error')}", file=sys.stderr)
        return EXIT_CONFIG if reply.get("refused") else EXIT_RUNTIME
    print(f"reloaded: {reply['result']}")
    return EXIT_OK


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
    import trio

    from vipd.status import collect, render

    rows = trio.run(collect, cfg)
    print(json.dumps(rows, indent=2) if args.json else render(rows))
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    from vipd import instance

    instance.acquire(cfg.state_dir, "vipd cleanup")  # never under a running daemon's feet; held until exit
    log.setup(cfg.log_level)
    from vipd.cleanup import cleanup  # addresses first, before trio / pyroute2 / httpx load

    cleanup(cfg)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    cfg, _ = _load(args)
    import trio

    from vipd.doctor.findings import exit_status, render, to_json
    from vipd.doctor.run import doctor

    findings = trio.run(doctor, cfg)
    print(to_json(findings) if args.json else render(findings, verbose=args.verbose))
    return exit_status(findings)


def cmd_demo(args: argparse.Namespace) -> int:
    from vipd.lab.demo import main as demo_main

    return demo_main(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vipd", description="Virtual-IP failover daemon bound to etcd leases.",
        epilog="exit codes: 0 ok; 1 runtime error (etcd unreachable, another vipd holds the state_dir, metrics "
               "port taken, daemon not reachable); 2 invalid configuration or usage (nothing changed); "
               "3 release: the VIP is not owned by this host; 130 interrupted")
    p.add_argument("-V", "--version", action="version", version=f"vipd {__version__}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def add(name: str, fn, help: str) -> argparse.ArgumentParser:  # type: ignore[no-untyped-def]
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("-c", "--config", default=config.DEFAULT_PATH, metavar="FILE",
                        help="the TOML configuration (default %(default)s)")
        sp.set_defaults(fn=fn)
        return sp

    add("run", cmd_run, "run the daemon (what the systemd unit starts); one per state_dir")
    chk = add("check", cmd_check, "validate the configuration against this host without changing anything; "
                            "exit 0, or 2 with the key and the reason")
    chk.add_argument("--no-host", action="store_true",
                     help="check the file only, not this host (interfaces exist, key files readable): for examples "
                          "and CI")
    chk.add_argument("--allow-missing-interfaces", action="store_true",
                     help="a VIP's interface that does not exist now is a warning, not an error (the unit's "
                          "pre-start check: the daemon keeps those VIPs unavailable until the NIC appears)")
    add("status", cmd_status, "every VIP's owner, epoch and lease time left, and every host's health, "
                              "read from etcd").add_argument("--json", action="store_true",
                                                             help="print JSON instead of a table")
    add("release", cmd_release, "hand one VIP (or group) this host owns over to another host; exit 3 "
                                "when this host does not own it").add_argument(
        "name", metavar="NAME", help="the VIP's name (or its group's) as in the configuration")
    add("drain", cmd_drain, "hand every VIP this host owns to other hosts (each successor ready first), then "
                            "keep this host ineligible, across restarts, until `vipd undrain`").add_argument(
        "--node", metavar="N", help="the node to drain: must be this host's node name (a guard for scripts)")
    add("undrain", cmd_undrain, "make a drained host eligible for VIPs again")
    add("reload", cmd_reload, "re-read the config and apply the difference, as SIGHUP does; unchanged VIPs are "
                              "not touched; exit 2 with the key and the reason when refused (nothing changed)")
    add("state", cmd_state, "this host's view of its VIPs, from the running daemon's control socket")
    doc = add("doctor", cmd_doctor, "check this host against the config: findings, fixes; exit 1 if any blocks")
    doc.add_argument("--json", action="store_true", help="print JSON instead of text")
    doc.add_argument("-v", "--verbose", action="store_true", help="details for passing checks too")
    add("cleanup", cmd_cleanup, "remove vipd's addresses and revoke the recorded lease (the unit's "
                                "ExecStopPost); refused while a vipd runs with the same state_dir")
    demo = sub.add_parser("demo", help="a live multi-host failover in network namespaces (root)",
                          description="a live multi-host failover in network namespaces (root)")
    demo.set_defaults(fn=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BaseException as exc:  # noqa: BLE001 - unwrap trio's exception groups into a plain message
        err = _first_vipd_error(exc)
        if err is None:
            raise
        if isinstance(err, ConfigError):
            print(f"vipd: invalid configuration: {err}", file=sys.stderr)
            return EXIT_CONFIG
        if isinstance(err, EtcdAuthError):
            print(f"vipd: etcd refused our credentials: {err}", file=sys.stderr)
            return 1
        if isinstance(err, EtcdError):
            print(f"vipd: etcd: {err}", file=sys.stderr)
            return 1
        print(f"vipd: {err}", file=sys.stderr)
        return 1

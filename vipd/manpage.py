"""vipd(8), vipd.toml(5) and the bash completion, generated from one source: the argparse parser
(vipd.cli.parser) and the key table (vipd.config_keys). `python -m vipd.manpage OUTDIR` writes
OUTDIR/vipd.8, OUTDIR/vipd.toml.5 and OUTDIR/vipd.bash-completion (what the Debian package ships)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vipd import __version__ as VERSION
from vipd.config_keys import SECTIONS, by_section

DATE = "2026-12-04"

DESCRIPTION = """\
vipd floats virtual IPs between Linux hosts. Every host runs one vipd; for each VIP, etcd elects exactly
one owner through a lease. The owner adds the address (on lo for routed VIPs, on a NIC for L2 VIPs) with
a kernel lifetime that ends before its lease can expire, and refreshes it only after each acknowledged
keepalive: a crashed, hung or cut-off owner loses the VIP without running any code, before another host
can win it. L2 VIPs are announced with gratuitous ARP and unsolicited neighbour advertisements."""

SECTIONS_8 = {
    "EXIT STATUS": "0 success; 1 a runtime error (or, for doctor, a blocking finding); 2 an invalid "
                   "configuration or usage (the message names the key); nothing on the host is changed then.",
    "DOCTOR": "vipd doctor checks this host against the configuration and prints each finding with a "
              "severity (ok, info, warning, error) and its fix; error findings block. It tests whether the "
              "segment of each L2 interface answers ARP for addresses nobody holds (proxy ARP, as cloud "
              "VPCs do: gratuitous ARP can never work there); whether another machine answers for a VIP; "
              "capabilities; promote_secondaries, rp_filter and fib_multipath_hash_policy for the "
              "configured modes; etcd reachability, version, the lease TTL granted and the election "
              "timeout, and the failover time each fault costs with them; clocks and timers; BIRD/FRR "
              "export of routed VIPs; nftables. The daemon runs the proxy-ARP test itself before its "
              "first claim on an interface and refuses L2 mode there with the same explanation.",
    "ROUTED VIPS": "A VIP with interface = \"lo\" is held on lo by its owner only (mode = \"anycast\": by "
                   "every fit host); a BGP speaker on the host (BIRD 2 or FRR, see "
                   "/usr/share/doc/vipd/examples/) announces it to the router and withdraws it when vipd "
                   "removes it. Use them where L2 cannot work, e.g. in cloud networks that answer ARP themselves.",
    "FAILOVER TIME": "A planned stop hands a VIP over in milliseconds. Host loss, a hang or a partition "
                     "costs up to the lease TTL etcd granted plus etcd's 0.5 s expiry loop. etcd raises a "
                     "TTL to 1.5 x its --election-timeout; vipd doctor prints the figures for this config.",
    "FILES": "/etc/vipd/vipd.toml (see vipd.toml(5)); /run/vipd (control socket, lease record); "
             "/usr/share/doc/vipd/examples/ (example configs, BIRD/FRR snippets, Prometheus rules, Grafana "
             "dashboard).",
    "SEE ALSO": "vipd.toml(5), etcd(1), bird(8), systemd.service(5)",
}


def esc(text: str) -> str:
    """Escape for roff: backslashes, and a leading dot or quote."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text[:1] in (".", "'") else text


def _subcommands(p: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    out = []
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            out += [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return out


def _options(p: argparse.ArgumentParser) -> list[tuple[str, str]]:
    out = []
    for a in p._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        meta = a.metavar if isinstance(a.metavar, str) else a.dest.upper()
        flag = ", ".join(a.option_strings) + ("" if a.nargs == 0 else f" {meta}") if a.option_strings else meta
        helptext = (a.help or "") % {"default": a.default} if a.help else ""
        out.append((flag, helptext))
    return out


def man8(parser: argparse.ArgumentParser) -> str:
    subs = _subcommands(parser)
    lines = [f'.TH VIPD 8 "{DATE}" "vipd {VERSION}" "System Administration"', ".SH NAME",
             "vipd \\- " + esc(parser.description or ""), ".SH SYNOPSIS",
             ".B vipd", "\\fICOMMAND\\fR [\\fIOPTIONS\\fR]", ".SH DESCRIPTION", esc(DESCRIPTION), ".SH COMMANDS"]
    for name, helptext, sub in subs:
        lines += [".TP", f".B vipd {name}", esc(helptext)]
        for flag, text in _options(sub):
            lines += [".RS", ".TP", f".B {esc(flag)}", esc(text) if text else "", ".RE"]
    for title, text in SECTIONS_8.items():
        lines += [f".SH {title}", esc(text)]
    return "\n".join(lines) + "\n"


def man5() -> str:
    lines = [f'.TH VIPD.TOML 5 "{DATE}" "vipd {VERSION}" "File Formats"', ".SH NAME",
             "vipd.toml \\- configuration of vipd(8)", ".SH DESCRIPTION",
             esc("/etc/vipd/vipd.toml is a TOML file. Unknown keys, bad addresses, duplicate names or addresses "
                 "and missing interfaces are rejected by `vipd check` with the key path and the reason (exit "
                 "status 2), and nothing on the host changes. Defaults are shown in brackets.")]
    for section, keys in by_section().items():
        if not keys:
            continue
        title = "TOP LEVEL" if not section else f"[{section.replace('[]', '')}]" if "[]" not in section \
            else f"[[{section.replace('[]', '')}]]"
        lines += [f".SH {esc(title)}", esc(SECTIONS[section])]
        for k in keys:
            lines += [".TP", f".B {esc(k.key)}" + (f" [{esc(k.default)}]" if k.default != "-" else ""), esc(k.meaning)]
    lines += [".SH EXAMPLE", "See /usr/share/doc/vipd/examples/vipd.toml.", ".SH SEE ALSO", "vipd(8)"]
    return "\n".join(lines) + "\n"


def bash_completion(parser: argparse.ArgumentParser) -> str:
    subs = _subcommands(parser)
    cases = []
    for name, _, sub in subs:
        flags = " ".join(o for a in sub._actions for o in a.option_strings)
        cases.append(f"        {name}) opts=\"{flags}\" ;;")
    return "\n".join([
        "# bash completion for vipd (generated by vipd.manpage)",
        "_vipd() {",
        "    local cur prev cmd opts",
        "    cur=${COMP_WORDS[COMP_CWORD]}; prev=${COMP_WORDS[COMP_CWORD-1]}",
        "    if [ \"$COMP_CWORD\" -eq 1 ]; then",
        f"        COMPREPLY=($(compgen -W \"{' '.join(n for n, _, _ in subs)}\" -- \"$cur\")); return",
        "    fi",
        "    case $prev in -c|--config) COMPREPLY=($(compgen -f -- \"$cur\")); return ;; esac",
        "    cmd=${COMP_WORDS[1]}",
        "    case $cmd in",
        *cases,
        "        *) opts=\"\" ;;",
        "    esac",
        "    COMPREPLY=($(compgen -W \"$opts\" -- \"$cur\"))",
        "}",
        "complete -F _vipd vipd",
    ]) + "\n"


def main(argv: list[str] | None = None) -> int:
    from vipd.cli import parser

    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m vipd.manpage OUTDIR", file=sys.stderr)
        return 2
    out = Path(args[0])
    out.mkdir(parents=True, exist_ok=True)
    p = parser()
    (out / "vipd.8").write_text(man8(p))
    (out / "vipd.toml.5").write_text(man5())
    (out / "vipd.bash-completion").write_text(bash_completion(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())

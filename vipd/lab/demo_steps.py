"""The story of `vipd demo` (vipd.lab.demo), one function per step: planned handover (`vipd release`),
planned stop (SIGTERM), crash (SIGKILL), link cut (and restore), etcd stopped and restarted.

Each step acts on a running Demo, waits for the cluster to settle (Demo.settle) and returns the
printed StepResult (Demo.report); StepFailed when it cannot go on.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

from vipd.lab.demo_report import Seen, StepResult, who

if TYPE_CHECKING:
    from vipd.lab.demo import Demo

WATCH_AFTER_RESTORE = 2.0  # seconds the cut host is watched after it is back


class StepFailed(Exception):
    """A step did not behave; the message says how."""


def release(d: Demo) -> StepResult:
    v = d.vip("api")
    old = d.require_owner(v)
    t0 = d.begin(1, "planned handover", f"`vipd release {v.name}` on {old}")
    r = d.cluster.run_cli(d.cluster.host(old), "release", v.name)
    if r.returncode != 0:
        raise StepFailed(f"`vipd release {v.name}` on {old} failed: {(r.stderr or r.stdout).strip()}")
    seen = d.settle(t0, {v.name: old}, timeout=5)
    new = seen[0].owner_after
    notes = [f"{old} answered `{r.stdout.strip()}`; {new} took {v.name} "
             f"{_after(d, v, t0, new, gained=True)} after the command"]
    return d.report("planned handover", t0, seen, v.name, notes, [])


def sigterm(d: Demo) -> StepResult:
    v, old, host, leaving, t0 = _begin_on_owner(d, 2, "planned stop",
                                               "SIGTERM to vipd on {old} (systemctl stop; it holds {held})")
    log = d.cluster.log_path(host)
    log_offset = log.stat().st_size if log.exists() else 0
    rc = d.cluster.term(host)
    took = time.monotonic() - t0
    seen = d.settle(t0, leaving, timeout=5)
    problems = [] if rc == 0 else [f"vipd on {old} exited with {rc} after SIGTERM"]
    with open(log, "rb") as f:
        f.seek(log_offset)
        revoked = b"event=lease_revoked" in f.read()
    notes = [f"vipd on {old} exited {rc} after {took:.2f} s"
             + (", revoking its lease on the way out" if revoked else " (no lease_revoked in its log)")]
    d.cluster.start(host)
    notes.append(f"vipd on {old} started again: it joins as a backup")
    return d.report("planned stop", t0, seen, v.name, notes, problems)


def crash(d: Demo) -> StepResult:
    v, old, host, leaving, t0 = _begin_on_owner(d, 3, "owner crash",
                                               "SIGKILL to vipd on {old} (no code runs on {old} after this)")
    d.cluster.kill(host)
    seen = d.settle(t0, leaving, timeout=d.cluster.lease_ttl + 5)
    notes, problems = _taken_over(d, v, t0, old, seen, f"the kernel removed {v.name} from {old}",
                                  "after the kill (address lifetime)")
    d.cluster.start(host)
    notes.append(f"vipd on {old} started again (as systemd's Restart=on-failure would)")
    return d.report("owner crash", t0, seen, v.name, notes, problems)


def link_cut(d: Demo) -> StepResult:
    v, old, host, leaving, t0 = _begin_on_owner(d, 4, "link cut",
                                               "{old}'s switch port goes down ({old} loses etcd and the clients)")
    d.lab.cut(host)
    try:
        seen = d.settle(t0, leaving, timeout=d.cluster.lease_ttl + 5)
    finally:
        t_back = time.monotonic()
        d.lab.restore(host)
    notes, problems = _taken_over(d, v, t0, old, seen, f"{old} dropped {v.name} by itself",
                                  "after the cut (its lease could no longer be proven)")
    # A deliberate observation window: nothing should happen, so there is nothing to wait for.
    time.sleep(d.left(WATCH_AFTER_RESTORE))
    retaken = [x.name for x in d.vips if _change_time(d, x, t_back, old, gained=True) is not None]
    if retaken:
        problems.append(f"{old} took {', '.join(retaken)} again after its link came back")
    notes.append(f"{old}'s link restored: {WATCH_AFTER_RESTORE:.0f} s later it holds "
                 f"{', '.join(retaken) or 'nothing'}; " + ", ".join(f"{x.name} on {d.owner(x) or '-'}"
                                                                 for x in d.vips))
    return d.report("link cut", t0, seen, v.name, notes, problems)


def etcd_restart(d: Demo) -> StepResult:
    v = d.vip("api")
    d.require_owner(v)
    ttl = d.cluster.lease_ttl
    t0 = d.begin(5, "etcd stopped and restarted", "SIGTERM to etcd; started again once no host holds a VIP")
    d.etcd.stop()
    problems, notes = [], []
    for x in d.vips:
        if not d.monitor.wait_holders(d.ip(x), [], timeout=d.left(ttl + 1.5)):
            problems.append(f"{x.name} still held by {who(d.monitor.holders_now(d.ip(x)))} "
                            f"{ttl + 1.5:.1f} s after etcd stopped")
    t_gone = time.monotonic() - t0
    notes.append(f"every host dropped its VIPs within {t_gone:.2f} s of etcd stopping (lease_ttl {ttl} s): "
                 "no lease, no VIP")
    t_start = time.monotonic()
    try:
        d.etcd.start(timeout=d.left(10))
    except RuntimeError as e:
        raise StepFailed(f"etcd did not come back: {str(e).splitlines()[0]}") from None
    healthy = time.monotonic() - t_start
    seen = d.settle(t0, {x.name: None for x in d.vips}, timeout=15)
    back = ", ".join(f"{s.name} on {s.owner_after or '-'} after "
                     f"{_after(d, d.vip(s.name), t_start, s.owner_after, gained=True)}" for s in seen)
    notes.append(f"etcd restarted (healthy after {healthy:.2f} s); VIPs back: {back}")
    return d.report("etcd stopped and restarted", t0, seen, v.name, notes, problems)


# (title, step) in the order they run
STORY: tuple[tuple[str, Callable[[Demo], StepResult]], ...] = (
    ("planned handover", release), ("planned stop", sigterm), ("owner crash", crash), ("link cut", link_cut),
    ("etcd stopped and restarted", etcd_restart))


# ---------------------------------------------------------------------------- shared by the steps

def _begin_on_owner(d: Demo, n: int, title: str,
                    action: str) -> tuple[Any, str, Any, dict[str, str | None], float]:
    """Begin step n against the owner of VIP "api": that VIP, its owner's name and host, the VIPs that
    must leave it (for Demo.settle: every one it holds), the step's start. `action` may name the
    owner ({old}) and the VIPs it holds ({held})."""
    v = d.vip("api")
    old = d.require_owner(v)
    host, held = d.cluster.host(old), [x.name for x in d.vips if d.owner(x) == old]
    t0 = d.begin(n, title, action.format(old=old, held=", ".join(held)))
    return v, old, host, {name: old for name in held}, t0


def _taken_over(d: Demo, v: Any, t0: float, old: str, seen: list[Seen], what: str,
                how: str) -> tuple[list[str], list[str]]:
    """The note on how long after t0 `old` lost v (`what` <time> `how`) and the new owner took it,
    and the problem if the new owner added v before `old` removed it."""
    new = seen[0].owner_after
    notes = [f"{what} {_after(d, v, t0, old, gained=False)} {how}; {new} took it "
             f"{_after(d, v, t0, new, gained=True)} after"]
    return notes, _order_problem(d, v, t0, old, new)


def _change_time(d: Demo, v: Any, since: float, host: str, *, gained: bool) -> float | None:
    """Monitor time at which `host` started (gained) or stopped holding v, after `since`."""
    for t, before, after in d.monitor.owner_changes(d.ip(v)):
        if t >= since and (host in after) == gained and (host in before) != gained:
            return t
    return None


def _after(d: Demo, v: Any, t0: float, host: str | None, *, gained: bool) -> str:
    t = _change_time(d, v, t0, host, gained=gained) if host else None
    return "?" if t is None else f"{t - t0:.2f} s"


def _order_problem(d: Demo, v: Any, t0: float, old: str, new: str | None) -> list[str]:
    """The old owner's copy must be gone before the new owner's appears."""
    lost = _change_time(d, v, t0, old, gained=False)
    won = _change_time(d, v, t0, new, gained=True) if new else None
    if lost is not None and won is not None and won < lost:
        return [f"{new} added {v.name} {(lost - won) * 1e3:.0f} ms before {old} removed it"]
    return []

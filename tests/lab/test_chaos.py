"""A one-minute chaos soak (vipd.lab.chaos): random faults of every kind against three hosts and five
VIPs; never two holders of a VIP, recovery after every fault, every VIP owned at the end, nothing left
behind. The long run is `.venv/bin/python bench/chaos.py --duration 600`.
Replay a failure with VIPD_CHAOS_SEED=<seed> (printed); VIPD_CHAOS_SECONDS changes the length."""

from __future__ import annotations

import os
import secrets

from vipd.lab.chaos import Chaos, ChaosConfig

DURATION = float(os.environ.get("VIPD_CHAOS_SECONDS", "60"))
MIN_FAULTS = max(1, int(DURATION / 15))  # a fault cycle takes 3-12 s


def test_chaos_soak(tmp_path):  # type: ignore[no-untyped-def]
    seed = int(os.environ["VIPD_CHAOS_SEED"]) if os.environ.get("VIPD_CHAOS_SEED") else secrets.randbits(32)
    lines: list[str] = []

    def echo(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    res = Chaos(ChaosConfig(prefix="vtq" + secrets.token_hex(2), workdir=tmp_path, duration=DURATION, seed=seed,
                            echo=echo)).run()
    context = (f"\nreplay: VIPD_CHAOS_SEED={seed}; logs in {tmp_path}\n" + "\n".join(lines)
               + "\nfailures:\n" + "\n".join(res["failures"]))
    assert res["dual_ownership_ms"] == 0, context
    assert res["leaks_total"] == 0, f"leaks {res['leaks']}{context}"
    assert res["faults_total"] >= MIN_FAULTS, context
    assert res["final_ok"], f"holders before the clean stop: {res['final_holders']}{context}"
    assert all(f["t_recovered"] is not None for f in res["faults"]), context
    assert all(rc == 0 for rc in res["exit_codes"].values()) and len(res["exit_codes"]) == 3, context
    assert not res["failures"], context

"""Health checks with rise/fall hysteresis: TCP connect, HTTP(S) GET, a command, interface carrier.

* :mod:`vipd.health.spec`: the check specs, :func:`parse_check` for one config table (its format
  is described there) and :func:`check_host` (files readable, program executable, interface present).
* :mod:`vipd.health.probes`: :func:`run_check` runs a spec once, bounded by its timeout.
* :mod:`vipd.health.monitor`: :class:`Hysteresis` and :class:`HealthMonitor`, which runs named
  checks concurrently, each on its own interval, and reports every flip.

A check starts *unknown*, which counts as unhealthy, so a daemon that just started does not
campaign on an unproven service; a check that outlives its timeout counts as failed.
"""

from typing import Any

# Loaded on first use (PEP 562): `vipd.config` needs only `vipd.health.spec`, and paths that must
# start fast (`vipd cleanup`, `vipd check`) must not pay for trio and httpx through this package.
_HOME = {
    "CheckStatus": "monitor", "HealthMonitor": "monitor", "Hysteresis": "monitor", "Runner": "monitor",
    "CheckFailed": "probes", "run_check": "probes", "ssl_context": "probes",
    "TYPES": "spec", "CarrierCheck": "spec", "CheckSpec": "spec", "CommandCheck": "spec", "HttpCheck": "spec",
    "TcpCheck": "spec", "check_host": "spec", "check_name": "spec", "parse_check": "spec",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'vipd.health' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"vipd.health.{_HOME[name]}"), name)
    globals()[name] = value
    return value


__all__ = [
    "TYPES", "CarrierCheck", "CheckFailed", "CheckSpec", "CheckStatus", "CommandCheck", "HealthMonitor", "HttpCheck",
    "Hysteresis", "Runner", "TcpCheck", "check_host", "check_name", "parse_check", "run_check", "ssl_context",
]

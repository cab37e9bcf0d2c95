"""Health checks with rise/fall hysteresis: TCP connect, HTTP(S) GET, a command, interface carrier.

* :mod:`vipd.health.spec`: the check specs, :func:`parse_check` for one config table (its format
  is described there) and :func:`check_host` (files readable, program executable, interface present).
* :mod:`vipd.health.probes`: :func:`run_check` runs a spec once, bounded by its timeout.
* :mod:`vipd.health.monitor`: :class:`Hysteresis` and :class:`HealthMonitor`, which runs named
  checks concurrently, each on its own interval, and reports every flip.

A check starts *unknown*, which counts as unhealthy, so a daemon that just started does not
campaign on an unproven service; a check that outlives its timeout counts as failed.
"""

from vipd.health.monitor import CheckStatus, HealthMonitor, Hysteresis, Runner
from vipd.health.probes import CheckFailed, run_check, ssl_context
from vipd.health.spec import (TYPES, CarrierCheck, CheckSpec, CommandCheck, HttpCheck, TcpCheck, check_host,
                              check_name, parse_check)

__all__ = [
    "TYPES", "CarrierCheck", "CheckFailed", "CheckSpec", "CheckStatus", "CommandCheck", "HealthMonitor", "HttpCheck",
    "Hysteresis", "Runner", "TcpCheck", "check_host", "check_name", "parse_check", "run_check", "ssl_context",
]

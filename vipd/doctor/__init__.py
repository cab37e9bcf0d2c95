"""`vipd doctor`: checks this host against the config; findings with a severity and a fix.

findings.py (types, rendering), timing.py (failover cost per fault), checks_*.py (one area each),
run.py (runs them all). The daemon calls :func:`vipd.doctor.checks_l2.l2_blockers` before its first
claim on each interface.
"""

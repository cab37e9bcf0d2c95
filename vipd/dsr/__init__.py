"""Direct server return: a tc eBPF director with a Maglev table (see README, "Direct server return")."""

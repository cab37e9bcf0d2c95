"""Host-to-host heartbeats: failure detection and successor leases for fast takeover."""

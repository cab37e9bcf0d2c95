"""etcd fixtures (filled in by the etcd work)."""

"""vipd: a virtual-IP failover daemon bound to etcd leases."""

__version__ = "0.1.0"

"""The exception tree. Errors are typed and become state-machine events; nothing returns bool."""

from __future__ import annotations


class VipdError(Exception):
    """Base of every error vipd raises on purpose."""


class ConfigError(VipdError):
    """An invalid configuration: names the key path and why."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


class EtcdError(VipdError):
    """Base for etcd failures."""


class EtcdUnavailable(EtcdError):
    """No endpoint answered within its deadline (network, TLS handshake, server down)."""


class EtcdWatchIdle(EtcdUnavailable):
    """A watch stream brought no event and no progress notification in time: it may be dead."""


class EtcdAuthError(EtcdError):
    """etcd refused our credentials (wrong password, unknown user, bad client certificate)."""


class EtcdRequestError(EtcdError):
    """etcd answered, but with an error (grpc code and message kept)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message if code is None else f"{message} (code {code})")
        self.code = code


class EtcdCompacted(EtcdError):
    """A watch asked for a revision that etcd has compacted away; re-list and watch again."""


class CampaignWithdrawn(VipdError):
    """A campaign not sent: by the time its transaction went out the unit no longer campaigned
    (a better-ranked host joined, the key was taken, the lease or health changed)."""


class LeaseLost(EtcdError):
    """The host lease is gone in etcd (expired or revoked)."""


class DataplaneError(VipdError):
    """A kernel operation failed (netlink, AF_PACKET)."""


class AddressError(DataplaneError):
    """Adding, refreshing or removing a VIP address failed."""


class AnnounceError(DataplaneError):
    """Sending gratuitous ARP / unsolicited NA failed."""


class NftError(DataplaneError):
    """Programming vipd's nftables table failed, or an egress rule cannot be expressed."""


class RouteError(DataplaneError):
    """Installing or removing a source route failed."""


class FenceError(DataplaneError):
    """Setting up or arming the kernel fence (nftables tokens) failed, or it was asked for
    something it cannot do (a VIP it does not cover or manage)."""


def find_in_group(exc: BaseException, cls: type[VipdError]) -> VipdError | None:
    """The first `cls` error in `exc` or, for an exception group (trio's nurseries raise them), inside it."""
    if isinstance(exc, cls):
        return exc
    for sub in getattr(exc, "exceptions", ()):
        found = find_in_group(sub, cls)
        if found is not None:
            return found
    return None

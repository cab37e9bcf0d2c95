"""`vipd cleanup` (systemd ExecStopPost): after the daemon stopped or crashed, remove every address
vipd tagged on this host, then revoke the lease it recorded. Order matters: address first, so a
standby that wins after the revoke never overlaps with us.

This is the crash path, so it starts fast: the addresses go first, through a plain rtnetlink
socket built and decoded with struct (vipd.dataplane.addrdump), before trio, pyroute2 or httpx is
imported. Only then are vipd's nftables table and DSR leftovers (its tc filter on any interface,
the backend role's lo addresses) dropped, and the lease revoked.
"""

from __future__ import annotations

import os
import socket

from vipd import log
from vipd.config import Config
from vipd.errors import DataplaneError

VIPD_PROTO = 0x56  # vipd.dataplane.address.VIPD_PROTO (not imported: that module loads pyroute2)


def lease_record_path(cfg: Config) -> str:
    """Where the daemon records its lease id (vipd.app.lease_record_path: the same file)."""
    return os.path.join(cfg.state_dir, "lease")


def remove_addresses(cfg: Config) -> int:
    """Delete every address carrying vipd's tag in this netns but the fixed BGP source; returns how
    many. DataplaneError when the kernel cannot be read or refuses a deletion."""
    from vipd.dataplane import addrdump

    removed = 0
    try:
        with addrdump.open_socket() as sock:
            doomed = []
            for a in addrdump.dump(sock, 1):
                if a.proto != VIPD_PROTO:
                    continue
                try:
                    ifname = socket.if_indextoname(a.index)
                except OSError:
                    ifname = f"if{a.index}"
                if cfg.bgp.source is not None and ifname == "lo" and a.address.ip == cfg.bgp.source:
                    continue  # the host's fixed BGP source stays: BGP sessions survive a restart
                doomed.append((ifname, a))
            codes = addrdump.delete_many(sock, 100, [a for _, a in doomed])  # many per send: thousands in ms
            failed = None
            for (ifname, a), code in zip(doomed, codes):
                if code:
                    failed = failed or OSError(code, f"{os.strerror(code)} ({a.address} on {ifname})")
                    continue
                removed += 1
                log.info("cleanup_address_removed", interface=ifname, address=a.address)
            if failed is not None:
                raise failed
    except OSError as e:
        raise DataplaneError(f"removing vipd's addresses: {e.strerror or e}") from None
    return removed


async def finish(cfg: Config) -> None:
    """After the addresses: drop vipd's nftables table and DSR filters/addresses, then revoke the lease."""
    import trio

    from vipd.dataplane.netlink import Netlink
    from vipd.dataplane.nft import NftManager
    from vipd.election.etcd import EtcdClient
    from vipd.election.lease import forget_recorded_lease, read_recorded_lease
    from vipd.errors import EtcdError

    from vipd.dataplane.fence_nft import NftFence
    from vipd.wiring_dsr import cleanup_all as dsr_cleanup

    async with Netlink() as nl, NftManager(nl) as nft, NftFence(nl) as fence:  # their sets expire anyway;
        await nft.remove_all()                                                # drop the tables now, whatever
        await fence.remove_all()                                              # the config says today
        links = await nl.call(lambda ipr: [m.get_attr("IFLA_IFNAME") for m in ipr.get_links()])
        await dsr_cleanup(nl, [n for n in links if n and n != "lo"])  # vipd's filter only, wherever it is
    path = lease_record_path(cfg)
    lease = read_recorded_lease(path)
    if lease is None:
        return
    try:
        with trio.move_on_after(3 * cfg.etcd.request_timeout * len(cfg.etcd.endpoints)):
            async with EtcdClient.from_config(cfg.etcd) as client:
                await client.revoke(lease)
            log.info("cleanup_lease_revoked", lease=f"{lease:x}")
    except EtcdError as e:
        log.warning("cleanup_revoke_failed", lease=f"{lease:x}", error=e)
    forget_recorded_lease(path)


def cleanup(cfg: Config) -> None:
    try:
        remove_addresses(cfg)
    except DataplaneError as e:
        # never revoke while an address may remain: the kernel lifetime will end it, then the lease expires
        log.error("cleanup_failed", error=e)
        raise
    import trio

    try:
        trio.run(finish, cfg)
    except DataplaneError as e:
        log.error("cleanup_failed", error=e)
        raise

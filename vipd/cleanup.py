"""`vipd cleanup` (systemd ExecStopPost): after the daemon stopped or crashed, remove every address
vipd tagged on this host, then revoke the lease it recorded. Order matters: address first, so a
standby that wins after the revoke never overlaps with us."""

from __future__ import annotations

import trio

from vipd import log
from vipd.config import Config
from vipd.dataplane.address import AddressManager
from vipd.dataplane.netlink import Netlink
from vipd.dataplane.nft import NftManager
from vipd.election.etcd import EtcdClient
from vipd.election.lease import forget_recorded_lease, lease_record_path, read_recorded_lease
from vipd.errors import DataplaneError, EtcdError


async def cleanup(cfg: Config) -> None:
    try:
        async with Netlink() as nl:
            addresses = AddressManager(nl)
            for t in await addresses.tagged():
                if cfg.bgp.source is not None and t.interface == "lo" and t.address.ip == cfg.bgp.source:
                    continue  # the host's fixed BGP source stays: BGP sessions survive a restart
                await addresses.remove(t)
                log.info("cleanup_address_removed", interface=t.interface, address=t.address)
            async with NftManager(nl) as nft:  # its sets expire anyway; drop the table now, whatever the
                await nft.remove_all()            # config says today (an earlier one may have made it)
    except DataplaneError as e:
        # never revoke while an address may remain: the kernel lifetime will end it, then the lease expires
        log.error("cleanup_failed", error=e)
        raise
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

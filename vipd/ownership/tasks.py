"""The controller's child tasks (a mixin of vipd.ownership.controller.Controller): announcements,
and the etcd actions (campaign, takeover, key release, the preempt token), each of which posts
its outcome to the unit as the next event, so a fence never waits on etcd."""

from __future__ import annotations

from typing import Sequence

import trio

from vipd import log
from vipd.errors import CampaignWithdrawn, DataplaneError, EtcdError
from vipd.model import (CampaignFailed, CampaignLost, CampaignWon, Event, KeyReleased, OwnerRecord, PreemptGranted,
                        ReleaseFailed, VipSpec)
from vipd.ownership.ports import AnnouncePort, GatePort, KeysPort, MetricsPort, TakeoverPort
from vipd.ownership.state import Params, Sub, VipState, why_not_campaign


class ChildTasks:
    name: str
    vips: Sequence[VipSpec]
    state: VipState
    params: Params
    _announcer: AnnouncePort
    _metrics: MetricsPort
    _gate: GatePort | None
    _keys: KeysPort
    _takeover: TakeoverPort | None

    def post(self, ev: Event) -> None:
        raise NotImplementedError

    async def _announce_all(self, scope: trio.CancelScope) -> None:
        with scope:
            async with trio.open_nursery() as nursery:
                for vip in self.vips:
                    nursery.start_soon(self._announce, vip)

    async def _announce(self, vip: VipSpec) -> None:
        try:
            sent = await self._announcer.announce(vip)
        except DataplaneError as e:
            self._metrics.count_dataplane_error(self.name, "announce")
            log.warning("announce_failed", vip=self.name, address=vip.address, error=e)
            return
        if sent:
            self._metrics.count_announcements(self.name, sent)
            log.info("announced", vip=self.name, address=vip.address, frames=sent)

    async def _preempt_token(self, target: str) -> None:
        if self._gate is not None:
            await self._gate.acquire()
            log.info("handover_to_preferred", vip=self.name, target=target)
        self.post(PreemptGranted())

    async def _campaign(self, lease: int) -> None:
        try:
            won, record = await self._keys.campaign(self.name, lease, self._still_campaigning)
        except CampaignWithdrawn:  # not sent: back to waiting, the key as last seen
            self.post(CampaignLost(self.state.owner or OwnerRecord(None)))
            return
        except EtcdError as e:
            self.post(CampaignFailed(str(e)))
            return
        self.post(CampaignWon(record) if won else CampaignLost(record))

    def _still_campaigning(self) -> bool:
        """Right before the campaign's transaction goes out: does the unit, as it is now, still
        campaign? (A host that joined since may rank ahead of us; the key may have been taken.)"""
        s = self.state
        return s.sub is Sub.CAMPAIGNING and not why_not_campaign(self.params, s, trio.current_time())

    async def _take_released(self, record: OwnerRecord, lease: int) -> None:
        """Take over a key another host handed back (state.released_by_other), without waiting for
        its delete or its lease's revoke. Safety: that host wrote the mark with a compare on its own
        key, after its addresses were removed and its fences disarmed; our put compares the mark's
        mod revision, so when it lands that host serves nothing and cannot serve again without
        winning the key anew: the same as a campaign after the delete. Its own delete or revoke,
        later, compares its mark and leaves our key alone."""
        try:
            won, now = await self._keys.take_over(self.name, record, lease)
        except EtcdError as e:
            self.post(CampaignFailed(str(e)))
            return
        self.post(CampaignWon(now, handed_back=True) if won else CampaignLost(now, handed_back=True))

    async def _take_over(self, record: OwnerRecord, lease: int) -> None:
        if record.released:
            await self._take_released(record, lease)
            return
        if self._takeover is None:
            self.post(CampaignLost(record))
            return
        try:
            won, now = await self._takeover.take_over(self.name, record, lease)
        except EtcdError as e:
            self.post(CampaignFailed(str(e)))
            return
        if won:
            log.info("took_over", vip=self.name, previous=record.node, epoch=now.epoch)
        else:  # the owner spoke again, or the key moved on: why a takeover waits its retry
            log.info("takeover_lost", vip=self.name, owner=record.node,
                     why="owner heard again" if now == record else f"key now {now.node} rev {now.revision}")
        self.post(CampaignWon(now) if won else CampaignLost(now))

    async def _delete_key(self, epoch: int, lease: int, leave: bool) -> None:
        try:
            await self._keys.release(self.name, epoch, lease, leave)
        except EtcdError as e:
            log.warning("owner_key_delete_failed", vip=self.name, epoch=epoch, error=e)
            self.post(ReleaseFailed(str(e)))
            return
        self.post(KeyReleased())

"""Keepalives held back until something is ready: the daemon's units learn of the lease only once
every gate on its way is open (vipd/wiring_l2.py: the L2 check; vipd/app.py: the controllers are
running). A unit without a lease never campaigns, so nothing is claimed before that.

`gate(publish)` is `publish`, except that a LeaseValid is held while the gate is closed (only the
newest: keepalives are monotonic); any other lease event passes at once and drops the one held (it
is older news). `open()` publishes the one held, and from then on everything passes.
"""

from __future__ import annotations

from typing import Callable

import trio

from vipd.model import Event, LeaseValid


class KeepaliveGate:
    def __init__(self) -> None:
        self.opened = trio.Event()
        self._held: tuple[Callable[[Event], None], LeaseValid] | None = None

    def gate(self, publish: Callable[[Event], None]) -> Callable[[Event], None]:
        def gated(ev: Event) -> None:
            if isinstance(ev, LeaseValid) and not self.opened.is_set():
                self._held = (publish, ev)
                return
            self._held = None
            publish(ev)
        return gated

    def open(self) -> None:
        self.opened.set()
        held, self._held = self._held, None
        if held is not None:
            held[0](held[1])

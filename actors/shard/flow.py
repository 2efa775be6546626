"""How many of its inbox's messages a shard runner holds in memory, and whether it may read
more: ``max_inflight`` bounds them, minus the turns parked waiting for an ask's reply."""

from __future__ import annotations

import asyncio


class Flow:
    def __init__(self, max_inflight: int) -> None:
        self.max_inflight = max_inflight
        self.inflight = 0
        """Inbox messages read and not yet finished."""
        self.parked = 0
        """Of those, turns waiting for the reply to an ask (see ``park``)."""
        self.room = asyncio.Event()
        """Set while reading may go on."""
        self.room.set()
        self.idle = asyncio.Event()
        """Set while no inbox message is in memory."""
        self.idle.set()

    def took(self) -> None:
        self.inflight += 1
        self.idle.clear()
        self._update()

    def finished(self) -> None:
        self.inflight -= 1
        self._update()
        if self.inflight == 0:
            self.idle.set()

    def park(self, parked: bool) -> None:
        """A turn starts (or stops) waiting for the reply to an ask: meanwhile it does not
        count toward ``max_inflight``, so that a shard full of such turns still reads the
        messages they wait for (asks to actors of the same shard)."""
        self.parked += 1 if parked else -1
        self._update()

    def _update(self) -> None:
        if self.inflight - self.parked < self.max_inflight:
            self.room.set()
        else:
            self.room.clear()

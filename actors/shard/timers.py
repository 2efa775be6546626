"""Durable time on one shard: the timer index (sleeps, wait timeouts, and, for a new owner,
the open turns and deferred messages a previous owner left at 0) and the schedules of the
shard's actors, whose due slots are fired into the inbox."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from .. import telemetry
from ..codec import encode_envelope
from ..journal import FOREVER_MS
from ..routing import shard_of, tick_envelope
from ..schedules import Schedule, slot_datetime
from .state import spread

if TYPE_CHECKING:
    from .runner import ShardRunner

TIMER_BATCH = 500
TIMER_POLL_MAX = 60.0
"""Seconds between two looks at the timer index while it holds a timer due later (so a timer
fires on time by Redis's clock even if Redis's clock and this process's drift apart). With no
timer in the index there is nothing to look for: only this runner's turns set timers, and
each tells the loop (``timer_set``)."""


class Timers:
    def __init__(self, runner: ShardRunner) -> None:
        self.runner = runner
        self.wakeup = asyncio.Event()
        """Set to look at the timer index now (a turn set a timer due sooner, or draining)."""
        self.waking: set[asyncio.Task[None]] = set()
        """Actor tasks started by timers and not yet done (bounded like reading)."""
        self.task_room = asyncio.Event()
        self._next_timer_ms = 0
        self.polled = False
        """The timer index was looked at once (a new owner's first look has been taken)."""

    async def timer_loop(self) -> None:
        """Wake actors whose timers are due. First, every actor left at 0 by a previous
        owner (open turns it was running or had woken, deferred messages), in batches."""
        r = self.runner
        async for actor_ids in r.store.timers_at_zero(r.shard, TIMER_BATCH):
            if r.stopping.is_set():
                return  # draining: the next owner finds them at 0
            await self._wake(actor_ids, recovering=True)
        while not r.stopping.is_set():
            # Until the look below has returned, any timer a turn sets wakes the next one: the
            # look may have run before that turn's write.
            self._next_timer_ms = FOREVER_MS
            self.wakeup.clear()
            if r.stopping.is_set():
                return  # draining may have set the wake-up just before it was cleared
            sent = time.monotonic()
            now, later, due = await r.store.due_timers(r.shard, r.lease.value, TIMER_BATCH)
            r.clock.observe(now, sent, time.monotonic())
            self.polled = True
            if due:
                await self._wake(due, recovering=False)
            if len(due) == TIMER_BATCH:
                continue
            if later is None or later >= FOREVER_MS:  # none due until a turn of ours sets one
                pause = None
            else:
                pause = min(spread(TIMER_POLL_MAX), max(0.0, (later - now) / 1000))
                self._next_timer_ms = now + int(pause * 1000)
            try:
                await asyncio.wait_for(self.wakeup.wait(), timeout=pause)
            except TimeoutError:
                pass

    def timer_set(self, due_ms: int) -> None:
        """A turn of ours set a timer (its write has returned); look again sooner if it is due
        before the next look."""
        if due_ms < self._next_timer_ms:
            self.wakeup.set()

    async def _wake(self, actor_ids: list[str], recovering: bool) -> None:
        """Resume the open turns (or deferred messages) of ``actor_ids``: ones a previous
        runner left at 0 (``recovering``: it may have been running them), or timers due."""
        r = self.runner
        # Bounded like reading: a takeover or a burst of timers must not start every turn at
        # once. Only turns woken here count: ones waiting for a limiter must not stop timers.
        while len(self.waking) >= r.settings.max_inflight:
            self.task_room.clear()
            await self.task_room.wait()
        await r.work.activate({aid: aid.partition("/")[0] for aid in actor_ids})
        telemetry.record("timers_fired", len(actor_ids))
        for aid in actor_ids:
            act = r.activations[aid]
            act.recovering = recovering
            if act.open is not None:
                act.woken = True
            else:
                act.backlog = True  # deferred messages left, or a stale timer to settle
            self.waking.add(r.work.start(act))

    async def schedule_loop(self) -> None:
        """Fire the due slots of the schedules of this shard's actors into the inbox."""
        r = self.runner
        mine = [
            (f"{cls.type_name}/{key}#{spec.name}", cls.type_name, key, spec)
            for cls in r.services.app.actor_types
            for spec, _ in cls.schedules.values()
            for key in spec.keys
            if shard_of(f"{cls.type_name}/{key}", r.services.shards) == r.shard
        ]
        if not mine:
            return
        marks = await r.store.schedule_marks(r.shard, [m[0] for m in mine], r.clock.upper())
        last = dict(zip([m[0] for m in mine], marks, strict=True))
        while not r.stopping.is_set():
            for field, actor_type, key, spec in mine:
                fire, newest = spec.due(last[field], r.clock.upper())
                if newest > last[field]:
                    last[field] = await self._fire(field, actor_type, key, spec, fire, newest)
            wake = min(spec.next_after(last[field]) for field, _, _, spec in mine)
            pause = min(TIMER_POLL_MAX, max(0.0, (wake - r.clock.lower()) / 1000))
            try:
                await asyncio.wait_for(r.stopping.wait(), timeout=pause)
            except TimeoutError:
                pass

    async def _fire(
        self, field: str, actor_type: str, key: str, spec: Schedule, slots: list[int], newest: int
    ) -> int:
        """Fire ``slots`` and record ``newest`` as done; returns the newest slot Redis records."""
        r = self.runner
        limit = r.settings.messages.max_message_bytes
        envelopes = [tick_envelope(actor_type, key, spec.name, slot_datetime(slot)) for slot in slots]
        ticks = [(slot, encode_envelope(env, limit)) for slot, env in zip(slots, envelopes, strict=True)]
        sent = time.monotonic()
        now, mark = await r.store.fire_schedule(r.shard, r.lease.value, field, newest, ticks)
        r.clock.observe(now, sent, time.monotonic())
        return mark

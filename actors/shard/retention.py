"""What a shard keeps, and for how long: with the mailbox's chores (every ``trim_interval``)
the runner deletes the states of idle actors of types with ``retention`` and trims the dead
letters past ``dlq_max_age``.

An actor of such a type is marked in its type's idle set by every write that ends a piece
of its work (``c`` or ``d``: effect ``I`` of ``commit.lua``). The sweep reads the marks at
least the retention old, leaves out the actors this runner has work of in memory (a task,
queued messages, an activation being loaded), evicts the others' activations, and has
``expire_idle.lua`` decide under the lease. While that script runs, an activation of one of
them waits for it (``deleting``), so that no turn runs on a snapshot the script deletes.

Only this shard's owner marks actors (its commits) and writes dead letters (its commits), so
the runner knows when each chore is next due without looking: a type's sweep when its oldest
mark has been idle the retention (read after each sweep), the dead-letter trim when the
oldest dead letter reaches ``dlq_max_age`` (read with each trim); a commit that marks an
actor or writes a dead letter where none was makes it due from then. An idle shard's chores
then make no call."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..journal import FOREVER_MS

if TYPE_CHECKING:
    from .runner import ShardRunner

SWEEP_BATCH = 500
"""Actors of a type looked at per script call."""
SWEEP_CALLS = 10
"""Script calls per type per chore at most (5,000 actors), so that a backlog of idle actors
does not hold up the reading the chores interrupt; the rest go at the next chores."""


class Retention:
    def __init__(self, runner: ShardRunner) -> None:
        self.runner = runner
        kept = [cls for cls in runner.services.app.actor_types if cls.retention is not None]
        self._types = {cls.type_name: int((cls.retention or 0) * 1000) for cls in kept}
        self._deleting: set[str] = set()
        self._deleted: asyncio.Future[None] | None = None
        max_age = runner.settings.dlq_max_age
        self._max_age_ms = int(max_age * 1000) if max_age else 0
        self._sweep_due = dict.fromkeys(self._types, 0)
        """Per type, when (ms, Redis clock) its sweep is next due: at start, at once."""
        self._trim_due = 0 if self._max_age_ms else FOREVER_MS
        """When (ms, Redis clock) the dead-letter trim is next due."""

    def due(self) -> float:
        """When (monotonic) the next chore is due (``inf``: none will be until a commit says)."""
        soonest = min([*self._sweep_due.values(), self._trim_due])
        if soonest >= FOREVER_MS:
            return math.inf
        # A millisecond later than Redis's clock says: ``lower()`` is rounded down.
        return time.monotonic() + max(0, soonest + 1 - self.runner.clock.lower()) / 1000

    def marked(self, actor_type: str) -> None:
        """A commit marked an actor of ``actor_type`` idle from now: sweep once it may be due."""
        retention_ms = self._types.get(actor_type)
        if retention_ms is not None:
            due = self.runner.clock.lower() + retention_ms  # the mark is Redis's TIME, no sooner
            self._sweep_due[actor_type] = min(self._sweep_due[actor_type], due)

    def dead_lettered(self) -> None:
        """A commit wrote a dead letter: trim once it may be old enough."""
        if self._max_age_ms:
            self._trim_due = min(self._trim_due, self.runner.clock.lower() + self._max_age_ms)

    def deleting(self, actor_ids: Iterable[str]) -> asyncio.Future[None] | None:
        """The deletion in progress of one of ``actor_ids``, if any: activate them after it."""
        if self._deleted is None or self._deleted.done():
            return None
        return self._deleted if any(aid in self._deleting for aid in actor_ids) else None

    async def chores(self) -> None:
        """The sweeps and the dead-letter trim that are due."""
        # A commit during a chore may make it due again (marked, dead_lettered): kept.
        for actor_type, retention_ms in self._types.items():
            if self._sweep_due[actor_type] <= self.runner.clock.lower():
                self._sweep_due[actor_type] = FOREVER_MS
                next_due = await self._sweep(actor_type, retention_ms)
                self._sweep_due[actor_type] = min(self._sweep_due[actor_type], next_due)
        if self._trim_due <= self.runner.clock.lower():
            self._trim_due = FOREVER_MS
            next_due = await self._trim_dead_letters()
            self._trim_due = min(self._trim_due, next_due)

    async def _sweep(self, actor_type: str, retention_ms: int) -> int:
        """Delete what is due; returns when (ms, Redis clock) the next sweep is due: now if
        actors were left (this runner's work, or past ``SWEEP_CALLS``), else once the oldest
        mark left is the retention old."""
        r = self.runner
        offset = 0  # the due actors left out because this runner has work of them
        for _ in range(SWEEP_CALLS):
            before = r.clock.lower() - retention_ms
            due = await r.store.idle_actors(r.shard, actor_type, before, offset, SWEEP_BATCH)
            free = [aid for aid in due if self._free(aid)]
            offset += len(due) - len(free)
            if free:
                await self._expire(actor_type, retention_ms, free)
            if len(due) < SWEEP_BATCH:
                break
        else:
            return 0
        if offset:
            return 0
        oldest = await r.store.oldest_idle(r.shard, actor_type)
        return FOREVER_MS if oldest is None else oldest + retention_ms

    def _free(self, actor_id: str) -> bool:
        """Whether this runner holds no work of the actor in memory (its open turn and timer,
        in Redis, are the script's to see)."""
        r = self.runner
        act = r.activations.get(actor_id)
        if act is None:
            return not r.work.loading(actor_id)
        return act.task is None and not act.queue

    async def _expire(self, actor_type: str, retention_ms: int, actor_ids: list[str]) -> None:
        r = self.runner
        for aid in actor_ids:  # evicted first: a message for one of them now loads it afresh
            r.activations.pop(aid, None)
        self._deleting = set(actor_ids)
        self._deleted = asyncio.get_running_loop().create_future()
        try:
            await r.store.expire_idle(r.shard, r.lease.value, actor_type, retention_ms, actor_ids)
        finally:
            self._deleted.set_result(None)
            self._deleting = set()

    async def _trim_dead_letters(self) -> int:
        """Trim what is too old; returns when (ms, Redis clock) the oldest left will be."""
        r = self.runner
        oldest = await r.store.age_dead_letters(r.shard, r.clock.lower() - self._max_age_ms)
        return FOREVER_MS if oldest is None else oldest + self._max_age_ms

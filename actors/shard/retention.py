"""What a shard keeps, and for how long: with the mailbox's chores (every ``trim_interval``)
the runner deletes the states of idle actors of types with ``retention`` and trims the dead
letters past ``dlq_max_age``.

An actor of such a type is marked in its type's idle set by every write that ends a piece
of its work (``c`` or ``d``: effect ``I`` of ``commit.lua``). The sweep reads the marks at
least the retention old, leaves out the actors this runner has work of in memory (a task,
queued messages, an activation being loaded), evicts the others' activations, and has
``expire_idle.lua`` decide under the lease. While that script runs, an activation of one of
them waits for it (``deleting``), so that no turn runs on a snapshot the script deletes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TYPE_CHECKING

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
        self._types = [(cls.type_name, int((cls.retention or 0) * 1000)) for cls in kept]
        self._deleting: set[str] = set()
        self._deleted: asyncio.Future[None] | None = None

    def deleting(self, actor_ids: Iterable[str]) -> asyncio.Future[None] | None:
        """The deletion in progress of one of ``actor_ids``, if any: activate them after it."""
        if self._deleted is None or self._deleted.done():
            return None
        return self._deleted if any(aid in self._deleting for aid in actor_ids) else None

    async def chores(self) -> None:
        for actor_type, retention_ms in self._types:
            await self._sweep(actor_type, retention_ms)
        await self._trim_dead_letters()

    async def _sweep(self, actor_type: str, retention_ms: int) -> None:
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
                return

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

    async def _trim_dead_letters(self) -> None:
        r = self.runner
        max_age = r.settings.dlq_max_age
        if max_age:
            await r.store.trim_dead_letters(r.shard, r.clock.lower() - int(max_age * 1000))

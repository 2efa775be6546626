"""Idempotency markers live only as long as they protect something.

A marker (a queued item's ``seen:``, an item's dispatch marker, a journaled ask's marker and
kept reply) becomes useless at a write in another hash tag than its own: the journal write
that records the enqueue or the reply, the confirmation of the dispatch. No script can do
both, so the process that made that write deletes the marker right after it, here: one
pipelined, best-effort round trip for every marker that became useless meanwhile, off the
path of the turn or the dispatcher that made the write. Each marker keeps its TTL as the
fallback for a process that dies (or fails to reach Redis) in between.

Why each deletion point is safe: docs/architecture.md, Deduplication.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from .store import Store

log = logging.getLogger("actors.markers")

STOP_TIMEOUT = 5.0
"""Seconds ``stop`` waits for the last deletions (their markers expire on their own)."""


class Markers:
    """The markers of one process whose protection has ended, deleted in batches."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._pending: list[tuple[str, int]] = []
        """(key, ms it must still live; 0: delete it), in the order they became useless."""
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="markers")

    async def stop(self) -> None:
        """Delete what is pending (within ``STOP_TIMEOUT``), then stop."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        self._wakeup.set()
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=STOP_TIMEOUT)

    # ---- what became useless -------------------------------------------------------
    def ask_answered(self, shard: int, actor_id: str, ask_id: str) -> None:
        """The asker's journal records the reply to its ask ``ask_id`` to ``actor_id``: a
        re-run replays it, so the ask's marker and kept reply protect nothing any more."""
        keys = self.store.keys
        self._forget(keys.idempotency(shard, actor_id, ask_id))
        self._forget(keys.reply(shard, ask_id))

    def enqueue_journaled(self, queue: str, item_id: str) -> None:
        """The turn's journal records its enqueue of ``item_id``: a re-run replays it, and
        nothing else enqueues that id."""
        self._forget(self.store.keys.queue_seen(queue, item_id))

    def item_dispatched(self, shard: int, actor_id: str, item_id: str, keep_ms: int) -> None:
        """The item left its queue: its dispatch marker is needed ``keep_ms`` more (another
        dispatch of it may still append it until then; 0: none may)."""
        self._forget(self.store.keys.idempotency(shard, actor_id, item_id), keep_ms)

    def _forget(self, key: str, keep_ms: int = 0) -> None:
        self._pending.append((key, keep_ms))
        self._wakeup.set()

    # ---- deleting them ---------------------------------------------------------------
    async def flush(self) -> None:
        """Delete (or cut short) every pending marker now, in one round trip."""
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            await self.store.forget_markers(batch)
        except Exception as exc:  # each one expires on its own
            log.warning("could not delete %d idempotency markers: %s", len(batch), exc)

    async def _loop(self) -> None:
        """Whatever became useless while a batch was in flight goes with the next one."""
        while not self._stopping:
            await self._wakeup.wait()
            self._wakeup.clear()
            await self.flush()
        await self.flush()

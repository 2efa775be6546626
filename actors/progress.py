"""What is left to do in a namespace, and waiting until nothing is (``Client.work``,
``Client.wait_idle``, ``actors status``).

A namespace is idle when no shard has an inbox entry unread or pending, an outbox entry not
forwarded, a deferred message, or an actor whose timer is due (a turn running or to recover,
a sleep or a wait that has ended), and no limiter's queue holds an item queued or being
dispatched. Turns that sleep or wait until later, or are parked, are not work to do now: an
idle namespace may hold them (``suspended``). A schedule's next tick is not counted either.

Shards are read one after another, each at one moment; a message forwarded from a shard not
read yet to one already read could hide between the reads. So ``wait_idle`` returns only
after two looks in a row found nothing to do and no entry added to any inbox or outbox
between them: whatever moved between the looks would have been added somewhere.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from .errors import IdleTimeout
from .settings import check_seconds
from .store import ShardWork, Store

PARALLEL_READS = 32
"""Shards read at once."""


@dataclass(frozen=True, slots=True)
class NamespaceWork:
    """What ``Client.work`` found: each shard's work, and the items queued per limiter."""

    shards: list[ShardWork]
    queued: dict[str, int]
    """Limiter name -> items queued or being dispatched."""

    @property
    def idle(self) -> bool:
        return all(s.idle for s in self.shards) and not any(self.queued.values())

    def total(self, field: str) -> int:
        """The sum of one ``ShardWork`` field over the shards (-1s, not counted, count 0)."""
        return sum(max(0, getattr(s, field)) for s in self.shards)

    def describe(self) -> str:
        """The work left, in words: ``'idle'``, or what keeps the namespace busy."""
        parts = [
            f"{n:,} {what}"
            for n, what in (
                (self.total("unread"), "unread"),
                (self.total("pending"), "pending"),
                (self.total("outbox"), "in outboxes"),
                (self.total("deferred"), "deferred"),
                (self.total("due"), "due (actors whose turn runs or must run now)"),
                (sum(self.queued.values()), "queued"),
            )
            if n
        ]
        later = self.total("suspended")
        suspended = f" ({later:,} suspended: sleeping, waiting or parked turns)" if later else ""
        return ("busy: " + ", ".join(parts) if parts else "idle") + suspended

    def _added(self) -> list[int]:
        return [s.added for s in self.shards]


async def namespace_work(store: Store, shards: int, *, count_deferred: bool = True) -> NamespaceWork:
    found: list[ShardWork] = []
    for first in range(0, shards, PARALLEL_READS):
        batch = range(first, min(shards, first + PARALLEL_READS))
        found += await asyncio.gather(*(store.shard_work(s, count_deferred=count_deferred) for s in batch))
    queued: dict[str, int] = {}
    for name in sorted(await store.declare_limiters({})):
        by_partition, dispatching = await store.queue_depths(name)
        queued[name] = sum(by_partition.values()) + dispatching
    return NamespaceWork(found, queued)


async def wait_idle(store: Store, shards: int, timeout: float | None, interval: float) -> NamespaceWork:
    """Return the work (idle) once two looks in a row found it idle with nothing added between
    them (see the module); IdleTimeout after ``timeout`` seconds (None: no bound)."""
    if timeout is not None:
        check_seconds(timeout, "wait_idle's timeout")
    check_seconds(interval, "wait_idle's interval")
    deadline = None if timeout is None else time.monotonic() + timeout
    previous: NamespaceWork | None = None
    while True:
        work = await namespace_work(store, shards, count_deferred=False)
        if work.idle:  # the deferred lists only now: the cheap counts already say busy most times
            work = await namespace_work(store, shards)
        if work.idle and previous is not None and previous.idle and work._added() == previous._added():
            return work
        if deadline is not None and time.monotonic() >= deadline:
            raise IdleTimeout(f"not idle after {timeout:g}s: {work.describe()}", work)
        previous = work
        await asyncio.sleep(interval if not work.idle else min(interval, 0.05))

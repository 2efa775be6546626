"""Step 4 and 5 of the data path: every write of a shard's turns, applied in batches by one
fenced script at a time, and the committed cross-shard messages forwarded to their shards.

It also keeps the account of the inbox entries the runner has seen with a plain XREAD
and not yet taken into the consumer group: the next commit takes them first (``Take``),
and effects outside the commit wait for that (``confirmed``, ``fenced``)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..errors import LeaseLost
from ..store import DUPLICATE, Entry, ResponseError, Take, Write, write_bytes
from .state import ShardReset, spread

if TYPE_CHECKING:
    from .runner import ShardRunner

log = logging.getLogger("actors.shard")

FORWARD_POLL = 5.0
"""Seconds between looks at the outbox for entries a previous owner committed and never forwarded."""
FORWARD_BACKOFF_MAX = 30.0
"""At most this many seconds between two tries at a target shard that refuses forwards."""


def batch_length(writes: Iterable[Write], count: int, max_bytes: int) -> int:
    """How many of ``writes`` (oldest first) the next commit takes: at most ``count`` and,
    past the first, no more than ``max_bytes`` together. The script gets its batch as one
    argument, which the server refuses past its ``proto-max-bulk-len``; a write larger than
    ``max_bytes`` goes alone."""
    total = taken = 0
    for write in writes:
        if taken == count:
            break
        total += write_bytes(write)
        if taken and total > max_bytes:
            break
        taken += 1
    return taken


class Commits:
    def __init__(self, runner: ShardRunner) -> None:
        self.runner = runner
        self._writes: list[tuple[Write, asyncio.Future[int]]] = []
        self._wakeup = asyncio.Event()
        self._forward_wakeup = asyncio.Event()
        self._seen_newest = ""
        self._seen = 0
        """Inbox entries ``read_after`` showed the runner, and the newest one's id."""
        self._taken = 0
        """How many of those a commit took into the group (see Take)."""
        self._take_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._margin = runner.settings.lease.renew_interval
        """An effect starts only if the lease surely lasts this much longer (see ``fenced``)."""
        self._reply_ttl_ms = int(runner.settings.messages.reply_ttl * 1000)
        self._dead_letters_max = runner.settings.dlq_max_len or 0
        self._refusing: dict[int, tuple[float, float]] = {}
        """Target shards whose forward failed: (when to try again, the backoff)."""

    def saw(self, entries: list[Entry]) -> None:
        """The runner dispatched ``entries`` from a plain XREAD: the next commit takes them."""
        self._seen_newest = entries[-1][0]
        self._seen += len(entries)

    async def confirmed(self) -> None:
        """Return once every entry the runner has dispatched is taken into the group as its
        own (raises LeaseLost if the lease is gone)."""
        if self._taken >= self._seen:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._take_waiters.append((self._seen, waiter))
        self._wakeup.set()
        await waiter

    async def fenced(self) -> None:
        """Return once the runner may start an effect outside its commit (a step's function,
        an ask, an enqueue, a limiter hold, a forward): every entry it has dispatched is taken
        into the group as its own (``confirmed``) and its lease surely lasts at least a renew
        interval longer (``Lease.deadline``). Otherwise the runner fails with LeaseLost, even
        if a handler catches the error."""
        await self.confirmed()
        lease = self.runner.lease
        remaining = lease.remaining()
        if remaining < self._margin:
            exc = LeaseLost(
                f"shard {lease.shard}: the lease at epoch {lease.epoch} is not surely held "
                f"long enough to start an effect ({remaining:.3f}s left)"
            )
            self.runner.fail(exc)
            raise exc

    async def write(self, write: Write) -> int:
        """Apply ``write`` with the next batch; DONE or BACKLOG. A duplicate resets the shard."""
        act = self.runner.activations.get(write.actor_id)
        if act is not None and write.op in ("c", "d"):
            # A write that ends a piece of the actor's work: forget its counted starts, and
            # mark it idle from now if its type has retention.
            retained = act.actor is not None and act.actor.retention is not None
            if act.counted or retained:
                write = dataclasses.replace(write, forget_delivery=act.counted, retained=retained)
                act.counted = False
            if retained and act.actor is not None:  # before it is sent: the mark is no sooner
                self.runner.retention.marked(type(act.actor).type_name)
        if write.op == "d" or write.dead:
            self.runner.retention.dead_lettered()
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._writes.append((write, fut))
        self._wakeup.set()
        result = await fut
        if result == DUPLICATE:
            raise ShardReset(
                f"shard {self.runner.shard}: a write for {write.actor_id or write.ref!r} was already applied"
            )
        return result

    async def commit_loop(self) -> None:
        """One script in flight at a time; writes that come meanwhile form the next batch,
        so a busy shard commits in batches and an idle one commits each turn at once."""
        runner = self.runner
        limit, max_bytes = runner.settings.commit_batch, runner.settings.commit_batch_bytes
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._writes or self._take_waiters:
                n = batch_length((w for w, _ in self._writes), limit, max_bytes)
                batch, self._writes = self._writes[:n], self._writes[n:]
                seen = self._seen
                fresh = seen - self._taken
                take = Take(runner.consumer, self._seen_newest, fresh) if fresh else None
                writes = [w for w, _ in batch]
                results = await runner.store.commit(
                    runner.shard, runner.lease.value, writes, self._reply_ttl_ms, take, self._dead_letters_max
                )
                self._taken = seen
                self._wake_take_waiters()
                runner.mailbox.touched()
                forwarded = False
                items_done = []
                for (write, fut), result in zip(batch, results, strict=True):
                    forwarded = forwarded or bool(write.remote)
                    if write.item is not None:  # a duplicate too: its first run's reply may be lost
                        items_done.append(write.item)
                    if not fut.done():
                        fut.set_result(result)
                if forwarded:
                    self._forward_wakeup.set()
                if items_done:
                    await runner.services.limits.items_done(items_done)

    def _wake_take_waiters(self) -> None:
        waiting = []
        for needed, waiter in self._take_waiters:
            if needed <= self._taken:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                waiting.append((needed, waiter))
        self._take_waiters = waiting

    async def forward_loop(self) -> None:
        """Forward what the outbox holds: at start (what a previous owner committed and never
        forwarded), then after each of our commits with remote sends (only this shard's owner
        appends to its outbox), and every ``FORWARD_POLL`` while messages to a refusing target
        are left."""
        while True:
            left = await self._forward_pending()
            try:
                poll = spread(FORWARD_POLL) if left else None
                await asyncio.wait_for(self._forward_wakeup.wait(), timeout=poll)
            except TimeoutError:
                pass
            self._forward_wakeup.clear()

    async def _forward_pending(self) -> bool:
        """Forward the outbox, page by page; whether messages were left in it. A target shard
        that refuses the forward (its keys unwritable, a full server) costs only the messages
        to it: they stay in the outbox, in order, and are tried again after a backoff, while
        the other targets' go on."""
        store, shard = self.runner.store, self.runner.shard
        after = "-"
        left = False
        while True:
            rows = await store.read_outbox(shard, 512, after)
            if not rows:
                return left
            await self.fenced()
            by_target: dict[int, list[tuple[str, bytes]]] = {}
            for entry_id, target, envelope in rows:
                by_target.setdefault(target, []).append((entry_id, envelope))
            done: list[str] = []
            for target, items in by_target.items():
                if await self._forward_to(target, items):
                    done += [entry_id for entry_id, _ in items]
            await store.delete_outbox(shard, done)
            left = left or len(done) < len(rows)
            after = rows[-1][0]

    async def _forward_to(self, target: int, items: list[tuple[str, bytes]]) -> bool:
        """Forward ``items`` to ``target`` unless it is backing off; whether they went."""
        now = time.monotonic()
        if self._refusing.get(target, (0.0, 0.0))[0] > now:
            return False
        try:
            await self.runner.store.forward(self.runner.shard, target, items)
        except ResponseError as exc:
            delay = min(FORWARD_BACKOFF_MAX, 2 * self._refusing.get(target, (0.0, FORWARD_POLL / 8))[1])
            self._refusing[target] = (now + delay, delay)
            log.warning(
                "shard %s: forwarding %d messages to shard %s failed (%s); they wait in the outbox, "
                "next try in %.1fs", self.runner.shard, len(items), target, exc, delay,
            )  # fmt: skip
            return False
        self._refusing.pop(target, None)
        return True

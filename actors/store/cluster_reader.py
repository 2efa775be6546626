"""The blocking inbox reads of one worker process on a cluster: a call per shard.

On one server the ``InboxReader`` waits for every shard in one ``XREAD``. On a cluster each
shard's keys are a slot of their own (the shard number is the hash tag), and an ``XREAD`` names
streams of one slot only, so no call can cover two shards. Here each feed has a task of its own
that waits in ``XREAD COUNT c BLOCK ms STREAMS <inbox> <cursor>`` through the store's retrying
cluster client, which sends it to the node that serves the slot now and follows a failover.
A worker on a cluster thus holds one connection per shard it holds, spread over the primaries,
besides its pools.

The feeds are the same as ``InboxReader``'s (``InboxFeed``): a cursor, a buffer read ahead while
it holds fewer than ``count`` entries, entries after the cursor delivered once and in order. A
call that fails on a transient error (a lost connection, a failover in progress) is sent again
after a backoff; one the server refuses fails the feed's wait, so its runner restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from .cluster import node_of, refresh
from .connection import STALL_TIMEOUT, StoreBase, is_transient, raw_reply
from .reader import BACKOFF_MAX_S, InboxFeed, spread_wait, stream_rows
from .records import stream_entries

log = logging.getLogger("actors.store")


class ClusterInboxReader:
    """The inbox reads of one worker process on a cluster (see the module docstring)."""

    def __init__(self, store: StoreBase, count: int, block_ms: int) -> None:
        self.keys = store.keys
        self.count = count
        self.block_ms = block_ms
        self._store = store
        self._ready: dict[InboxFeed, asyncio.Event] = {}
        self._tasks: dict[InboxFeed, asyncio.Task[None]] = {}
        self._running: set[asyncio.Task[None]] = set()
        """Every task not yet ended, a closed feed's too: ``close`` ends them before the store
        closes (a retried call would connect again)."""
        self._closed = False

    def open(self, shard: int) -> InboxFeed:
        if self._closed:
            raise RuntimeError("the inbox reader is closed")
        feed = InboxFeed(self, shard, self.keys.inbox(shard).encode())
        self._ready[feed] = asyncio.Event()
        task = self._tasks[feed] = asyncio.create_task(self._follow(feed), name=f"inbox-reader-{shard}")
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return feed

    def forget(self, feed: InboxFeed) -> None:
        """The feed's task ends after its call in flight (at most ``block_ms``): cancelling a
        call would cost its connection."""
        self._ready.pop(feed, asyncio.Event()).set()
        self._tasks.pop(feed, None)

    def readable(self, feed: InboxFeed) -> None:
        if (ready := self._ready.get(feed)) is not None:
            ready.set()

    def waits(self, feed: InboxFeed) -> None:
        self.readable(feed)

    def waited(self, feed: InboxFeed) -> None:
        pass

    @property
    def feeds(self) -> int:
        return len(self._tasks)

    def wait_s(self) -> float:
        return spread_wait(self.block_ms)

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._running)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for feed in list(self._ready):
            feed.wake()

    async def _follow(self, feed: InboxFeed) -> None:
        backoff = 0.0
        while not (feed.closed or self._closed):
            ready = self._ready[feed]
            if not feed.readable:
                ready.clear()
                await ready.wait()
                continue
            client = self._store.redis
            try:
                async with asyncio.timeout(self.block_ms / 1000 + STALL_TIMEOUT):
                    node = await node_of(client, feed.key.decode())
                    reply = await raw_reply(
                        client, "XREAD", "COUNT", self.count, "BLOCK", self.block_ms,
                        "STREAMS", feed.key, feed.cursor or "$", target_nodes=node,
                    )  # fmt: skip
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                backoff = min(max(backoff * 2, 0.05), BACKOFF_MAX_S)
                self._failed(feed, exc, backoff)
                await asyncio.sleep(backoff)
                await refresh(client)  # a call sent to a node chosen by hand does not do it
                continue
            backoff = 0.0
            for _key, rows in stream_rows(reply):
                feed.deliver(stream_entries(rows))

    def _failed(self, feed: InboxFeed, exc: Exception, backoff: float) -> None:
        if is_transient(exc):
            log.warning(
                "inbox reader, shard %s: Redis error %r; reading again in %.2fs", feed.shard, exc, backoff
            )
            return
        log.error("inbox reader: the server refused a read of shard %s: %r", feed.shard, exc)
        with contextlib.suppress(Exception):
            feed.fail(exc)

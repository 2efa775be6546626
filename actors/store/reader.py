"""The blocking inbox reads of one worker process, multiplexed: one ``XREAD`` for many shards.

An idle shard runner waits for entries after the newest it has seen. Were each to wait in an
``XREAD BLOCK`` of its own, each would hold a pooled connection for up to ``block_ms``, and a
few hundred shards would starve the pool. Instead every runner waits here, on a feed
(``InboxFeed``), and the reader waits for all of them with
``XREAD COUNT c BLOCK ms STREAMS k1..kn id1..idn`` on a few connections of its own.

Per feed the reader keeps a cursor (the newest entry it knows of) and a buffer of entries read
but not yet taken by the runner. A feed is read ahead while its buffer holds fewer than
``count`` entries; at most two calls cover a feed at once, each adding at most ``count``, so
a runner whose reading is paused (``max_inflight``) leaves fewer than ``3 * count`` entries
buffered. One call, the *main* one, covers every feed that may be
read; as soon as it returns (an entry arrived, or ``block_ms`` passed) it is issued again, so
a message to an idle shard is seen in one round trip. A runner that waits while no call in
flight covers its feed (it just started, or its buffer was full when the main call went out)
gets a *catch-up* call for it and every other such feed, on another of the reader's
connections, blocking at most ``CATCH_UP_BLOCK_MS``; the next main call covers them too, so
the calls merge back into one. A feed covered by two calls sees an entry twice: the results
of every call are filtered by id against the feed's cursor, so nothing is delivered twice
and nothing is skipped (a call returns the entries right after the id it was given, in order).

A call that fails on a lost connection is issued again after a backoff; the runners meanwhile
see nothing (their own Redis calls meet the outage). One the server refuses (a key that is
not a stream) fails the waits of every feed it covered, so their runners restart, as they did
when each read alone.

The streams of one call are grouped in one place (``_streams``): on Redis Cluster an
``XREAD`` cannot span slots, and that is where calls would be split by slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any

from redis.asyncio.connection import AbstractConnection

from .connection import STALL_TIMEOUT, StoreBase, is_transient
from .records import Entry, stream_entries

log = logging.getLogger("actors.store")

READER_CONNECTIONS = 4
"""Connections of a reader: one for the main call and the rest for catch-up calls."""

CATCH_UP_BLOCK_MS = 100
"""A catch-up call blocks at most this long, so a waiting runner left out by every call in
flight (all connections busy) waits at most about this long for one to cover it."""

BACKOFF_MAX_S = 2.0

StreamId = tuple[int, int]


def stream_id(text: str) -> StreamId:
    """``"<ms>-<seq>"`` as a pair that orders like the server orders ids."""
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class InboxFeed:
    """One runner's wait for new entries of its shard's inbox (see the module docstring).
    Opened with ``InboxReader.open``; ``close`` it when the runner ends."""

    def __init__(self, reader: InboxReader, shard: int, key: bytes) -> None:
        self.reader = reader
        self.shard = shard
        self.key = key
        self.cursor: str | None = None
        """The newest entry id known: buffered, or taken by the runner. None until the runner
        first waits (the feed is then read from that id on)."""
        self._cursor_id: StreamId = (0, 0)
        self.buffer: deque[Entry] = deque()
        """Entries after what the runner took, up to the cursor, in order, with no gap."""
        self.calls = 0
        """Calls in flight that cover this feed."""
        self.closed = False
        self._wake: asyncio.Future[None] | None = None
        self._error: BaseException | None = None

    @property
    def readable(self) -> bool:
        """Whether the next call should read this feed ahead."""
        return self.cursor is not None and not self.closed and len(self.buffer) < self.reader.count

    @property
    def waiting(self) -> bool:
        return self._wake is not None

    async def read_after(self, after: str) -> list[Entry]:
        """Up to ``count`` entries newer than ``after`` (the newest entry the runner has seen),
        waiting up to ``block_ms`` for one ([] if none came). Cancelling it cancels this wait
        only. Raises what the server answered if it refused a read of this feed."""
        self._raise_error()
        self._advance(after)
        if not self.buffer:
            self._wake = asyncio.get_running_loop().create_future()
            self.reader.waits(self)
            try:
                async with asyncio.timeout(self.reader.block_ms / 1000):
                    await self._wake
            except TimeoutError:
                pass
            finally:
                self._wake = None
                self.reader.waited(self)
            self._raise_error()
        taken = self._take()
        if self.readable:
            self.reader.readable(self)
        return taken

    def close(self) -> None:
        """The runner ends: read this shard no more for it."""
        if not self.closed:
            self.closed = True
            self.buffer.clear()
            self.reader.forget(self)

    def deliver(self, entries: list[Entry]) -> None:
        """Entries a call read after the id it was given: keep those after the cursor."""
        if self.closed or not entries:
            return
        start = 0
        while start < len(entries) and stream_id(entries[start][0]) <= self._cursor_id:
            start += 1
        if start == len(entries):
            return
        self.buffer.extend(entries[start:] if start else entries)
        self.cursor = entries[-1][0]
        self._cursor_id = stream_id(self.cursor)
        self._wake_up()

    def fail(self, exc: BaseException) -> None:
        """The server refused a call covering this feed: the runner's wait raises ``exc``."""
        if not self.closed:
            self._error = exc
            self._wake_up()

    def _advance(self, after: str) -> None:
        """Forget what the runner has seen (it may have read it with the fenced script)."""
        after_id = stream_id(after)
        while self.buffer and stream_id(self.buffer[0][0]) <= after_id:
            self.buffer.popleft()
        if self.cursor is None or after_id > self._cursor_id:
            self.cursor, self._cursor_id = after, after_id

    def _take(self) -> list[Entry]:
        return [self.buffer.popleft() for _ in range(min(self.reader.count, len(self.buffer)))]

    def _wake_up(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _raise_error(self) -> None:
        if self._error is not None:
            exc, self._error = self._error, None
            raise exc


class InboxReader:
    """The multiplexed inbox reads of one worker process (see the module docstring): ``count``
    and ``block_ms`` as in ``WorkerSettings``; ``connections`` of its own, made as the
    store's non-retrying client makes them (same server, credentials and keepalive)."""

    def __init__(
        self, store: StoreBase, count: int, block_ms: int, connections: int = READER_CONNECTIONS
    ) -> None:
        if connections < 2:
            raise ValueError("an inbox reader needs at least 2 connections (main and catch-up)")
        self.keys = store.keys
        self.count = count
        self.block_ms = block_ms
        self._store = store
        self._connections = connections
        self._idle: list[AbstractConnection] = []
        self._made: list[AbstractConnection] = []
        self._feeds: dict[bytes, list[InboxFeed]] = {}
        self._stranded: set[InboxFeed] = set()
        """Waiting feeds that no call in flight covers."""
        self._main_busy = False
        self._catch_ups = 0
        self._calls: set[asyncio.Task[None]] = set()
        self._scheduled = False
        self._paused = False
        """After a failed call, until its backoff has passed."""
        self._backoff = 0.0
        self._closed = False

    # ---- feeds --------------------------------------------------------------------------
    def open(self, shard: int) -> InboxFeed:
        if self._closed:
            raise RuntimeError("the inbox reader is closed")
        feed = InboxFeed(self, shard, self.keys.inbox(shard).encode())
        self._feeds.setdefault(feed.key, []).append(feed)
        return feed

    def forget(self, feed: InboxFeed) -> None:
        feeds = self._feeds.get(feed.key, [])
        if feed in feeds:
            feeds.remove(feed)
        if not feeds:
            self._feeds.pop(feed.key, None)
        self._stranded.discard(feed)

    def readable(self, feed: InboxFeed) -> None:
        """``feed`` may be read ahead again (its cursor moved or its buffer has room)."""
        if not self._main_busy:
            self._kick()

    def waits(self, feed: InboxFeed) -> None:
        if feed.calls == 0:
            self._stranded.add(feed)
            self._kick()

    def waited(self, feed: InboxFeed) -> None:
        self._stranded.discard(feed)

    @property
    def feeds(self) -> int:
        return sum(len(feeds) for feeds in self._feeds.values())

    # ---- calls --------------------------------------------------------------------------
    def _kick(self) -> None:
        """Look for a call to start, once per pass of the event loop (so that the feeds of
        many runners starting at once go out in one call)."""
        if not self._scheduled and not self._closed:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._schedule)

    def _schedule(self) -> None:
        self._scheduled = False
        if self._closed or self._paused:
            return
        if not self._main_busy:
            feeds = [f for fs in self._feeds.values() for f in fs if f.readable]
            if feeds:
                self._main_busy = True
                self._start(feeds, self.block_ms, main=True)
        stranded = [f for f in self._stranded if f.readable and f.calls == 0]
        self._stranded.clear()
        if stranded:
            if self._catch_ups < self._connections - 1:
                self._catch_ups += 1
                self._start(stranded, min(self.block_ms, CATCH_UP_BLOCK_MS), main=False)
            else:  # every connection is busy: the first call to end covers them
                self._stranded.update(stranded)

    def _start(self, feeds: list[InboxFeed], block_ms: int, *, main: bool) -> None:
        for feed in feeds:
            feed.calls += 1
        self._stranded.difference_update(feeds)
        conn = self._idle.pop() if self._idle else self._new_connection()
        task = asyncio.create_task(self._call(conn, feeds, block_ms, main), name="inbox-reader")
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    def _new_connection(self) -> AbstractConnection:
        conn = self._store.new_connection()
        self._made.append(conn)
        return conn

    async def _call(
        self, conn: AbstractConnection, feeds: list[InboxFeed], block_ms: int, main: bool
    ) -> None:
        keys, ids, by_key = _streams(feeds)
        try:
            await conn.send_command(
                "XREAD", "COUNT", self.count, "BLOCK", block_ms, "STREAMS", *keys, *ids, check_health=False
            )
            # The pool's connections have no socket timeout (see make_client); a server that
            # stopped answering must not hold these feeds for good.
            async with asyncio.timeout(block_ms / 1000 + STALL_TIMEOUT):
                reply = await conn.read_response()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._failed(conn, feeds, exc)
        else:
            self._backoff = 0.0
            for key, rows in _stream_rows(reply):
                entries = stream_entries(rows)
                for feed in by_key.get(key, ()):
                    feed.deliver(entries)
        finally:
            for feed in feeds:
                feed.calls -= 1
                if feed.calls == 0 and feed.waiting and not feed.closed:
                    self._stranded.add(feed)
            self._idle.append(conn)
            if main:
                self._main_busy = False
            else:
                self._catch_ups -= 1
            self._kick()

    async def _failed(self, conn: AbstractConnection, feeds: list[InboxFeed], exc: Exception) -> None:
        with contextlib.suppress(Exception):
            await conn.disconnect(nowait=True)
        self._backoff = min(max(self._backoff * 2, 0.05), BACKOFF_MAX_S)
        self._paused = True
        asyncio.get_running_loop().call_later(self._backoff, self._resume)
        if is_transient(exc):
            log.warning("inbox reader: Redis error %r; reading again in %.2fs", exc, self._backoff)
            return
        log.error("inbox reader: the server refused a read of %d shards: %r", len(feeds), exc)
        for feed in feeds:
            feed.fail(exc)

    def _resume(self) -> None:
        self._paused = False
        self._kick()

    async def close(self) -> None:
        """Stop reading: end the calls in flight and close the reader's connections."""
        self._closed = True
        for task in list(self._calls):
            task.cancel()
        await asyncio.gather(*self._calls, return_exceptions=True)
        for conn in self._made:
            with contextlib.suppress(Exception):
                await conn.disconnect()
        for feeds in self._feeds.values():
            for feed in feeds:
                feed._wake_up()


def _streams(feeds: list[InboxFeed]) -> tuple[list[bytes], list[str], dict[bytes, list[InboxFeed]]]:
    """The keys and ids of one call, and its feeds by key: a stream read by two feeds (two
    runners of one shard, briefly) is read once, after the older of their cursors."""
    by_key: dict[bytes, list[InboxFeed]] = {}
    ids: dict[bytes, str] = {}
    for feed in feeds:
        assert feed.cursor is not None  # only readable feeds are covered
        sharing = by_key.setdefault(feed.key, [])
        sharing.append(feed)
        if len(sharing) == 1 or stream_id(feed.cursor) < stream_id(ids[feed.key]):
            ids[feed.key] = feed.cursor
    return list(by_key), list(ids.values()), by_key


def _stream_rows(reply: Any) -> list[tuple[bytes, Any]]:
    """(stream, entries) of a raw multi-stream XREAD reply: a map (RESP3) or a list of pairs
    (RESP2); nothing when the block timed out."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return list(reply.items())
    return [(key, rows) for key, rows in reply]

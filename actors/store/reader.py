"""The blocking inbox reads of one worker process, multiplexed: one ``XREAD`` for many shards.

An idle shard runner waits for entries after the newest it has seen. Were each to wait in an
``XREAD BLOCK`` of its own, each would hold a pooled connection for up to ``block_ms``, and a
few hundred shards would starve the pool. Instead every runner waits here, on a feed
(``InboxFeed``), and the reader waits for all of them with
``XREAD COUNT c BLOCK ms STREAMS k1..kn id1..idn`` on a few connections of its own.

Per feed the reader keeps a cursor (the newest entry it knows of) and a buffer of entries read
but not yet taken by the runner. A feed is read ahead while its buffer holds fewer than
``count`` entries; at most two calls cover a feed at once, each adding at most ``count``, so a
runner whose reading is paused (``max_inflight``) leaves fewer than ``3 * count`` entries
buffered.

The feeds are grouped: a group holds at most ``GROUP_STREAMS`` streams, and a feed stays in its
group while it is open. Each group has one *main* call in flight, covering every feed of the
group that may be read; as soon as it returns (an entry arrived for one of them, or
``block_ms`` passed) it is issued again, so a message to an idle shard is seen in one round
trip. A call costs the server and this process in proportion to the streams it names, and
every entry that arrives ends the call that covers its stream: with one call for 4,096 idle
streams, each message cost milliseconds of both. A worker of up to ``GROUP_STREAMS`` shards
has one group, as it had one call.

A runner that waits while no call in flight covers its feed (it just started, or its buffer
was full when its group's call went out) gets a *catch-up* call for it and the other such feeds
of its group, on another of the reader's connections, blocking at most ``CATCH_UP_BLOCK_MS``;
the group's next main call covers them too, so the calls merge back into one. A feed covered
by two calls sees an entry twice: the results of every call are filtered by id against the
feed's cursor, so nothing is delivered twice and nothing is skipped (a call returns the
entries right after the id it was given, in order).

A call that fails on a lost connection is issued again after a backoff; the runners meanwhile
see nothing (their own Redis calls meet the outage). One the server refuses (a key that is
not a stream) fails the waits of every feed it covered, so their runners restart, as they did
when each read alone.

Streams are grouped into calls in one place (``InboxReader._group_for``): on Redis Cluster an
``XREAD`` cannot span slots, and that is where a group would also be of one slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from redis.asyncio.connection import AbstractConnection

from ..settings import MAX_SHARDS
from .connection import STALL_TIMEOUT, StoreBase, is_transient
from .feed import Group, InboxFeed, bulk, spread_wait
from .records import stream_entries

__all__ = [  # the feed's names too: it lived here before feed.py
    "BACKOFF_MAX_S", "CATCH_UP_BLOCK_MS", "CATCH_UP_CALLS", "GROUP_STREAMS", "MAIN_CALLS",
    "READER_CONNECTIONS", "InboxFeed", "InboxReader", "reader_connections", "spread_wait", "stream_rows",
]  # fmt: skip

log = logging.getLogger("actors.store")

GROUP_STREAMS = 256
"""Streams one main call names at most. A call costs the server about 0.75 µs per stream it
names, and ends (to be issued again) whenever an entry arrives on any of them."""
MAIN_CALLS = -(-MAX_SHARDS // GROUP_STREAMS)
"""Main calls in flight at most: one per group, and a namespace has at most ``MAX_SHARDS``."""
CATCH_UP_CALLS = 3
"""Catch-up calls in flight at most."""
READER_CONNECTIONS = MAIN_CALLS + CATCH_UP_CALLS
"""Connections of a reader at most, whatever its shard count."""


def reader_connections(streams: int) -> int:
    """Connections of a reader of ``streams`` streams at most: a main call per group of
    ``GROUP_STREAMS`` and the catch-up calls."""
    return -(-streams // GROUP_STREAMS) + CATCH_UP_CALLS


CATCH_UP_BLOCK_MS = 100
"""A catch-up call blocks at most this long, so a waiting runner left out by every call in
flight (all connections busy) waits at most about this long for one to cover it."""

BACKOFF_MAX_S = 2.0


class InboxReader:
    """The multiplexed inbox reads of one worker process (see the module docstring): ``count``
    and ``block_ms`` as in ``WorkerSettings``; connections of its own (at most
    ``READER_CONNECTIONS``), made as the store's non-retrying client makes them (same server,
    credentials and keepalive)."""

    def __init__(self, store: StoreBase, count: int, block_ms: int) -> None:
        self.keys = store.keys
        self.count = count
        self.block_ms = block_ms
        self._store = store
        self._idle: list[AbstractConnection] = []
        self._made: list[AbstractConnection] = []
        self._all: dict[InboxFeed, None] = {}
        """Every open feed, in the order opened."""
        self._by_key: dict[bytes, list[InboxFeed]] = {}
        self._groups: list[Group] = []
        self._catch_ups = 0
        self._stranded: set[InboxFeed] = set()
        """Waiting feeds that no call in flight covers."""
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
        feed.group = self._group_for(feed)
        feed.group.add(feed)
        self._all[feed] = None
        self._by_key.setdefault(feed.key, []).append(feed)
        return feed

    def _group_for(self, feed: InboxFeed) -> Group:
        """The group whose main call reads ``feed`` for as long as it is open: that of its
        stream if another feed reads it, else the first with room for one more stream (a new
        group if none has). This is the one place streams are grouped into calls: on Redis
        Cluster, where one XREAD cannot name streams of two hash slots, a group would also be
        of one slot."""
        for other in self._by_key.get(feed.key, ()):
            if other.group is not None:
                return other.group
        group = next((g for g in self._groups if len(g.streams) < GROUP_STREAMS), None)
        if group is None:
            group = Group()
            self._groups.append(group)
        return group

    def forget(self, feed: InboxFeed) -> None:
        self._all.pop(feed, None)
        sharing = self._by_key.get(feed.key, [])
        if feed in sharing:
            sharing.remove(feed)
        if not sharing:
            self._by_key.pop(feed.key, None)
        self._stranded.discard(feed)
        group = feed.group
        if group is not None:
            group.remove(feed)
            self._drop_if_empty(group)

    def _drop_if_empty(self, group: Group) -> None:
        if not group.feeds and not group.busy and group in self._groups:
            self._groups.remove(group)

    def readable(self, feed: InboxFeed) -> None:
        """``feed`` may be read ahead again (its cursor moved or its buffer has room): its
        group's next main call covers it."""
        if feed.group is not None and not feed.group.busy:
            self._kick()

    def waits(self, feed: InboxFeed) -> None:
        if not self._covered(feed):
            self._stranded.add(feed)
            self._kick()

    def waited(self, feed: InboxFeed) -> None:
        self._stranded.discard(feed)

    @property
    def feeds(self) -> int:
        return len(self._all)

    @property
    def groups(self) -> int:
        """Groups of feeds, each read by a main call of its own."""
        return len(self._groups)

    def wait_s(self) -> float:
        return spread_wait(self.block_ms)

    @staticmethod
    def _covered(feed: InboxFeed) -> bool:
        return feed.catch_ups > 0 or (feed.group is not None and feed in feed.group.covered)

    # ---- calls --------------------------------------------------------------------------
    def _kick(self) -> None:
        """Look for calls to start, once per pass of the event loop (so that the feeds of
        many runners starting at once go out in one call)."""
        if not self._scheduled and not self._closed:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._schedule)

    def _schedule(self) -> None:
        self._scheduled = False
        if self._closed or self._paused:
            return
        count = self.count
        for group in self._groups:
            if not group.busy:
                feeds = [f for f in group.feeds if f.cursor is not None and len(f.buffer) < count]
                if feeds:
                    group.busy = True
                    group.covered = set(feeds)
                    self._start(feeds, group.covered, self.block_ms, group)
        if self._stranded:
            self._catch_up()

    def _catch_up(self) -> None:
        """A catch-up call for the stranded feeds of each group in turn, while connections
        for them are left; the rest wait for the first call to end."""
        by_group: dict[Group, list[InboxFeed]] = {}
        for feed in self._stranded:
            if feed.readable and not self._covered(feed) and feed.group is not None:
                by_group.setdefault(feed.group, []).append(feed)
        self._stranded.clear()
        for feeds in by_group.values():
            if self._catch_ups < CATCH_UP_CALLS:
                self._catch_ups += 1
                for feed in feeds:
                    feed.catch_ups += 1
                self._start(feeds, set(feeds), min(self.block_ms, CATCH_UP_BLOCK_MS), None)
            else:  # every catch-up connection is busy: the first call to end covers them
                self._stranded.update(feeds)

    def _start(
        self, feeds: list[InboxFeed], covered: set[InboxFeed], block_ms: int, group: Group | None
    ) -> None:
        command = self._command(feeds, block_ms)
        conn = self._idle.pop() if self._idle else self._new_connection()
        task = asyncio.create_task(self._call(conn, command, covered, group), name="inbox-reader")
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    def _command(self, feeds: list[InboxFeed], block_ms: int) -> bytes:
        """``XREAD COUNT c BLOCK ms STREAMS k1..kn id1..idn``, packed: each stream once, after
        the oldest cursor of its feeds (``feeds`` are of one group: see ``_group_for``)."""
        keys = [f.key_arg for f in feeds]
        ids = [f.cursor_arg for f in feeds]
        if len(set(keys)) < len(keys):  # two runners of one shard (briefly, at a restart)
            oldest: dict[bytes, InboxFeed] = {}
            for feed in feeds:
                if feed.key_arg not in oldest or feed.cursor_id < oldest[feed.key_arg].cursor_id:
                    oldest[feed.key_arg] = feed
            keys, ids = list(oldest), [f.cursor_arg for f in oldest.values()]
        head = (b"XREAD", b"COUNT", b"%d" % self.count, b"BLOCK", b"%d" % block_ms, b"STREAMS")
        return b"".join([b"*%d\r\n" % (len(head) + 2 * len(keys)), *map(bulk, head), *keys, *ids])

    def _new_connection(self) -> AbstractConnection:
        conn = self._store.new_connection()
        self._made.append(conn)
        return conn

    async def _call(
        self, conn: AbstractConnection, command: bytes, covered: set[InboxFeed], group: Group | None
    ) -> None:
        """One call: a group's main call, or (``group`` None) a catch-up call."""
        try:
            await conn.send_packed_command(command, check_health=False)
            # The pool's connections have no socket timeout (see make_client); a server that
            # stopped answering must not hold these feeds for good.
            async with asyncio.timeout(self.block_ms / 1000 + STALL_TIMEOUT):
                reply = await conn.read_response()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._failed(conn, covered, exc)
        else:
            self._backoff = 0.0
            for key, rows in stream_rows(reply):
                entries = stream_entries(rows)
                for feed in self._by_key.get(key, ()):
                    if feed in covered:  # a feed opened since may have an older cursor
                        feed.deliver(entries)
        finally:
            self._idle.append(conn)
            if group is not None:  # its waiting feeds: the group's next main call covers them
                group.busy = False
                group.covered = set()
                self._drop_if_empty(group)
            else:
                self._catch_ups -= 1
                for feed in covered:
                    feed.catch_ups -= 1
                    if feed.waiting and not feed.closed and not self._covered(feed):
                        self._stranded.add(feed)
            self._kick()

    async def _failed(self, conn: AbstractConnection, covered: set[InboxFeed], exc: Exception) -> None:
        with contextlib.suppress(Exception):
            await conn.disconnect(nowait=True)
        self._backoff = min(max(self._backoff * 2, 0.05), BACKOFF_MAX_S)
        self._paused = True
        asyncio.get_running_loop().call_later(self._backoff, self._resume)
        if is_transient(exc):
            log.warning("inbox reader: Redis error %r; reading again in %.2fs", exc, self._backoff)
            return
        log.error("inbox reader: the server refused a read of %d shards: %r", len(covered), exc)
        for feed in covered:
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
        for feed in self._all:
            feed.wake()


def stream_rows(reply: Any) -> list[tuple[bytes, Any]]:
    """(stream, entries) of a raw multi-stream XREAD reply: a map (RESP3) or a list of pairs
    (RESP2); nothing when the block timed out."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return list(reply.items())
    return [(key, rows) for key, rows in reply]

"""One shard runner's wait for new entries of its inbox, as the worker's inbox reader keeps it
(``reader.py``): a cursor, a buffer of entries read ahead, and the runner's wait."""

from __future__ import annotations

import asyncio
import math
import random
from collections import deque
from typing import Protocol

from .records import Entry

StreamId = tuple[int, int]


def stream_id(text: str) -> StreamId:
    """``"<ms>-<seq>"`` as a pair that orders like the server orders ids."""
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def spread_wait(block_ms: int) -> float:
    """How long a runner waits for an entry unless it says: ``block_ms``, plus up to a quarter
    more at random (runners that started together do not stay in step)."""
    return block_ms / 1000 * (1 + random.random() / 4)


class FeedSource(Protocol):
    """What a feed asks of the reader that serves it (``InboxReader``)."""

    count: int

    def readable(self, feed: InboxFeed) -> None: ...
    def waits(self, feed: InboxFeed) -> None: ...
    def waited(self, feed: InboxFeed) -> None: ...
    def forget(self, feed: InboxFeed) -> None: ...
    def wait_s(self) -> float: ...


def bulk(value: bytes) -> bytes:
    """``value`` as a RESP bulk string: the calls are packed here, from each feed's key and
    cursor packed once (redis-py packs a call of 2,000 arguments in over a millisecond)."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


class InboxFeed:
    """One runner's wait for new entries of its shard's inbox (see the module docstring).
    Opened with ``InboxReader.open``; ``close`` it when the runner ends."""

    def __init__(self, reader: FeedSource, shard: int, key: bytes) -> None:
        self.reader = reader
        self.shard = shard
        self.key = key
        self.key_arg = bulk(key)
        self.group: Group | None = None
        """The group whose main call reads this feed (set by ``InboxReader.open``)."""
        self.cursor: str | None = None
        """The newest entry id known: buffered, or taken by the runner. None until the runner
        first waits (the feed is then read from that id on)."""
        self.cursor_id: StreamId = (0, 0)
        self.cursor_arg = b""
        self.buffer: deque[Entry] = deque()
        """Entries after what the runner took, up to the cursor, in order, with no gap."""
        self.catch_ups = 0
        """Catch-up calls in flight that cover this feed."""
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

    async def read_after(self, after: str, timeout: float | None = None) -> list[Entry]:
        """Up to ``count`` entries newer than ``after`` (the newest entry the runner has seen),
        waiting up to ``timeout`` seconds for one (by default about ``block_ms``: ``wait_s``;
        ``math.inf``: until one comes). [] if none came, or if ``interrupt`` ended the wait.
        Cancelling it cancels this wait only. Raises what the server answered if it refused
        a read of this feed."""
        self._raise_error()
        self._advance(after)
        if not self.buffer:
            wait = self.reader.wait_s() if timeout is None else timeout
            self._wake = asyncio.get_running_loop().create_future()
            self.reader.waits(self)
            try:
                async with asyncio.timeout(None if wait == math.inf else wait):
                    await self._wake
            except TimeoutError:
                pass
            finally:
                self._wake = None
                self.reader.waited(self)
            self._raise_error()
        taken = [self.buffer.popleft() for _ in range(min(self.reader.count, len(self.buffer)))]
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
        """Entries a call covering this feed read, in order, right after the id it was given
        (at most this feed's cursor): keep those after the cursor."""
        if self.closed or not entries:
            return
        start = 0
        while start < len(entries) and stream_id(entries[start][0]) <= self.cursor_id:
            start += 1
        if start == len(entries):
            return
        self.buffer.extend(entries[start:] if start else entries)
        self._move_cursor(entries[-1][0], stream_id(entries[-1][0]))
        self.wake()

    def fail(self, exc: BaseException) -> None:
        """The server refused a call covering this feed: the runner's wait raises ``exc``."""
        if not self.closed:
            self._error = exc
            self.wake()

    def wake(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def interrupt(self) -> None:
        """End the runner's wait in progress, if any, now (it returns what is buffered)."""
        self.wake()

    def _advance(self, after: str) -> None:
        """Forget what the runner has seen (it may have read it with the fenced script)."""
        after_id = stream_id(after)
        while self.buffer and stream_id(self.buffer[0][0]) <= after_id:
            self.buffer.popleft()
        if self.cursor is None or after_id > self.cursor_id:
            self._move_cursor(after, after_id)

    def _move_cursor(self, entry_id: str, parsed: StreamId) -> None:
        self.cursor, self.cursor_id, self.cursor_arg = entry_id, parsed, bulk(entry_id.encode())

    def _raise_error(self) -> None:
        if self._error is not None:
            exc, self._error = self._error, None
            raise exc


class Group:
    """Feeds read by one main call of the reader (see ``InboxReader._group_for``)."""

    __slots__ = ("busy", "covered", "feeds", "streams")

    def __init__(self) -> None:
        self.feeds: dict[InboxFeed, None] = {}
        """Its open feeds, in the order opened."""
        self.streams: dict[bytes, int] = {}
        """Its streams, each with the number of its feeds (two runners of one shard share one)."""
        self.busy = False
        """Its main call is in flight."""
        self.covered: set[InboxFeed] = set()
        """The feeds its main call in flight covers."""

    def add(self, feed: InboxFeed) -> None:
        self.feeds[feed] = None
        self.streams[feed.key] = self.streams.get(feed.key, 0) + 1

    def remove(self, feed: InboxFeed) -> None:
        if feed not in self.feeds:
            return
        del self.feeds[feed]
        left = self.streams[feed.key] - 1
        if left:
            self.streams[feed.key] = left
        else:
            del self.streams[feed.key]

"""What a shard has left to do, read for ``actors status`` and ``Client.wait_idle``: unread and
pending inbox entries, the outbox, due and later timers, deferred messages. Read only."""

from __future__ import annotations

from typing import Any

from ..keys import GROUP
from .connection import StoreBase, honours_cancel
from .records import ShardWork

DEFERRED_PAGE = 500
"""Actors whose deferred lists are measured in one round trip."""
UNREAD_SCAN = 1000
"""When the group cannot say its lag, at most this many unread entries are counted."""


@honours_cancel
class WorkStore(StoreBase):
    async def shard_work(self, shard: int, *, count_deferred: bool = True) -> ShardWork:
        """One shard's work. Its inbox, outbox and timers are read in one transaction (their
        keys share the shard's hash tag), so they show one moment: a message is in the inbox,
        in a running turn's timer, or, sent on, in the outbox. The deferred lists are measured
        after it (``count_deferred``; skipped, they count -1)."""
        k = self.keys
        now = await self.server_time_ms()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xinfo_groups(k.inbox(shard))
            pipe.xlen(k.inbox(shard))
            # The outbox's first and last entries come with it: it is empty most of the time
            # (forwarding deletes what it forwarded), where the inbox keeps handled entries.
            pipe.xinfo_stream(k.outbox(shard))
            pipe.xlen(k.outbox(shard))
            pipe.zcount(k.timers(shard), "-inf", now)
            pipe.zcount(k.timers(shard), f"({now}", "+inf")
            groups, inbox_len, outbox, outbox_len, due, later = await pipe.execute(raise_on_error=False)
        unread, pending, added = await self._inbox(shard, _group(groups), _int(inbox_len))
        deferred = await self._deferred(shard) if count_deferred else -1
        added += _added(outbox)
        left = _int(outbox_len)
        return ShardWork(shard, unread, pending, left, deferred, _int(due), _int(later), added, now)

    async def _inbox(self, shard: int, group: dict[Any, Any] | None, length: int) -> tuple[int, int, int]:
        """Inbox entries not delivered yet, delivered and not acked, and ever added."""
        if group is None:  # no worker ever held the shard: nothing was delivered, or deleted
            return length, 0, length
        pending = int(group["pending"])
        lag, read = group.get("lag"), group.get("entries-read")
        if lag is not None and read is not None:
            return int(lag), pending, int(read) + int(lag)
        # The group cannot tell (entries were deleted): count what follows its last delivery.
        last = group["last-delivered-id"]
        last = last.decode() if isinstance(last, bytes) else str(last)
        after = await self.redis.xrange(self.keys.inbox(shard), min=f"({last}", count=UNREAD_SCAN)
        info = await self.redis.xinfo_stream(self.keys.inbox(shard))
        return len(after or []), pending, _added(info)

    async def _deferred(self, shard: int) -> int:
        """Messages in the deferred lists of the shard's actors. Only an actor in ``timers`` can
        have one (its member stays until it has no open turn and no deferred message)."""
        total = 0
        page: list[str] = []
        async for member, _ in self.redis.zscan_iter(self.keys.timers(shard), count=DEFERRED_PAGE):
            page.append(member.decode())
            if len(page) >= DEFERRED_PAGE:
                total += await self._lengths(shard, page)
                page = []
        return total + (await self._lengths(shard, page) if page else 0)

    async def _lengths(self, shard: int, actors: list[str]) -> int:
        async with self.redis.pipeline(transaction=False) as pipe:
            for aid in actors:
                pipe.llen(self.keys.deferred(shard, aid))
            return sum(int(n) for n in await pipe.execute())


def _group(groups: Any) -> dict[Any, Any] | None:
    if isinstance(groups, Exception):
        return None  # no stream yet
    for group in groups:
        name = group["name"]
        if (name.decode() if isinstance(name, bytes) else name) == GROUP:
            return dict(group)
    return None


def _int(reply: Any) -> int:
    return 0 if isinstance(reply, Exception) else int(reply)


def _added(info: Any) -> int:
    """Entries ever added to a stream (0 if it does not exist)."""
    if isinstance(info, Exception) or not isinstance(info, dict):
        return 0
    return int(info.get("entries-added") or 0)

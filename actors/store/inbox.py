"""A shard's streams: appends to its inbox, reads of it, its outbox, dead letters, replies."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, cast

from redis.asyncio.client import Pipeline
from redis.exceptions import NoPermissionError, ResponseError

from ..codec import FIELD, replayed
from ..errors import IdempotencyConflict
from ..keys import GROUP
from . import cluster
from .connection import STALL_TIMEOUT, StoreBase, honours_cancel, is_transient, raw_reply
from .records import (
    CONFLICT,
    DeadLetter,
    Entry,
    KeyedAppend,
    ShardInfo,
    StreamRows,
    dead_letter_record,
    stream_entries,
)

LISTEN_RETRY_MAX = 2.0
"""Seconds at most between two attempts to subscribe again; after a refusal by the ACL, always."""

log = logging.getLogger("actors.store")

FENCE_TTL_MS = 1_000
"""How long a ``durable_read``'s own write lives (it only needs to be replicated or fsynced)."""


@honours_cancel
class InboxStore(StoreBase):
    async def append(self, shard: int, envelope: bytes) -> str:
        """XADD; a server that does not answer within STALL_TIMEOUT raises TimeoutError
        (the outcome is then unknown: the entry may or may not be stored). With a durability
        level it returns once the level holds (DurabilityTimeout otherwise)."""
        if self.ack.waits:
            return (await self.append_many([(shard, envelope)]))[0]
        async with asyncio.timeout(STALL_TIMEOUT):
            entry_id = cast(bytes, await self._appender.xadd(self.keys.inbox(shard), {FIELD: envelope}))
        return str(entry_id.decode())

    async def append_many(self, items: Sequence[tuple[int, bytes] | KeyedAppend]) -> list[str]:
        """Append many envelopes in one pipelined round trip, in order (bounded as ``append``),
        followed on its connection by the durability level's wait, if any: one wait for all.
        A ``KeyedAppend`` goes through ``enqueue_once.lua`` as in ``append_once``: its id is its
        entry id when appended, else the first message's id. A conflicting key raises
        IdempotencyConflict once the batch has run (the batch is not atomic: the others went)."""
        once = self._scripts["enqueue_once"]

        async def queue(pipe: Pipeline) -> None:
            for item in items:
                if isinstance(item, KeyedAppend):
                    marker = self.keys.idempotency(item.shard, item.actor_id, item.key)
                    args = (item.envelope, item.message_id, item.ttl_ms, item.digest)
                    await once(keys=[self.keys.inbox(item.shard), marker], args=args, client=pipe)
                else:
                    pipe.xadd(self.keys.inbox(item[0]), {FIELD: item[1]})

        async with asyncio.timeout(STALL_TIMEOUT + self.ack.wait_seconds):
            if self.ack.waits:
                written = [self.keys.inbox(i.shard if isinstance(i, KeyedAppend) else i[0]) for i in items]
                replies = await self._acknowledged(self._appender, queue, written)
            else:
                async with self._script_pipeline(self._appender) as pipe:
                    await queue(pipe)
                    replies = await pipe.execute()
        ids: list[str] = []
        conflict: IdempotencyConflict | None = None
        for item, reply in zip(items, replies, strict=True):
            if not isinstance(item, KeyedAppend):
                ids.append(reply.decode())
                continue
            status, value = reply
            if status == CONFLICT and conflict is None:
                conflict = IdempotencyConflict(item.key, item.actor_id, value.decode())
            ids.append(item.message_id if status == 1 else value.decode())
        if conflict is not None:
            raise conflict
        return ids

    async def append_once(
        self, shard: int, actor_id: str, idempotency_key: str, message_id: str, envelope: bytes, ttl_ms: int,
        *, digest: str,
    ) -> tuple[bool, str]:  # fmt: skip
        """Append unless the key was seen for ``actor_id``; returns (True, entry id) or
        (False, first message id).

        ``digest`` (``codec.message_digest``) is kept with the key; a later message under
        the key with another digest raises IdempotencyConflict, and nothing is appended.
        An empty digest accepts whatever the first message held (the runtime's own keys,
        which are message or item ids).
        """
        status, value = await self._run_acknowledged(
            "enqueue_once",
            [self.keys.inbox(shard), self.keys.idempotency(shard, actor_id, idempotency_key)],
            [envelope, message_id, ttl_ms, digest],
        )
        if status == CONFLICT:
            raise IdempotencyConflict(idempotency_key, actor_id, value.decode())
        return bool(status), value.decode()

    async def remember_ask(self, shard: int, actor_id: str, message_id: str, ttl_ms: int) -> None:
        """Set the idempotency marker of a turn's ask (its id is its key) before the ask goes
        out with the turn's journal write: the reply to it is then kept as long as the
        marker (see the ``Y`` effect of ``commit.lua``), for a re-run that waits for it."""
        key = self.keys.idempotency(shard, actor_id, message_id)
        await self.redis.set(key, f":{message_id}", px=ttl_ms, nx=True)

    async def read_new(self, shard: int, lease: str, consumer: str, count: int) -> tuple[list[Entry], str]:
        """Take up to ``count`` new entries, fenced by ``lease``; returns (entries, newest id).

        Never retried: a retry after a lost reply would leave the first batch
        pending unseen. Raises LeaseLost if the lease is not held.
        """
        empty, value = await self._run(
            "read_inbox",
            [self.keys.lease(shard), self.keys.inbox(shard)],
            [lease, consumer, count],
            client=self._appender,
        )
        if empty:
            return [], value.decode()
        entries = stream_entries(value)
        return entries, entries[-1][0]

    async def claim_pending(self, shard: int, consumer: str, count: int) -> list[Entry]:
        """Take over every pending entry of the shard (the lease makes them ours), oldest first."""
        claimed: list[Entry] = []
        cursor = "0-0"
        while True:
            cursor_b, entries, deleted = await raw_reply(
                self.redis, "XAUTOCLAIM", self.keys.inbox(shard), GROUP, consumer, 0, cursor, "COUNT", count
            )
            claimed.extend(stream_entries(entries))
            if deleted:  # trimmed while pending: nothing left to handle, just ack
                await self.redis.xack(self.keys.inbox(shard), GROUP, *deleted)
            cursor = cursor_b.decode() if isinstance(cursor_b, bytes) else str(cursor_b)
            if cursor == "0-0":
                return claimed

    async def trim_inbox(self, shard: int) -> tuple[int, int]:
        """Drop the entries every reader is done with; returns (entries removed, entries
        pending: those and the ones after them stay)."""
        removed, pending = await self._run("trim_inbox", [self.keys.inbox(shard)], [])
        return int(removed), int(pending)

    async def read_outbox(self, shard: int, count: int, after: str = "-") -> list[tuple[str, int, bytes]]:
        """Up to ``count`` outbox entries (after entry id ``after``, exclusive, if given)."""
        start = after if after == "-" else f"({after}"
        rows = cast("StreamRows", await self.redis.xrange(self.keys.outbox(shard), min=start, count=count))
        return [(i.decode(), int(f[b"s"]), f[FIELD]) for i, f in rows]

    async def forward(self, source: int, target: int, items: Sequence[tuple[str, bytes]]) -> int:
        args: list[Any] = [source]
        for entry_id, envelope in items:
            args += [entry_id, envelope]
        return int(await self._run("forward", [self.keys.inbox(target), self.keys.forwarded(target)], args))

    async def delete_outbox(self, shard: int, entry_ids: Sequence[str]) -> None:
        if entry_ids:
            await self.redis.xdel(self.keys.outbox(shard), *entry_ids)

    async def listen(
        self, channel: str, on_message: Callable[[bytes], None], subscribed: asyncio.Event | None = None
    ) -> None:
        """Call ``on_message`` with every message published on ``channel``, until cancelled.

        Resubscribes with backoff after a connection loss; ``subscribed`` is set each
        time the subscription is (re)made. Messages published while it is down are lost,
        so callers also look at the stored state now and then.
        """
        delay = 0.05
        refused = False
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(channel)
                if subscribed is not None:
                    subscribed.set()
                async for message in pubsub.listen():
                    if message.get("type") == "subscribe":  # the server confirmed it
                        delay, refused = 0.05, False
                    elif message.get("type") == "message":
                        on_message(message["data"])
            except asyncio.CancelledError:
                raise
            except NoPermissionError as exc:  # the user's ACL: said once, retried slowly
                if not refused:
                    log.error(
                        "may not subscribe to %s (%s): the Redis user needs the namespace's "
                        "channels (&%s:*); trying again every %ss",
                        channel, exc, self.keys.namespace, LISTEN_RETRY_MAX,
                    )  # fmt: skip
                refused, delay = True, LISTEN_RETRY_MAX
                await asyncio.sleep(delay)
            except Exception as exc:
                if not is_transient(exc):
                    log.exception("listening on %s failed; subscribing again", channel)
                log.debug("listening on %s: %r; subscribing again in %.2fs", channel, exc, delay)
                await asyncio.sleep(delay)
                await cluster.refresh(self.redis)  # the channel's node may have failed over
                delay = min(delay * 2, LISTEN_RETRY_MAX)
            finally:
                # PubSub.aclose is unannotated in redis-py (it returns None).
                await asyncio.gather(pubsub.aclose(), return_exceptions=True)

    async def get_reply(self, shard: int, message_id: str) -> bytes | None:
        """The stored reply to an ask (None: none yet). With a durability level, one found is
        returned only once the level holds for the commit that stored it (``durable_read``)."""
        value = cast("bytes | None", await self.redis.get(self.keys.reply(shard, message_id)))
        if value is not None and self.ack.waits:
            await self.durable_read(shard)
        return value if value is None else bytes(value)

    async def durable_read(self, shard: int) -> None:
        """Return once the durability level holds for every write the caller has read on the
        shard. WAIT and WAITAOF wait only for their own connection's writes, so this writes one
        of its own (``Keys.fence``, gone after a second), which the server orders after what was
        read, and waits for that."""

        def queue(pipe: Pipeline) -> None:
            pipe.set(self.keys.fence(shard), b"", px=FENCE_TTL_MS)

        await self._acknowledged(self.redis, queue, [self.keys.fence(shard)])

    async def dead_letters(self, shard: int, count: int, start: str = "-") -> list[DeadLetter]:
        found = await self.redis.xrange(self.keys.dead_letters(shard), min=start, count=count)
        rows = cast("StreamRows", found)
        return [dead_letter_record(i, f) for i, f in rows]

    async def dead_letter_count(self, shard: int) -> int:
        return int(await self.redis.xlen(self.keys.dead_letters(shard)))

    async def newest_dead_letters(self, shard: int, count: int) -> list[DeadLetter]:
        """The shard's newest ``count`` dead letters, oldest first."""
        found = await self.redis.xrevrange(self.keys.dead_letters(shard), count=count)
        rows = cast("StreamRows", found)
        return [dead_letter_record(i, f) for i, f in reversed(rows)]

    async def replay_dead_letter(self, shard: int, dlq_id: str) -> str | None:
        """Append the dead letter to its shard's inbox again and delete it; returns the new
        entry id, or None if there is no such dead letter. The message keeps its id and
        gets its replay generation raised (``codec.replayed``), so its turn asks afresh."""
        found = await self.dead_letters(shard, 1, start=dlq_id)
        if not found or found[0].id != dlq_id:
            return None
        new_id = await self._run_acknowledged(
            "replay_dead_letter",
            [self.keys.dead_letters(shard), self.keys.inbox(shard)],
            [dlq_id, replayed(found[0].envelope)],
        )
        return new_id.decode() if new_id else None

    async def drop_dead_letter(self, shard: int, dlq_id: str) -> bool:
        return bool(await self.redis.xdel(self.keys.dead_letters(shard), dlq_id))

    async def trim_dead_letters(self, shard: int, before_ms: int | None = None) -> int:
        """Delete the shard's dead letters written before ``before_ms`` (Redis clock; their
        stream ids say when), or all of them if None; returns how many went. Exact (no ``~``):
        a dead letter never outlives its bound by a stream node's newest entry."""
        key = self.keys.dead_letters(shard)
        if before_ms is None:
            return int(await self.redis.xtrim(key, maxlen=0, approximate=False))
        return int(await self.redis.xtrim(key, minid=f"{max(0, before_ms)}-0", approximate=False))

    async def age_dead_letters(self, shard: int, before_ms: int) -> int | None:
        """``trim_dead_letters(shard, before_ms)``, then when (ms, Redis clock) the oldest dead
        letter left was written, in one round trip; None if none is left."""
        key = self.keys.dead_letters(shard)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xtrim(key, minid=f"{max(0, before_ms)}-0", approximate=False)
            pipe.xrange(key, count=1)
            _, oldest = await pipe.execute()
        return int(oldest[0][0].partition(b"-")[0]) if oldest else None

    async def drop_namespace(self) -> int:
        """Delete every key of this namespace (``actors bench`` cleans up with it)."""
        dropped = 0
        batch: list[bytes] = []
        async for key in self.redis.scan_iter(match=f"{self.keys.namespace}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                dropped += await self.redis.unlink(*batch)
                batch.clear()
        if batch:
            dropped += await self.redis.unlink(*batch)
        return dropped

    async def shard_info(self, shard: int) -> ShardInfo:
        k = self.keys
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(k.lease(shard))
            pipe.get(k.epoch(shard))
            pipe.xlen(k.inbox(shard))
            pipe.xlen(k.dead_letters(shard))
            pipe.hlen(k.turns(shard))
            lease, epoch, length, dead, open_turns = await pipe.execute()
        lag: int | None = None
        pending = read = 0
        try:
            for group in await self.redis.xinfo_groups(k.inbox(shard)):
                if group["name"] == GROUP.encode():
                    lag = group.get("lag")
                    pending = int(group["pending"])
                    read = int(group.get("entries-read") or 0)
        except ResponseError:  # no stream yet
            pass
        owner = lease.decode().rpartition("|")[0] if lease else None
        return ShardInfo(
            shard, owner, int(epoch or 0), int(length), lag, pending, int(dead), read, int(open_turns)
        )

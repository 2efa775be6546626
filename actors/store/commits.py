"""A shard's actors: their state, the commit script, open turns, timers and schedules."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import msgpack  # type: ignore[import-untyped]  # msgpack ships no type information

from ..codec import decode_envelope
from ..errors import DecodeError
from .connection import StoreBase, honours_cancel, is_transient
from .records import DUPLICATE, LoadedActor, StoredTurn, Take, Write

log = logging.getLogger("actors.store")


@honours_cancel
class CommitStore(StoreBase):
    async def load_actors(self, shard: int, actor_ids: Sequence[str]) -> list[LoadedActor]:
        """Snapshots, timers and open turns of actors, in one round trip."""
        if not actor_ids:
            return []
        ids = list(actor_ids)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(self.keys.state(shard), ids)
            pipe.zmscore(self.keys.timers(shard), ids)
            pipe.hmget(self.keys.turns(shard), ids)
            snapshots, timers, turns = await pipe.execute()
        journals = await self.journals(shard, [aid for aid, turn in zip(ids, turns, strict=True) if turn])
        return [
            LoadedActor(snapshot, None if timer is None else int(timer), turn, journals.get(aid))
            for aid, snapshot, timer, turn in zip(ids, snapshots, timers, turns, strict=True)
        ]

    async def journals(self, shard: int, actor_ids: Sequence[str]) -> dict[str, list[bytes]]:
        """The journal lists of actors with open turns (message, then records), one round
        trip; a turn written before lists has none (its header holds everything)."""
        if not actor_ids:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for aid in actor_ids:
                pipe.lrange(self.keys.journal(shard, aid), 0, -1)
            found = await pipe.execute()
        return {aid: [bytes(item) for item in items] for aid, items in zip(actor_ids, found, strict=True)}

    async def load_state(self, shard: int, actor_id: str) -> bytes | None:
        value = cast("bytes | None", await self.redis.hget(self.keys.state(shard), actor_id))
        return value if value is None else bytes(value)

    async def commit(
        self, shard: int, lease: str, writes: Sequence[Write], reply_ttl_ms: int, take: Take | None = None,
        dead_letters_max: int = 0,
    ) -> list[int]:  # fmt: skip
        """Apply writes atomically, after taking ``take``'s entries into the group; returns per
        write DUPLICATE, DONE or BACKLOG. Dead letters beyond ``dead_letters_max`` (0: no bound)
        are trimmed as new ones are written.

        Raises LeaseLost if the lease is not held at ``lease`` (nothing is taken or written),
        Diverged if the entries to take are not the next ones in the group (no write is
        applied; what the script's read took stays pending, for the restarted runner). With a
        durability level it returns once the level holds for the batch, and only then are its
        replies published; DurabilityTimeout if it does not hold in time (the batch is applied).
        """
        k = self.keys
        keys = [k.lease(shard), k.inbox(shard), k.state(shard), k.outbox(shard)]
        keys += [k.turns(shard), k.timers(shard), k.dead_letters(shard), k.deliveries(shard)]
        # With a durability level an asker must not hear of a commit before it is durable: the
        # script stores the replies, and they are published once the level holds (below).
        publish_late = self.ack.waits
        values: list[Any] = []
        idle: dict[str, int] = {}  # actor type -> KEYS position of its idle set
        for w in writes:
            deferred_index = 0
            if w.uses_deferred:
                keys.append(k.deferred(shard, w.actor_id))
                deferred_index = len(keys)
            effects: list[list[Any]] = [["L", e] for e in w.local] if w.local else []
            if w.remote:
                effects += [["R", target, e] for target, e in w.remote]
            if w.acks:
                effects += [["A", entry_id] for entry_id in w.acks]
            if w.unlists or w.defers or w.origin == "q":
                effects += self._deferral_effects(shard, w, keys)
            if w.dead:
                effects += [["D", *dead] for dead in w.dead]
            if w.reply_key is not None:
                keys.append(w.reply_key)
                reply_index = len(keys)
                if w.reply_marker is not None:
                    keys.append(w.reply_marker)
                marker_index = len(keys) if w.reply_marker is not None else 0
                channel = "" if publish_late else w.reply_channel or ""
                effects.append(["Y", reply_index, marker_index, channel, w.reply])
            if w.op == "j":
                keys.append(k.journal(shard, w.actor_id))
                effects.append(["J", w.open_turn, w.score, len(keys), w.journal_keep,
                                len(w.journal_items), *w.journal_items])  # fmt: skip
            elif w.origin == "o" and w.op in ("c", "d"):
                keys.append(k.journal(shard, w.actor_id))
                effects.append(["K", len(keys)])
            if w.op == "d":
                effects.append(["D", w.envelope, w.ref if w.origin == "i" else "", w.reason, w.detail])
            if w.forget_delivery:
                effects.append(["X"])
            if w.retained:
                effects.append(["I", self._idle_index(shard, w.actor_id, keys, idle)])
            snapshot = w.snapshot if w.snapshot is not None else b""
            values += [w.op, w.actor_id, w.origin, w.ref, deferred_index, snapshot, len(effects)]
            for effect in effects:
                values += effect
        # One argument rather than thousands: packing arguments is the client's main cost.
        # Lua's cmsgpack reads only the old raw type, so bytes go as msgpack "raw" strings.
        packed = msgpack.packb(values, use_bin_type=False)
        taking = [take.consumer, take.newest, take.count] if take else ["", "", 0]
        args = [lease, reply_ttl_ms, len(writes), packed, *taking, dead_letters_max]
        results = [int(r) for r in await self._run_acknowledged("commit", keys, args)]
        if publish_late:
            await self._publish_replies(
                [(w.reply_channel, w.reply) for w, r in zip(writes, results, strict=True)
                 if r != DUPLICATE and w.reply_key is not None and w.reply_channel]
            )  # fmt: skip
        return results

    async def _publish_replies(self, replies: Sequence[tuple[str, bytes]]) -> None:
        """Publish the replies of durable commits, best effort like the script's own publish: an
        asker that misses one reads the stored reply (``get_reply``) within a second."""
        if not replies:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for channel, reply in replies:
                    # A command, not pipe.publish: a cluster pipeline refuses that method (a
                    # PUBLISH on any node reaches subscribers on every node).
                    pipe.execute_command("PUBLISH", channel, reply)
                await pipe.execute(raise_on_error=False)  # a refused channel (ACL) refuses only its reply
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning(
                "could not publish %d replies (%r); their askers read them from Redis", len(replies), exc
            )

    def _idle_index(self, shard: int, actor_id: str, keys: list[str], idle: dict[str, int]) -> int:
        """The KEYS position of the idle set of the actor's type (added to ``keys`` once per batch)."""
        actor_type = actor_id.partition("/")[0]
        if actor_type not in idle:
            keys.append(self.keys.idle(shard, actor_type))
            idle[actor_type] = len(keys)
        return idle[actor_type]

    async def count_delivery(self, shard: int, lease: str, actor_id: str, delivery: str, mode: str) -> int:
        """Count a start of a recovered turn, ``look`` at the count, or ``forgive`` the next
        start (see ``count_delivery.lua``); returns the starts of ``delivery`` counted.
        Never retried: a lost reply restarts the runner."""
        keys = [self.keys.lease(shard), self.keys.deliveries(shard)]
        args = [lease, actor_id, delivery, mode]
        return int(await self._run("count_delivery", keys, args, client=self._appender))

    def _deferral_effects(self, shard: int, w: Write, keys: list[str]) -> list[list[Any]]:
        """The effects that keep the actor's deferred list and its per-type indexes (whose
        keys join ``keys``): consumed messages leave them, deferred ones join them, a taken
        head leaves its type's index."""
        k = self.keys
        indexes: dict[str, int] = {}  # message type -> KEYS position of its index (this actor's)

        def index(message_type: str) -> int:
            if message_type not in indexes:
                keys.append(k.deferred_of_type(shard, w.actor_id, message_type))
                indexes[message_type] = len(keys)
            return indexes[message_type]

        effects: list[list[Any]] = [["U", d.envelope, index(d.message_type), d.arrived] for d in w.unlists]
        effects += [["F", d.arrived, d.envelope, index(d.message_type)] for d in w.defers]
        head_type = _type_of(w.ref) if w.origin == "q" and isinstance(w.ref, bytes) else ""
        if head_type:
            effects.append(["H", index(head_type)])  # the head it takes leaves its index too
        return effects

    async def deferred(self, shard: int, actor_id: str, count: int) -> list[bytes]:
        """The first ``count`` messages deferred behind an actor's open turn, in order."""
        envelopes = await self.redis.lrange(self.keys.deferred(shard, actor_id), 0, count - 1)
        return list(cast("list[bytes]", envelopes))

    async def deferred_of_type(self, shard: int, actor_id: str, message_type: str) -> list[tuple[str, bytes]]:
        """Every message of ``message_type`` deferred behind an actor's turn, in arrival order,
        as (inbox entry id it arrived with, envelope)."""
        items = await self.redis.lrange(self.keys.deferred_of_type(shard, actor_id, message_type), 0, -1)
        found: list[tuple[str, bytes]] = []
        for item in cast("list[bytes]", items):
            arrived, _, envelope = bytes(item).partition(b"|")
            found.append((arrived.decode(), envelope))
        return found

    async def open_turn(self, shard: int, actor_id: str) -> tuple[StoredTurn | None, int]:
        """An actor's open turn (None if it has none) and how many messages wait behind it."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hget(self.keys.turns(shard), actor_id)
            pipe.lrange(self.keys.journal(shard, actor_id), 0, -1)
            pipe.llen(self.keys.deferred(shard, actor_id))
            turn, journal, deferred = await pipe.execute()
        stored = None if turn is None else StoredTurn(actor_id, turn, [bytes(i) for i in journal])
        return stored, int(deferred)

    async def open_turns(self, shard: int, limit: int) -> list[StoredTurn]:
        """Up to ``limit`` open turns of the shard, in no set order."""
        found: list[tuple[str, bytes]] = []
        async for actor, turn in self.redis.hscan_iter(self.keys.turns(shard), count=500):
            found.append((actor.decode(), turn))
            if len(found) >= limit:
                break
        journals = await self.journals(shard, [aid for aid, _ in found])
        return [StoredTurn(aid, turn, journals[aid]) for aid, turn in found]

    async def timers_at_zero(self, shard: int, batch: int) -> AsyncIterator[list[str]]:
        """Batches of the actors whose timer is 0 (needing attention now), as a new owner
        must wake them all. ZSCAN returns every member present throughout at least once,
        however many there are and whatever changes meanwhile."""
        found: list[str] = []
        async for member, score in self.redis.zscan_iter(self.keys.timers(shard), count=batch):
            if score == 0:
                found.append(member.decode())
                if len(found) >= batch:
                    yield found
                    found = []
        if found:
            yield found

    async def due_timers(self, shard: int, lease: str, limit: int) -> tuple[int, int | None, list[str]]:
        """Take due timers (setting them to 0); returns (Redis now ms, next due ms, actor ids).

        Never retried: a retry after a lost reply would find nothing due, and the timers the
        first call took would sit at 0 unseen; the caller's runner restarts instead, and
        finds them with ``timers_at_zero``."""
        now, later, *due = await self._run(
            "due_timers", [self.keys.lease(shard), self.keys.timers(shard)], [lease, limit],
            client=self._appender,
        )  # fmt: skip
        return int(now), None if int(later) < 0 else int(later), [a.decode() for a in due]

    async def idle_actors(
        self, shard: int, actor_type: str, before_ms: int, offset: int, count: int
    ) -> list[str]:
        """Up to ``count`` actors of ``actor_type`` whose last turn ended at or before
        ``before_ms`` (Redis clock), oldest first, skipping the first ``offset``."""
        found = await self.redis.zrangebyscore(
            self.keys.idle(shard, actor_type), "-inf", before_ms, start=offset, num=count
        )
        return [aid.decode() for aid in cast("list[bytes]", found)]

    async def oldest_idle(self, shard: int, actor_type: str) -> int | None:
        """When (ms, Redis clock) the oldest idle mark of ``actor_type`` was set; None if none is."""
        found = await self.redis.zrange(self.keys.idle(shard, actor_type), 0, 0, withscores=True)
        return int(found[0][1]) if found else None

    async def expire_idle(
        self, shard: int, lease: str, actor_type: str, retention_ms: int, actor_ids: Sequence[str]
    ) -> list[str]:
        """Delete the states of those of ``actor_ids`` (of ``actor_type``) idle for at least
        ``retention_ms`` by Redis's clock, with no open turn and no timer; returns their ids
        (see ``expire_idle.lua``). Raises LeaseLost if the lease is not held at ``lease``."""
        k = self.keys
        keys = [k.lease(shard), k.state(shard), k.idle(shard, actor_type), k.turns(shard)]
        keys += [k.timers(shard), k.deliveries(shard)]
        deleted = await self._run("expire_idle", keys, [lease, retention_ms, *actor_ids])
        return [aid.decode() for aid in deleted]

    async def schedule_marks(self, shard: int, fields: Sequence[str], now_ms: int) -> list[int]:
        """The newest slot done of each schedule field, recording ``now_ms`` for new ones."""
        key = self.keys.schedules(shard)
        async with self.redis.pipeline(transaction=False) as pipe:
            for field in fields:
                pipe.hsetnx(key, field, now_ms)
            pipe.hmget(key, list(fields))
            *_, marks = await pipe.execute()
        return [int(m) for m in marks]

    async def fire_schedule(
        self, shard: int, lease: str, field: str, newest_ms: int, ticks: Sequence[tuple[int, bytes]]
    ) -> tuple[int, int]:
        """Append the ticks not yet fired and record ``newest_ms`` if it is due by Redis's clock;
        returns (Redis now ms, newest slot recorded)."""
        k = self.keys
        args: list[Any] = [lease, field, newest_ms, len(ticks)]
        for slot, envelope in ticks:
            args += [slot, envelope]
        now, mark = await self._run(
            "fire_schedule", [k.lease(shard), k.schedules(shard), k.inbox(shard)], args
        )
        return int(now), int(mark)


def _type_of(envelope: bytes) -> str:
    """The message type of a deferred head ('' if it does not decode: then it was never
    deferred by a write that indexed it)."""
    try:
        return decode_envelope(envelope).type
    except DecodeError:
        return ""

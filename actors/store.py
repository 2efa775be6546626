"""Every Redis call the runtime makes, and nothing else. No other module imports redis.

The store speaks bytes and small typed records; encoding stays in ``codec``.
Scripts are ``.lua`` files in ``actors/scripts``, registered once and called by
SHA (redis-py reloads a script the server lost, e.g. after a restart).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar, cast

import msgpack  # type: ignore[import-untyped]  # msgpack ships no type information
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT, FieldT

from .codec import FIELD, Malformed, entry_envelope
from .errors import ConfigurationError, Diverged, IdempotencyConflict, LeaseLost
from .keys import GROUP, Keys
from .lease import Lease

log = logging.getLogger("actors.store")

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, OSError)
"""Errors after which a call's outcome is unknown and the connection is retried."""


LOOP_LAG_WARNING = 1.0
"""Seconds beyond a renew interval that the event loop may not run before it is reported."""

STALL_TIMEOUT = 30.0
"""Seconds a send, or a supervisor tick, waits for a server that does not answer (calls have
no socket timeout of their own)."""

_CONFLICT = 2
"""``enqueue_once.lua``'s status for a key accepted for a message with another digest."""


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT_ERRORS) or (
        isinstance(exc, ResponseError) and str(exc).startswith(("LOADING", "BUSY", "TRYAGAIN"))
    )


def honour_cancel() -> None:
    """Raise CancelledError if the current task was cancelled.

    On Python 3.11, redis-py's socket timeouts use ``asyncio.wait_for``, which can
    return a finished result and drop a cancellation that arrived at the same
    moment. Every public Store method calls this after its Redis call (see
    ``_honours_cancel``), so loops that call Redis still stop when cancelled.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError()


def _script_text(name: str) -> str:
    return resources.files("actors").joinpath("scripts", f"{name}.lua").read_text()


T = TypeVar("T")

Entry = tuple[str, bytes | Malformed]
"""An inbox entry: its stream id and its envelope bytes (Malformed unless it has exactly one
``e`` field). Every read path builds it from the fields as the server sent them
(``_stream_entries``), so none can take another of two ``e`` fields than the others."""

_RAW_REPLY = "actors_raw_reply"
"""An option of the XREAD and XAUTOCLAIM calls of ``Store``: keep the reply as the server sent
it. redis-py's own parsing turns an entry's fields into a dict, which keeps only the last of
two fields with one name."""

_StreamRows = list[tuple[bytes, dict[bytes, bytes]]]
"""What XRANGE returns to our clients. redis-py types replies as ``bytes | str`` (and stream
entries as possibly None) for every client; ours never decode responses (see ``_client``),
so the casts below state what the replies are."""


@dataclass(frozen=True, slots=True)
class Take:
    """Inbox entries a runner saw with ``read_after``: the ``count`` after the group's last
    delivered one, up to ``newest``, to take into the group as ``consumer``'s."""

    consumer: str
    newest: str
    count: int


@dataclass(frozen=True, slots=True)
class Write:
    """One write of the commit script: a turn's outcome or progress (see scripts/commit.lua).

    ``op``: ``c`` commit, ``j`` journal an open turn, ``d`` dead-letter, ``f`` defer,
    ``s`` settle. ``origin`` says where the message lives: ``i`` inbox entry ``ref``,
    ``o`` the actor's open turn, ``q`` head of its deferred list (``ref`` is the
    envelope), ``n`` nowhere (defer and settle).
    """

    op: str
    actor_id: str
    origin: str = "n"
    ref: str | bytes = ""
    snapshot: bytes | None = None
    local: Sequence[bytes] = ()
    remote: Sequence[tuple[int, bytes]] = ()
    reply_key: str | None = None
    reply_channel: str | None = None
    reply: bytes = b""
    open_turn: bytes = b""
    score: int = 0
    envelope: bytes = b""
    """The message a dead-letter write keeps."""
    reason: str = ""
    detail: str = ""
    acks: Sequence[str] = ()
    """Inbox entries the turn consumed (``wait_for`` matches), acked with it."""
    unlists: Sequence[bytes] = ()
    """Deferred envelopes the turn consumed, removed from the actor's list."""
    defers: Sequence[tuple[str, bytes]] = ()
    """Inbox (entry id, envelope) pairs moved behind the actor's open turn."""
    item: tuple[str, str, str] | None = None
    """(limiter, item id, dedup id) of the queued item whose turn this write ends."""
    forget_delivery: bool = False
    """The actor's recovered turn was counted (``count_delivery``): this write ends it."""

    @property
    def uses_deferred(self) -> bool:
        return self.origin in ("o", "q") or self.op in ("f", "s") or bool(self.unlists or self.defers)


RELEASED, QUEUED = "released:", "queued:"
"""Prefixes of the limiter events: a slot was given back, or an item was queued."""

DUPLICATE, DONE, BACKLOG = 0, 1, 2
"""Results of a write: taken before (nothing done); done; done and deferred messages remain."""


@dataclass(frozen=True, slots=True)
class LoadedActor:
    snapshot: bytes | None
    timer: int | None
    """Its score in the timers index (0: needs attention now), None if it has none."""
    open_turn: bytes | None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: str
    entry_id: str
    envelope: bytes
    reason: str
    detail: str
    at_ms: int


@dataclass(frozen=True, slots=True)
class ShardInfo:
    shard: int
    owner: str | None
    epoch: int
    length: int
    lag: int | None
    pending: int
    dead_letters: int
    read: int = 0
    """Entries ever delivered to the workers' group (handled = read - pending)."""
    open_turns: int = 0


@dataclass(frozen=True, slots=True)
class OutItem:
    """A dispatched queued item with a dedup id (its ``out`` record): where it went."""

    item_id: str
    shard: int
    actor_id: str
    dedup_id: str
    entry_id: str
    """Its inbox entry; '' if unknown (then only its open turn and deferred list are looked at)."""
    envelope: bytes


def _honours_cancel(cls: type[T]) -> type[T]:
    """Make every public coroutine method of ``cls`` raise CancelledError if its task was
    cancelled while it ran, even if redis-py dropped the cancellation (see honour_cancel)."""
    for name, fn in list(vars(cls).items()):
        if name.startswith("_") or not inspect.iscoroutinefunction(fn):
            continue

        def wrap(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            @functools.wraps(fn)
            async def call(*args: Any, **kwargs: Any) -> Any:
                result = await fn(*args, **kwargs)
                honour_cancel()
                return result

            return call

        setattr(cls, name, wrap(fn))
    return cls


@_honours_cancel
class Store:
    """Typed access to the runtime's Redis keys for one namespace."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        appender: aioredis.Redis | None = None,
        url: str | None = None,
    ) -> None:
        self.redis = client
        """For calls that are safe to repeat: it retries after a connection error."""
        _allow_raw_replies(client)
        self._appender = appender or client
        """For calls whose retry after a lost reply would not be a no-op (plain XADDs, the fenced
        read and the timer script): it never retries them."""
        self.keys = keys
        self.url = url
        """Where the clients connect, if known (a LeaseKeeper needs it)."""
        self._scripts = {
            name: client.register_script(_script_text(name))
            for name in (
                "acquire_lease",
                "renew_lease",
                "release_lease",
                "commit",
                "count_delivery",
                "due_timers",
                "fire_schedule",
                "limiter_acquire",
                "limiter_release",
                "queue_dispatch",
                "queue_dispatched",
                "queue_done",
                "queue_enqueue",
                "queue_checks",
                "item_alive",
                "enqueue_once",
                "forward",
                "replay_dead_letter",
                "trim_inbox",
                "read_inbox",
            )
        }

    @classmethod
    def from_url(cls, url: str, namespace: str) -> Store:
        return cls(_client(url, retries=3), Keys(namespace), appender=_client(url, retries=0), url=url)

    def lease_keeper(self, worker_id: str, ttl_ms: int, interval: float, stall_limit: float,
                     leases: Callable[[], dict[int, Lease]], alive: Callable[[], float],
                     lost: Callable[[dict[int, Lease]], object],
                     slots: Callable[[], list[tuple[str, str]]] = list,
                     describe: Callable[[], str] = str) -> LeaseKeeper | None:  # fmt: skip
        """A LeaseKeeper for this store's server and namespace (None if its URL is unknown)."""
        if self.url is None:
            return None
        return LeaseKeeper(self.url, self.keys, worker_id, ttl_ms, interval, stall_limit,
                           leases, alive, lost, slots, describe)  # fmt: skip

    async def close(self) -> None:
        await self.redis.aclose()
        if self._appender is not self.redis:
            await self._appender.aclose()

    async def _run(
        self, name: str, keys: Sequence[str], args: Sequence[Any], client: aioredis.Redis | None = None
    ) -> Any:
        """Call a script by SHA (redis-py loads it again if the server lost it).

        Fenced scripts (their first key is the lease) fail with FENCED when the
        lease is not held at the expected epoch: that becomes LeaseLost. DIVERGED
        (commit.lua) becomes Diverged.
        """
        try:
            return await self._scripts[name](keys=list(keys), args=list(args), client=client)
        except ResponseError as exc:
            if str(exc).startswith("FENCED"):
                raise LeaseLost(f"{name} refused: {keys[0]} is no longer held at {args[0]!r}") from None
            if str(exc).startswith("DIVERGED"):
                raise Diverged(f"{name} refused: {exc}") from None
            raise

    # ---- cluster metadata ------------------------------------------------
    async def shard_count(self, wanted: int | None, default: int | None) -> int:
        """The namespace's shard count, recording ``wanted`` (or ``default``) if none is yet.

        Raises ConfigurationError if ``wanted`` differs from the record, or if
        nothing is recorded and there is nothing to record.
        """
        meta = self.keys.meta()
        proposal = wanted if wanted is not None else default
        if proposal is not None:
            await self.redis.hsetnx(meta, "shards", proposal)
        raw = await self.redis.hget(meta, "shards")
        if raw is None:
            raise ConfigurationError(
                f"namespace {self.keys.namespace!r} has no shard count yet: no worker or client has used it"
            )
        recorded = int(raw)
        if wanted is not None and recorded != wanted:
            raise ConfigurationError(
                f"Redis records {recorded} shards for namespace {self.keys.namespace!r}, "
                f"but this process is configured with {wanted}; use --shards {recorded} "
                "(the shard count of a namespace cannot change)"
            )
        return recorded

    async def server_time_ms(self) -> int:
        seconds, micros = await self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    # ---- membership and leases ------------------------------------------
    async def heartbeat(self, worker_id: str, ttl_ms: int, info: dict[str, str]) -> list[str]:
        """Refresh this worker's membership; returns every live worker id (sorted)."""
        now = await self.server_time_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(self.keys.workers(), {worker_id: now + ttl_ms})
            pipe.zremrangebyscore(self.keys.workers(), "-inf", now)
            # redis-py's Mapping[FieldT, ...] is invariant in its key, so dict[str, str] needs the cast.
            pipe.hset(self.keys.worker_info(worker_id), mapping=cast("Mapping[FieldT, EncodableT]", info))
            pipe.pexpire(self.keys.worker_info(worker_id), ttl_ms)
            pipe.zrangebyscore(self.keys.workers(), now, "+inf")
            *_, live = await pipe.execute()
        return sorted(i.decode() for i in live)

    async def leave(self, worker_id: str) -> None:
        await self.redis.zrem(self.keys.workers(), worker_id)
        await self.redis.delete(self.keys.worker_info(worker_id))

    async def worker_infos(self, worker_ids: Sequence[str]) -> list[dict[str, str]]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for worker_id in worker_ids:
                pipe.hgetall(self.keys.worker_info(worker_id))
            infos = await pipe.execute()
        return [{k.decode(): v.decode() for k, v in info.items()} for info in infos]

    async def live_workers(self) -> list[str]:
        now = await self.server_time_ms()
        ids = cast("list[bytes]", await self.redis.zrangebyscore(self.keys.workers(), now, "+inf"))
        return sorted(i.decode() for i in ids)

    async def acquire_lease(self, shard: int, worker_id: str, ttl_ms: int) -> int | None:
        k = self.keys
        epoch = await self._run(
            "acquire_lease", [k.lease(shard), k.epoch(shard), k.inbox(shard)], [worker_id, ttl_ms]
        )
        return None if int(epoch) < 0 else int(epoch)

    async def renew_leases(self, leases: dict[int, str], ttl_ms: int) -> dict[int, bool]:
        """Renew many leases in one round trip; returns shard -> still held."""
        shards = list(leases)
        script = self._scripts["renew_lease"]
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in shards:
                await script(keys=[self.keys.lease(shard)], args=[leases[shard], ttl_ms], client=pipe)
            results = await pipe.execute()
        return {shard: bool(r) for shard, r in zip(shards, results, strict=True)}

    async def release_lease(self, shard: int, lease: str) -> bool:
        released = bool(await self._run("release_lease", [self.keys.lease(shard)], [lease]))
        if released:
            try:
                await self.redis.publish(self.keys.lease_events(), str(shard))
            except ResponseError as exc:  # e.g. an ACL without the channel: the lease is released
                # all the same; the other supervisors see the free shard at their next tick.
                log.warning("could not announce the release of shard %s: %s", shard, exc)
        return released

    # ---- inbox -------------------------------------------------------------
    async def append(self, shard: int, envelope: bytes) -> str:
        """XADD; a server that does not answer within STALL_TIMEOUT raises TimeoutError
        (the outcome is then unknown: the entry may or may not be stored)."""
        async with asyncio.timeout(STALL_TIMEOUT):
            entry_id = cast(bytes, await self._appender.xadd(self.keys.inbox(shard), {FIELD: envelope}))
        return str(entry_id.decode())

    async def append_many(self, items: Sequence[tuple[int, bytes]]) -> list[str]:
        """Append many envelopes in one pipelined round trip, in order (bounded as ``append``)."""
        async with asyncio.timeout(STALL_TIMEOUT), self._appender.pipeline(transaction=False) as pipe:
            for shard, envelope in items:
                pipe.xadd(self.keys.inbox(shard), {FIELD: envelope})
            ids = await pipe.execute()
        return [i.decode() for i in ids]

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
        status, value = await self._run(
            "enqueue_once",
            [self.keys.inbox(shard), self.keys.idempotency(shard, actor_id, idempotency_key)],
            [envelope, message_id, ttl_ms, digest],
        )
        if status == _CONFLICT:
            raise IdempotencyConflict(idempotency_key, actor_id, value.decode())
        return bool(status), value.decode()

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
        entries = _stream_entries(value)
        return entries, entries[-1][0]

    async def read_after(self, shard: int, after_id: str, count: int, block_ms: int) -> list[Entry]:
        """Up to ``count`` entries newer than ``after_id``, blocking until one exists (or the
        time is up: []). Unfenced and outside the group: it only shows what ``read_new``
        will take next (see ShardRunner._read_loop)."""
        inbox = self.keys.inbox(shard)
        reply = await _raw_reply(
            self.redis, "XREAD", "COUNT", count, "BLOCK", block_ms, "STREAMS", inbox, after_id
        )
        return _stream_entries(_xread_rows(reply))

    async def claim_pending(self, shard: int, consumer: str, count: int) -> list[Entry]:
        """Take over every pending entry of the shard (the lease makes them ours), oldest first."""
        claimed: list[Entry] = []
        cursor = "0-0"
        while True:
            cursor_b, entries, deleted = await _raw_reply(
                self.redis, "XAUTOCLAIM", self.keys.inbox(shard), GROUP, consumer, 0, cursor, "COUNT", count
            )
            claimed.extend(_stream_entries(entries))
            if deleted:  # trimmed while pending: nothing left to handle, just ack
                await self.redis.xack(self.keys.inbox(shard), GROUP, *deleted)
            cursor = cursor_b.decode() if isinstance(cursor_b, bytes) else str(cursor_b)
            if cursor == "0-0":
                return claimed

    async def trim_inbox(self, shard: int) -> int:
        return int(await self._run("trim_inbox", [self.keys.inbox(shard)], []))

    # ---- state ---------------------------------------------------------------
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
        return [
            LoadedActor(snapshot, None if timer is None else int(timer), turn)
            for snapshot, timer, turn in zip(snapshots, timers, turns, strict=True)
        ]

    async def load_state(self, shard: int, actor_id: str) -> bytes | None:
        value = cast("bytes | None", await self.redis.hget(self.keys.state(shard), actor_id))
        return value if value is None else bytes(value)

    # ---- commits ---------------------------------------------------------------
    async def commit(
        self, shard: int, lease: str, writes: Sequence[Write], reply_ttl_ms: int, take: Take | None = None
    ) -> list[int]:
        """Apply writes atomically, after taking ``take``'s entries into the group; returns per
        write DUPLICATE, DONE or BACKLOG.

        Raises LeaseLost if the lease is not held at ``lease`` (nothing is taken or written),
        Diverged if the entries to take are not the next ones in the group (no write is
        applied; what the script's read took stays pending, for the restarted runner).
        """
        k = self.keys
        keys = [k.lease(shard), k.inbox(shard), k.state(shard), k.outbox(shard)]
        keys += [k.turns(shard), k.timers(shard), k.dead_letters(shard), k.deliveries(shard)]
        values: list[Any] = []
        for w in writes:
            deferred_index = 0
            if w.uses_deferred:
                keys.append(k.deferred(shard, w.actor_id))
                deferred_index = len(keys)
            effects: list[list[Any]] = [["L", e] for e in w.local]
            effects += [["R", target, e] for target, e in w.remote]
            effects += [["A", entry_id] for entry_id in w.acks]
            effects += [["U", e] for e in w.unlists]
            effects += [["F", entry_id, e] for entry_id, e in w.defers]
            if w.reply_key is not None:
                keys.append(w.reply_key)
                effects.append(["Y", len(keys), w.reply_channel or "", w.reply])
            if w.op == "j":
                effects.append(["J", w.open_turn, w.score])
            if w.op == "d":
                effects.append(["D", w.envelope, w.ref if w.origin == "i" else "", w.reason, w.detail])
            if w.forget_delivery:
                effects.append(["X"])
            snapshot = w.snapshot if w.snapshot is not None else b""
            values += [w.op, w.actor_id, w.origin, w.ref, deferred_index, snapshot, len(effects)]
            for effect in effects:
                values += effect
        # One argument rather than thousands: packing arguments is the client's main cost.
        # Lua's cmsgpack reads only the old raw type, so bytes go as msgpack "raw" strings.
        packed = msgpack.packb(values, use_bin_type=False)
        taking = [take.consumer, take.newest, take.count] if take else ["", "", 0]
        results = await self._run("commit", keys, [lease, reply_ttl_ms, len(writes), packed, *taking])
        return [int(r) for r in results]

    async def count_delivery(self, shard: int, lease: str, actor_id: str, delivery: str, mode: str) -> int:
        """Count a start of a recovered turn, ``look`` at the count, or ``forgive`` the next
        start (see ``count_delivery.lua``); returns the starts of ``delivery`` counted.
        Never retried: a lost reply restarts the runner."""
        keys = [self.keys.lease(shard), self.keys.deliveries(shard)]
        args = [lease, actor_id, delivery, mode]
        return int(await self._run("count_delivery", keys, args, client=self._appender))

    async def deferred(self, shard: int, actor_id: str, count: int) -> list[bytes]:
        """The first ``count`` messages deferred behind an actor's open turn, in order."""
        envelopes = await self.redis.lrange(self.keys.deferred(shard, actor_id), 0, count - 1)
        return list(cast("list[bytes]", envelopes))

    async def open_turn(self, shard: int, actor_id: str) -> tuple[bytes | None, int]:
        """An actor's open turn (None if it has none) and how many messages wait behind it."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hget(self.keys.turns(shard), actor_id)
            pipe.llen(self.keys.deferred(shard, actor_id))
            turn, deferred = await pipe.execute()
        return turn, int(deferred)

    async def open_turns(self, shard: int, limit: int) -> list[tuple[str, bytes]]:
        """Up to ``limit`` open turns of the shard: (actor id, open turn), in no set order."""
        found: list[tuple[str, bytes]] = []
        async for actor, turn in self.redis.hscan_iter(self.keys.turns(shard), count=500):
            found.append((actor.decode(), turn))
            if len(found) >= limit:
                break
        return found

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

    # ---- schedules -------------------------------------------------------------------
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

    # ---- limiters ---------------------------------------------------------------------
    async def limiter_acquire(
        self, name: str, holder: str, lease_ms: int, cap: int, interval_ms: float, tolerance_ms: float
    ) -> tuple[bool, int, int]:
        """Take a slot and reserve a rate token; returns (granted, wait ms, Redis now ms).

        Not granted: every slot is held; the wait is until the earliest slot lease expires.
        """
        k = self.keys
        granted, wait, now = await self._run(
            "limiter_acquire",
            [k.limiter_slots(name), k.limiter_tat(name)],
            [holder, lease_ms, cap, interval_ms, tolerance_ms],
        )
        return bool(granted), int(wait), int(now)

    async def limiter_release(self, name: str, holder: str) -> bool:
        k = self.keys
        return bool(
            await self._run(
                "limiter_release", [k.limiter_slots(name)], [holder, k.limiter_events(), f"{RELEASED}{name}"]
            )
        )

    async def limiter_renew(self, held: Sequence[tuple[str, str]], lease_ms: int) -> None:
        """Extend the leases of held slots, (limiter, holder) pairs, in one round trip."""
        now = await self.server_time_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            for name, holder in held:
                pipe.zadd(self.keys.limiter_slots(name), {holder: now + lease_ms}, xx=True)
            await pipe.execute()

    async def declare_limiters(self, definitions: dict[str, str]) -> dict[str, str]:
        """Record limiter definitions (JSON) not recorded yet; returns every recorded one."""
        key = self.keys.limiters()
        async with self.redis.pipeline(transaction=False) as pipe:
            for name, definition in definitions.items():
                pipe.hsetnx(key, name, definition)
            pipe.hgetall(key)
            *_, recorded = await pipe.execute()
        return {n.decode(): d.decode() for n, d in recorded.items()}

    async def queue_enqueue(
        self, name: str, item_id: str, shard: int, envelope: bytes, dedup_id: str, partition: str,
        priority: int, dedup_ttl_ms: int, seen_ttl_ms: int,
    ) -> tuple[bool, str]:  # fmt: skip
        """Queue an item; returns (True, item id), or (False, id of the item holding ``dedup_id``).

        An item id queued before (within ``seen_ttl_ms``) is not queued again: a turn that
        re-runs its journaled ``enqueue`` after the item was dispatched queues nothing."""
        k = self.keys
        keys = [k.queue(name, p) for p in ("items", "ready", "vtimes", "last_rounds", "counts")]
        keys.append(k.queue(name, f"dedup:{dedup_id}") if dedup_id else keys[0])
        keys.append(k.queue(name, f"seen:{item_id}"))
        args = [
            item_id,
            shard,
            envelope,
            dedup_id,
            partition,
            priority,
            dedup_ttl_ms,
            k.limiter_events(),
            f"{QUEUED}{name}",
            seen_ttl_ms,
        ]
        queued, holder = await self._run("queue_enqueue", keys, args)
        return bool(queued), holder.decode()

    async def queue_dispatch(
        self, name: str, lease_ms: int, cap: int, interval_ms: float, tolerance_ms: float, deadline_ms: int
    ) -> tuple[int, int, tuple[str, int, bytes] | None]:
        """Take the next queued item with a slot and a token: (1, wait ms, (id, shard, envelope)),
        (0, ms until a slot lease expires, None) if every slot is held, (2, 0, None) if empty."""
        k = self.keys
        keys = [k.limiter_slots(name), k.limiter_tat(name)]
        parts = ("items", "ready", "dispatching", "vtimes", "last_rounds", "counts")
        keys += [k.queue(name, p) for p in parts]
        reply = await self._run(
            "queue_dispatch", keys, [lease_ms, cap, interval_ms, tolerance_ms, deadline_ms]
        )
        status = int(reply[0])
        if status != 1:
            return status, int(reply[1]) if status == 0 else 0, None
        return 1, int(reply[1]), (reply[2].decode(), int(reply[3]), bytes(reply[4]))

    async def queue_dispatched(
        self, name: str, item_id: str, entry_id: str = "", actor_id: str = "", check_ms: int = 0
    ) -> None:
        """The item is in its actor's inbox (at ``entry_id``, '' if unknown): it leaves the
        queue (its slot and dedup id stay). One with a dedup id is recorded in ``out``, its
        first look at its shard due in ``check_ms`` (``queue_checks``)."""
        parts = ("items", "ready", "dispatching", "counts", "last_rounds", "out", "checks")
        keys = [self.keys.queue(name, p) for p in parts]
        await self._run("queue_dispatched", keys, [item_id, entry_id, actor_id, check_ms])

    async def queue_done(self, items: Sequence[tuple[str, str, str]]) -> None:
        """(limiter, item id, dedup id) of queued items whose turns ended, in one round trip."""
        k = self.keys
        script = self._scripts["queue_done"]
        async with self.redis.pipeline(transaction=False) as pipe:
            for name, item_id, dedup_id in items:
                slots = k.limiter_slots(name)
                dedup = k.queue(name, f"dedup:{dedup_id}") if dedup_id else slots
                args = [item_id, "1" if dedup_id else "", k.limiter_events(), f"{RELEASED}{name}"]
                keys = [slots, dedup, k.queue(name, "out"), k.queue(name, "checks")]
                await script(keys=keys, args=args, client=pipe)
            await pipe.execute()

    async def queue_depths(self, name: str) -> tuple[dict[str, int], int]:
        """Queued items by partition, and items being dispatched."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.queue(name, "counts"))
            pipe.zcard(self.keys.queue(name, "dispatching"))
            counts, dispatching = await pipe.execute()
        return {p.decode(): int(n) for p, n in counts.items()}, int(dispatching)

    async def limiter_holders(self, name: str) -> int:
        """How many slots of the limiter are held now (leases not expired)."""
        now = await self.server_time_ms()
        return int(await self.redis.zcount(self.keys.limiter_slots(name), now, "+inf"))

    async def queue_checks(self, name: str, interval_ms: int, limit: int) -> list[OutItem]:
        """Claim up to ``limit`` dispatched items due for a look at their shards; the next
        look at each is then ``interval_ms`` on."""
        keys = [self.keys.queue(name, "out"), self.keys.queue(name, "checks")]
        reply = await self._run("queue_checks", keys, [interval_ms, limit])
        return [_out_item(reply[i].decode(), reply[i + 1]) for i in range(0, len(reply), 2)]

    async def queue_out_item(self, name: str, item_id: str) -> OutItem | None:
        """The ``out`` record of a dispatched item with a dedup id (None: none)."""
        record = cast("bytes | None", await self.redis.hget(self.keys.queue(name, "out"), item_id))
        return None if record is None else _out_item(item_id, record)

    async def items_alive(self, items: Sequence[OutItem]) -> list[bool]:
        """Per dispatched item: whether its shard still holds it (``item_alive.lua``), in one
        round trip. Each look is one script on one shard's keys."""
        k = self.keys
        script = self._scripts["item_alive"]
        async with self.redis.pipeline(transaction=False) as pipe:
            for item in items:
                keys = [k.inbox(item.shard), k.turns(item.shard), k.deferred(item.shard, item.actor_id)]
                await script(keys=keys, args=[item.entry_id, item.actor_id, item.envelope], client=pipe)
            return [bool(alive) for alive in await pipe.execute()]

    async def find_entry(self, shard: int, envelope: bytes, page: int = 500) -> str:
        """The id of the inbox entry holding ``envelope`` ('' if the inbox no longer holds it:
        trimmed, so delivered and no longer pending). Reads the whole inbox: only for a queued
        item whose append was confirmed by no one (its dispatcher died right after it)."""
        start = "-"
        while True:
            found = await self.redis.xrange(self.keys.inbox(shard), start, "+", count=page)
            rows = cast("_StreamRows", found)
            for entry_id, fields in rows:
                if fields.get(FIELD) == envelope:
                    return entry_id.decode()
            if len(rows) < page:
                return ""
            start = "(" + rows[-1][0].decode()

    # ---- outbox and forwarding ---------------------------------------------------
    async def read_outbox(self, shard: int, count: int) -> list[tuple[str, int, bytes]]:
        rows = cast("_StreamRows", await self.redis.xrange(self.keys.outbox(shard), count=count))
        return [(i.decode(), int(f[b"s"]), f[FIELD]) for i, f in rows]

    async def forward(self, source: int, target: int, items: Sequence[tuple[str, bytes]]) -> int:
        args: list[Any] = [source]
        for entry_id, envelope in items:
            args += [entry_id, envelope]
        return int(await self._run("forward", [self.keys.inbox(target), self.keys.forwarded(target)], args))

    async def delete_outbox(self, shard: int, entry_ids: Sequence[str]) -> None:
        if entry_ids:
            await self.redis.xdel(self.keys.outbox(shard), *entry_ids)

    # ---- replies -------------------------------------------------------------------
    async def listen(
        self, channel: str, on_message: Callable[[bytes], None], subscribed: asyncio.Event | None = None
    ) -> None:
        """Call ``on_message`` with every message published on ``channel``, until cancelled.

        Resubscribes with backoff after a connection loss; ``subscribed`` is set each
        time the subscription is (re)made. Messages published while it is down are lost,
        so callers also look at the stored state now and then.
        """
        delay = 0.05
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                if subscribed is not None:
                    subscribed.set()
                delay = 0.05
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        on_message(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not is_transient(exc):
                    log.exception("listening on %s failed; subscribing again", channel)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            finally:
                # PubSub.aclose is unannotated in redis-py (it returns None).
                await asyncio.gather(pubsub.aclose(), return_exceptions=True)

    async def get_reply(self, shard: int, message_id: str) -> bytes | None:
        value = cast("bytes | None", await self.redis.get(self.keys.reply(shard, message_id)))
        return value if value is None else bytes(value)

    # ---- dead letters --------------------------------------------------------------
    async def dead_letters(self, shard: int, count: int, start: str = "-") -> list[DeadLetter]:
        found = await self.redis.xrange(self.keys.dead_letters(shard), min=start, count=count)
        rows = cast("_StreamRows", found)
        return [_dead_letter(i, f) for i, f in rows]

    async def replay_dead_letter(self, shard: int, dlq_id: str) -> str | None:
        new_id = await self._run(
            "replay_dead_letter", [self.keys.dead_letters(shard), self.keys.inbox(shard)], [dlq_id]
        )
        return new_id.decode() if new_id else None

    async def drop_dead_letter(self, shard: int, dlq_id: str) -> bool:
        return bool(await self.redis.xdel(self.keys.dead_letters(shard), dlq_id))

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

    # ---- status --------------------------------------------------------------------
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


class LeaseKeeper:
    """Renews a worker's leases, membership and limiter slots from a thread with a client of
    its own.

    A burst of turns can keep a worker's event loop from running for longer than a
    lease's TTL (a loop iteration runs every ready turn); its leases would then expire
    and its shards move for nothing. This thread renews them meanwhile, but only while
    the loop still shows progress (``alive()``, a monotonic time, within
    ``stall_limit`` seconds): a loop stuck for longer lets them expire, and its shards
    move, except a shard whose step function is still executing (a new owner would run
    it again alongside). Limiter slots are renewed for as long as they are held, whatever
    the loop does: a slot lasts exactly as long as the code that holds it. Each renewed
    lease's deadline moves on (``Lease.renewed``). It never acquires or releases; ``lost``
    is called (on this thread) with the leases it found lost.
    """

    def __init__(self, url: str, keys: Keys, worker_id: str, ttl_ms: int, interval: float, stall_limit: float,
                 leases: Callable[[], dict[int, Lease]], alive: Callable[[], float],
                 lost: Callable[[dict[int, Lease]], object],
                 slots: Callable[[], list[tuple[str, str]]] = list,
                 describe: Callable[[], str] = str) -> None:  # fmt: skip
        # A blocking client: the thread has no event loop. Its timeout bounds a stuck server.
        self._redis = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=ttl_ms / 1000)
        self._renew = self._redis.register_script(_script_text("renew_lease"))
        self._keys, self._worker_id, self._ttl_ms = keys, worker_id, ttl_ms
        self._interval, self._stall_limit = interval, stall_limit
        self._leases, self._alive, self._lost, self._slots = leases, alive, lost, slots
        self._describe = describe
        self._warned = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing (blocks until the thread ends: call it off the event loop)."""
        self._stop.set()
        self._thread.join()
        self._redis.close()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._watch_loop()
            stalled = time.monotonic() - self._alive() > self._stall_limit
            leases = self._leases()
            if stalled:  # the loop is stuck: let its leases expire, unless a step still runs
                leases = {shard: lease for shard, lease in leases.items() if lease.steps.running}
            try:
                self._keep(leases, self._slots(), membership=not stalled)
            except redis.RedisError as exc:  # the loop's own tick sees and reports Redis trouble
                log.debug("lease keeper: %r", exc)
            except Exception:  # the thread must outlive any surprise; the loop's tick renews too
                log.exception("lease keeper")

    def _watch_loop(self) -> None:
        """Say, once per stall, that the event loop has not run for a while, and in which
        turn: a handler that blocks it (``time.sleep``, CPU-bound work) stalls every turn
        of the process, and past ``stall_limit`` its shards move (and its turn, recovered
        elsewhere, counts toward ``max_redeliveries``)."""
        lag = time.monotonic() - self._alive()
        if lag <= self._interval + LOOP_LAG_WARNING:
            self._warned = False
        elif not self._warned:
            self._warned = True
            where = self._describe() or "no turn (the runtime itself, or a step's callback)"
            log.warning(
                "the event loop has not run for %.1fs; it is blocked in %s (past %ss its shards move)",
                lag, where, self._stall_limit,
            )  # fmt: skip

    def _keep(self, leases: dict[int, Lease], slots: list[tuple[str, str]], membership: bool) -> None:
        seconds, micros = self._redis.time()
        now_ms = seconds * 1000 + micros // 1000
        sent = time.monotonic()
        with self._redis.pipeline(transaction=False) as pipe:
            if membership:
                pipe.zadd(self._keys.workers(), {self._worker_id: now_ms + self._ttl_ms})
            for shard, lease in leases.items():
                self._renew(keys=[self._keys.lease(shard)], args=[lease.value, self._ttl_ms], client=pipe)
            for name, holder in slots:
                pipe.zadd(self._keys.limiter_slots(name), {holder: now_ms + self._ttl_ms}, xx=True)
            replies = pipe.execute()
        renewed = replies[int(membership) : int(membership) + len(leases)]
        lost = {}
        for (shard, lease), ok in zip(leases.items(), renewed, strict=True):
            if ok:
                lease.renewed(sent)
            else:
                lost[shard] = lease
        if lost:
            self._lost(lost)


def _client(url: str, retries: int) -> aioredis.Redis:
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=256,
        timeout=30,  # wait this long for a free connection rather than fail at once
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries),
        socket_connect_timeout=5,
        # No per-call socket timeout: on Python 3.11 redis-py runs every call with one
        # under asyncio.wait_for, a Task each (about 40 us of CPU per call here). A dead
        # peer is found by TCP keepalive instead; the callers that must not wait on a
        # stuck server bound themselves (the supervisor's tick, appends).
        socket_timeout=None,
        socket_keepalive=True,
        socket_keepalive_options=_KEEPALIVE,
        health_check_interval=30,
    )
    return aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes its sockets


_KEEPALIVE = {
    getattr(socket, option): value
    for option, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3))
    if hasattr(socket, option)
}
"""A silent peer is declared dead after about 5 + 2 x 3 = 11 s (where the platform allows)."""


def _allow_raw_replies(client: aioredis.Redis) -> None:
    """Let XREAD and XAUTOCLAIM calls given the ``_RAW_REPLY`` option skip redis-py's parsing
    (other calls are parsed as before)."""
    for command in ("XREAD", "XAUTOCLAIM"):
        parse = client.response_callbacks.get(command)
        if parse is not None and getattr(parse, "func", None) is not _raw_or_parsed:
            client.set_response_callback(command, functools.partial(_raw_or_parsed, parse))


async def _raw_reply(client: aioredis.Redis, *args: EncodableT) -> Any:
    """Run a command whose reply redis-py leaves as the server sent it (see ``_RAW_REPLY``)."""
    # execute_command is unannotated in redis-py's asyncio client.
    return await client.execute_command(*args, **{_RAW_REPLY: True})  # type: ignore[no-untyped-call]


def _raw_or_parsed(parse: Callable[..., Any], response: Any, **options: Any) -> Any:
    if options.pop(_RAW_REPLY, False):
        return response
    return parse(response, **options)


def _xread_rows(reply: Any) -> Any:
    """The entries of a raw XREAD reply for one stream: a map stream -> entries (RESP3), or a
    list of [stream, entries] (RESP2); nothing when the block timed out."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return next(iter(reply.values()))
    return reply[0][1]


def _stream_entries(rows: Any) -> list[Entry]:
    """Entries given as the server sends them, [[id, [field, value, ...]], ...], by one rule
    (``codec.entry_envelope``) whichever read returned them. A nil row (an entry deleted
    while pending, as some servers report it) has nothing to handle."""
    return [(row[0].decode(), entry_envelope(row[1] or [])) for row in rows if row is not None]


def _dead_letter(entry_id: bytes, fields: dict[bytes, bytes]) -> DeadLetter:
    return DeadLetter(
        id=entry_id.decode(),
        entry_id=fields.get(b"entry", b"").decode(),
        envelope=fields.get(FIELD, b""),
        reason=fields.get(b"reason", b"").decode(errors="replace"),
        detail=fields.get(b"detail", b"").decode(errors="replace"),
        at_ms=int(fields.get(b"at", b"0")),
    )


def _out_item(item_id: str, record: bytes) -> OutItem:
    shard, actor_id, dedup_id, entry_id, envelope = msgpack.unpackb(record, raw=True)
    return OutItem(item_id, int(shard), actor_id.decode(), dedup_id.decode(), entry_id.decode(), envelope)

"""Talking to actors from outside: send, ask, and read state.

``send`` returns once the message is in Redis, durable as the namespace's level says
(``RedisSettings.durability``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from opentelemetry.trace import SpanKind
from pydantic import BaseModel

from . import progress, telemetry
from .actor import ActorRef, App
from .codec import IDEMPOTENCY_HEADER, Routed, actor_id, decode_envelope, decode_state, message_digest
from .errors import ConfigurationError, DecodeError
from .journal import FOREVER_MS, OpenTurn
from .messages import CANCEL, Approval
from .progress import NamespaceWork
from .queues import QueueItem, enqueue_from_client
from .replies import ReplyListener, reply_value
from .routing import check_idempotency_key, route, route_control, shard_of
from .server import resolve_url
from .settings import (
    DEFAULT_DURABILITY,
    DEFAULT_SHARDS,
    Durability,
    MessageSettings,
    RedisSettings,
    check_seconds,
    check_shard_count,
)
from .store import DeadLetter, KeyedAppend, Store

BatchItem = tuple[ActorRef[Any], BaseModel] | tuple[ActorRef[Any], BaseModel, str | None]
"""An item of ``send_many``: a message to an actor, with an idempotency key or not."""

DEAD_LETTER_SCAN = 1000
"""``inspect`` looks for an actor's dead letters among its shard's newest this many (a bounded
read: dead-letter streams are never trimmed, and one holds every actor of its shard)."""


class Client:
    """A connection to one namespace. Make it with ``actors.connect()``."""

    def __init__(self, store: Store, shards: int, app: App | None, messages: MessageSettings) -> None:
        self.store = store
        self.shards = shards
        self.app = app
        self.messages = messages
        self._replies: ReplyListener | None = None

    @property
    def durability(self) -> str:
        """The namespace's durability level, as Redis records it (see ``connect``)."""
        return self.store.ack.level

    async def send(self, ref: ActorRef[Any], msg: BaseModel, *, idempotency_key: str | None = None) -> str:
        """Send ``msg`` to ``ref``; returns its message id once it is stored in Redis.

        With ``idempotency_key`` (a str of 1 to 256 characters, else InvalidIdempotencyKey),
        a second send of the same message (type and payload) to the same actor with the
        same key, within ``idempotency_ttl``, is accepted but has no effect, and returns the
        first id; another message to that actor with the key raises IdempotencyConflict.
        """
        key = None if idempotency_key is None else check_idempotency_key(idempotency_key)
        with _sending("send", ref, msg):
            routed = self._route(ref, msg)
            if key is None:
                await self.store.append(routed.shard, routed.data)
                return routed.envelope.id
            env = routed.envelope
            appended, first_id = await self.store.append_once(
                routed.shard, env.actor_id, key, env.id, routed.data, _ms(self.messages.idempotency_ttl),
                digest=message_digest(env),
            )  # fmt: skip
            return env.id if appended else first_id

    async def send_many(self, items: Iterable[BatchItem]) -> list[str]:
        """Send many messages in one pipelined round trip; order is kept per target; returns
        their message ids, in order. Every message is checked (as ``send`` does) before any
        is written. The batch is not atomic: after a connection error some may be stored.

        An item ``(ref, msg, key)`` carries an idempotency key, as ``send``'s
        ``idempotency_key``: retrying a batch whose outcome is unknown then has no second
        effect for its keyed items (their ids are the first sends'). A key used for another
        message to the same actor raises IdempotencyConflict once the batch has run.
        """
        with telemetry.span("send_many", kind=SpanKind.PRODUCER):
            batch = [self._batch_item(item) for item in items]
            if not batch:
                return []
            ttl_ms = _ms(self.messages.idempotency_ttl)
            appends = [(r.shard, r.data) if key is None else _keyed(r, key, ttl_ms) for r, key in batch]
            return await self.store.append_many(appends)

    def _batch_item(self, item: BatchItem) -> tuple[Routed, str | None]:
        if not isinstance(item, tuple) or len(item) not in (2, 3):
            raise TypeError(
                f"send_many takes (ref, message) or (ref, message, idempotency key), not {item!r}"
            )
        key = item[2] if len(item) == 3 else None
        checked = None if key is None else check_idempotency_key(key)
        return self._route(item[0], item[1]), checked

    async def ask(
        self,
        ref: ActorRef[Any],
        msg: BaseModel,
        *,
        timeout: float = 30.0,
        idempotency_key: str | None = None,
    ) -> Any:
        """Send ``msg`` and return the handler's reply (a model, or None).

        Raises Rejected if the handler raised ``Reject`` (its reason and detail),
        HandlerError if the message was dead-lettered (the handler kept failing, or the
        message was refused), AskTimeout after ``timeout``. ``idempotency_key`` works as
        for ``send``; a repeated ask gets the first one's reply, which is kept as long as
        the key (``idempotency_ttl``; an un-keyed ask's reply for ``reply_ttl``).
        """
        timeout = check_seconds(timeout, "an ask's timeout")
        key = None if idempotency_key is None else check_idempotency_key(idempotency_key)
        replies = await self._listener()
        with _sending("ask", ref, msg):
            # The key travels with the ask: the worker keeps the reply as long as the key's marker.
            headers = None if key is None else {IDEMPOTENCY_HEADER: key}
            routed = self._route(ref, msg, reply_to=replies.channel, headers=headers)
            reply = await replies.request(
                routed.shard, routed.envelope.id, routed.data, key,
                _ms(self.messages.idempotency_ttl), timeout, digest=message_digest(routed.envelope),
            )  # fmt: skip
        return reply_value(reply, self.app.resolve(ref) if self.app else ref.cls, routed.envelope.type)

    def _route(self, ref: ActorRef[Any], msg: BaseModel, reply_to: str | None = None,
               headers: dict[str, str] | None = None) -> Routed:  # fmt: skip
        self._check_type(ref)
        max_bytes = self.messages.max_message_bytes
        return route(self.app, ref, msg, self.shards, max_bytes, reply_to=reply_to, headers=headers)

    def _check_type(self, ref: ActorRef[Any]) -> None:
        """With an app, a message may only go to an actor type the app defines (UnknownActorType):
        no worker of the app would run it."""
        if self.app is not None and isinstance(ref, ActorRef):
            self.app.actor_type(ref.type)

    async def state(self, ref: ActorRef[Any]) -> Any:
        """The actor's last committed state: its State model if the class is known,
        else the raw dict; None if it never committed a turn."""
        aid = actor_id(ref.type, ref.key)
        raw = await self.store.load_state(shard_of(aid, self.shards), aid)
        if raw is None:
            return None
        data = decode_state(raw)
        cls = self.app.resolve(ref) if self.app else ref.cls
        return cls.State.model_validate(data) if cls is not None else data

    async def enqueue(
        self,
        queue: str,
        ref: ActorRef[Any],
        msg: BaseModel,
        *,
        priority: int = 0,
        dedup_id: str | None = None,
        partition: str = "",
    ) -> str:
        """Queue ``msg`` for ``ref`` behind limiter ``queue``; returns the item id.

        Workers hand queued items to their actors as the limiter allows (its rate and
        concurrency; a queued item's turn holds a slot): higher ``priority`` first
        (-1000..1000), then partitions in turn, then arrival order. Raises DuplicateItem
        if an item with ``dedup_id`` is still queued or running.
        """
        item = QueueItem(priority, dedup_id or "", partition)
        self._check_type(ref)
        await self._check_queue(queue)
        with _sending("enqueue", ref, msg):
            routed = route(
                self.app, ref, msg, self.shards, self.messages.max_message_bytes, headers=item.headers(queue)
            )
            seen_ttl = _ms(self.messages.idempotency_ttl)
            return await enqueue_from_client(self.store, queue, routed, item, seen_ttl)

    async def _check_queue(self, queue: str) -> None:
        known = set(self.app.limiters) if self.app is not None else set(await self.store.declare_limiters({}))
        if queue not in known:
            defined = ", ".join(sorted(known)) or "none"
            raise ConfigurationError(
                f"no limiter named {queue!r} (defined: {defined}); a queue is named after one"
            )

    async def approve(
        self, ref: ActorRef[Any], request_id: str, *, approved: bool = True, by: str = "", comment: str = ""
    ) -> str:
        """Send an ``Approval`` (or, with ``approved=False``, a rejection) to ``ref``.

        The ``wait_for(Approval, ...)`` of the actor's open turn receives it.
        """
        return await self.send(
            ref, Approval(request_id=request_id, approved=approved, by=by, comment=comment)
        )

    async def cancel(self, ref: ActorRef[Any]) -> str:
        """End the actor's open turn: its message goes to the dead-letter stream
        (reason ``cancelled``) and the messages deferred behind it are handled next.
        Does nothing if the actor has no open turn when the cancel arrives."""
        self._check_type(ref)
        routed = route_control(ref, CANCEL, self.shards)
        await self.store.append(routed.shard, routed.data)
        return routed.envelope.id

    async def inspect(self, ref: ActorRef[Any]) -> ActorView:
        """The actor's committed state, its open turn if it has one, its deferred messages,
        and its dead letters among the shard's newest ``DEAD_LETTER_SCAN``."""
        aid = actor_id(ref.type, ref.key)
        shard = shard_of(aid, self.shards)
        stored, deferred = await self.store.open_turn(shard, aid)
        turn = None if stored is None else TurnView.of(aid, OpenTurn.decode(stored.header, stored.journal))
        newest = await self.store.newest_dead_letters(shard, DEAD_LETTER_SCAN)
        dead = [view for view in map(DeadLetterView.of, newest) if view is not None and view.actor == aid]
        return ActorView(aid, shard, await self.state(ref), turn, deferred, dead)

    async def waits(self, limit: int = 1000) -> list[TurnView]:
        """Open turns across every shard (at most ``limit``), oldest first."""
        views: list[TurnView] = []
        for shard in range(self.shards):
            for stored in await self.store.open_turns(shard, limit - len(views)):
                views.append(TurnView.of(stored.actor_id, OpenTurn.decode(stored.header, stored.journal)))
            if len(views) >= limit:
                break
        return sorted(views, key=lambda v: v.since or datetime.min.replace(tzinfo=UTC))

    async def work(self) -> NamespaceWork:
        """What is left to do in the namespace, shard by shard: inbox entries unread and
        pending, outboxes, deferred messages, turns due now and later, queued items."""
        return await progress.namespace_work(self.store, self.shards)

    async def wait_idle(self, timeout: float | None = None, *, interval: float = 0.2) -> NamespaceWork:
        """Return once the namespace is idle: every message sent so far is handled (or
        dead-lettered), forwarded, no turn is due and no item is queued; turns sleeping or
        waiting until later do not count (see ``actors.progress``). Raises IdleTimeout after
        ``timeout`` seconds (None: no bound). Nothing is idle without a live worker."""
        return await progress.wait_idle(self.store, self.shards, timeout, interval)

    async def _listener(self) -> ReplyListener:
        if self._replies is None:
            self._replies = ReplyListener(self.store)
            await self._replies.start()
        return self._replies

    async def close(self) -> None:
        if self._replies is not None:
            await self._replies.stop()
        await self.store.close()


@dataclass(frozen=True, slots=True)
class TurnView:
    """An open turn, as ``actors inspect`` and ``actors waits`` show it."""

    actor: str
    message_id: str
    message_type: str
    status: str
    """``running``, ``sleeping``, ``waiting`` or ``parked``."""
    waiting_for: str | None
    since: datetime | None
    """When it was suspended or parked."""
    due: datetime | None
    """When its timer fires (the end of a sleep, a wait's timeout); None: never."""
    parked: str
    journal: list[str]
    """``kind name`` of each journaled primitive, in order."""

    @classmethod
    def of(cls, aid: str, turn: OpenTurn) -> TurnView:
        env = decode_envelope(turn.envelope) if turn.envelope else None
        if turn.parked:
            status = "parked"
        elif not turn.suspended:
            status = "running"
        else:
            status = "waiting" if turn.waiting else "sleeping"
        return cls(
            actor=aid,
            message_id=env.id if env else "",
            message_type=env.type if env else "",
            status=status,
            waiting_for=turn.waiting,
            since=_datetime(turn.since_ms) if turn.since_ms else None,
            due=_datetime(turn.due_ms) if 0 < turn.due_ms < FOREVER_MS else None,
            parked=turn.parked,
            journal=[f"{r.kind} {r.name}".rstrip() for r in turn.records],
        )


@dataclass(frozen=True, slots=True)
class DeadLetterView:
    """A dead letter, as ``actors inspect`` shows it."""

    id: str
    actor: str
    message_id: str
    message_type: str
    at: datetime
    reason: str
    """Why: e.g. ``arrived after the wait timed out``, ``no wait was open``, ``cancelled``."""
    detail: str

    @classmethod
    def of(cls, dead: DeadLetter) -> DeadLetterView | None:
        """None for one whose envelope does not decode (it names no actor)."""
        try:
            env = decode_envelope(dead.envelope)
        except DecodeError:
            return None
        return cls(dead.id, env.actor_id, env.id, env.type, _datetime(dead.at_ms), dead.reason, dead.detail)


@dataclass(frozen=True, slots=True)
class ActorView:
    """What ``actors inspect`` shows about one actor."""

    actor: str
    shard: int
    state: Any
    turn: TurnView | None
    deferred: int
    """Messages waiting behind its open turn (or not yet handled after it closed)."""
    dead_letters: list[DeadLetterView]
    """Its dead letters among its shard's newest ``DEAD_LETTER_SCAN``, oldest first."""


def _sending(verb: str, ref: ActorRef[Any], msg: BaseModel) -> contextlib.AbstractContextManager[Any]:
    """The producer span of a message from outside; its context travels in the envelope."""
    if not telemetry.tracing():
        return contextlib.nullcontext()  # spare the name and attributes of a span not made
    attributes = {"actor.type": ref.type, "actor.key": ref.key, "message.type": type(msg).__name__}
    return telemetry.span(f"{verb} {type(msg).__name__}", attributes, kind=SpanKind.PRODUCER)


def _keyed(routed: Routed, key: str, ttl_ms: int) -> KeyedAppend:
    env = routed.envelope
    return KeyedAppend(routed.shard, env.actor_id, key, env.id, routed.data, ttl_ms, message_digest(env))


def _datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


@contextlib.asynccontextmanager
async def connect(
    url: str | None = None,
    *,
    namespace: str | None = None,
    app: App | None = None,
    shards: int | None = None,
    messages: MessageSettings | None = None,
    record_shards: bool = True,
    durability: Durability | None = None,
    durability_timeout: float | None = None,
) -> AsyncIterator[Client]:
    """Connect to the runtime's Redis.

    ``url=None`` uses ``ACTORS_REDIS_URL`` if set, else the project's embedded
    server (started if needed). The shard count is read from Redis; ``shards``
    (default 16) is recorded if nothing is yet (unless ``record_shards`` is False,
    for read-only tools), and must match the record otherwise. So is the namespace's
    ``durability`` level (``everysec``, ``fsync`` or ``replica``; see ``RedisSettings``):
    a send returns once it holds, or raises DurabilityTimeout after ``durability_timeout``
    seconds (default 5).
    """
    if shards is not None:
        check_shard_count(shards)
    settings = RedisSettings.from_env(url, namespace, durability)
    if durability_timeout is not None:
        settings = RedisSettings(**{**settings.model_dump(), "durability_timeout": durability_timeout})
    store = Store.from_url(resolve_url(settings.url), settings.namespace)
    try:
        count = await store.shard_count(shards, DEFAULT_SHARDS if record_shards else None)
        await store.durability(
            settings.durability, DEFAULT_DURABILITY if record_shards else None, settings.durability_timeout
        )
    except BaseException:
        await store.close()
        raise
    client = Client(store, count, app, messages or MessageSettings())
    try:
        yield client
    finally:
        await client.close()

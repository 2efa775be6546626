"""Talking to actors from outside: send, ask, and read state.

``send`` returns once the message is in Redis (and so, with AOF, durable).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from typing import Any

from pydantic import BaseModel

from .actor import ActorRef, App
from .codec import actor_id, decode_state
from .replies import ReplyListener, reply_value
from .routing import Routed, route, shard_of
from .server import resolve_url
from .settings import DEFAULT_SHARDS, MessageSettings, RedisSettings
from .store import Store


class Client:
    """A connection to one namespace. Make it with ``actors.connect()``."""

    def __init__(self, store: Store, shards: int, app: App | None, messages: MessageSettings) -> None:
        self.store = store
        self.shards = shards
        self.app = app
        self.messages = messages
        self._replies: ReplyListener | None = None

    async def send(self, ref: ActorRef[Any], msg: BaseModel, *, idempotency_key: str | None = None) -> str:
        """Send ``msg`` to ``ref``; returns its message id once it is stored in Redis.

        With ``idempotency_key``, a second send with the same key (within
        ``idempotency_ttl``) is accepted but has no effect, and returns the first id.
        """
        routed = self._route(ref, msg)
        if idempotency_key is None:
            await self.store.append(routed.shard, routed.data)
            return routed.envelope.id
        appended, first_id = await self.store.append_once(
            routed.shard, idempotency_key, routed.envelope.id, routed.data, _ms(self.messages.idempotency_ttl)
        )
        return routed.envelope.id if appended else first_id

    async def send_many(self, items: Iterable[tuple[ActorRef[Any], BaseModel]]) -> list[str]:
        """Send many messages in one pipelined round trip; order is kept per target."""
        batch = [self._route(ref, msg) for ref, msg in items]
        if batch:
            await self.store.append_many([(r.shard, r.data) for r in batch])
        return [r.envelope.id for r in batch]

    async def ask(
        self,
        ref: ActorRef[Any],
        msg: BaseModel,
        *,
        timeout: float = 30.0,
        idempotency_key: str | None = None,
    ) -> Any:
        """Send ``msg`` and return the handler's reply (a model, or None).

        Raises HandlerError if the message was dead-lettered (the handler kept
        failing, or the message was refused), AskTimeout after ``timeout``.
        """
        replies = await self._listener()
        routed = self._route(ref, msg, reply_to=replies.channel)
        reply = await replies.request(
            routed.shard, routed.envelope.id, routed.data, idempotency_key,
            _ms(self.messages.idempotency_ttl), timeout,
        )  # fmt: skip
        return reply_value(reply, self.app.resolve(ref) if self.app else ref.cls, routed.envelope.type)

    def _route(self, ref: ActorRef[Any], msg: BaseModel, reply_to: str | None = None) -> Routed:
        return route(self.app, ref, msg, self.shards, self.messages.max_message_bytes, reply_to=reply_to)

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

    async def _listener(self) -> ReplyListener:
        if self._replies is None:
            self._replies = ReplyListener(self.store)
            await self._replies.start()
        return self._replies

    async def close(self) -> None:
        if self._replies is not None:
            await self._replies.stop()
        await self.store.close()


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
) -> AsyncIterator[Client]:
    """Connect to the runtime's Redis.

    ``url=None`` uses ``ACTORS_REDIS_URL`` if set, else the project's embedded
    server (started if needed). The shard count is read from Redis; ``shards``
    (default 16) is recorded if nothing is yet (unless ``record_shards`` is False,
    for read-only tools), and must match the record otherwise.
    """
    settings = RedisSettings.from_env(url, namespace)
    store = Store.from_url(resolve_url(settings.url), settings.namespace)
    try:
        count = await store.shard_count(shards, DEFAULT_SHARDS if record_shards else None)
    except BaseException:
        await store.close()
        raise
    client = Client(store, count, app, messages or MessageSettings())
    try:
        yield client
    finally:
        await client.close()

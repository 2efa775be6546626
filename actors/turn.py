"""What a handler does during one turn, collected for the commit.

Sends are buffered here and written by the turn's commit script, so they
happen exactly when the turn's state change happens: both, or neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from .actor import ActorRef, App
from .codec import Envelope, encode_envelope
from .errors import ActorsError
from .replies import ReplyListener, reply_value
from .routing import build_envelope, shard_of
from .settings import MessageSettings

if TYPE_CHECKING:
    from .store import Store


@dataclass(frozen=True, slots=True)
class TurnServices:
    """What every turn of a worker shares."""

    app: App
    store: Store
    shards: int
    messages: MessageSettings
    replies: ReplyListener


@dataclass(frozen=True, slots=True)
class TurnInfo:
    """What a handler may know about the turn it runs in (``self.turn``)."""

    message_id: str
    message_type: str
    shard: int
    epoch: int
    """The shard's lease epoch this turn will commit under."""
    worker_id: str
    attempt: int


@dataclass(slots=True)
class TurnContext:
    services: TurnServices
    shard: int
    envelope: Envelope
    info: TurnInfo
    local: list[bytes] = field(default_factory=list)
    remote: list[tuple[int, bytes]] = field(default_factory=list)
    asks: int = 0

    def send(self, ref: ActorRef[Any], msg: BaseModel) -> None:
        env = build_envelope(self.services.app, ref, msg, strict_types=True)
        data = encode_envelope(env, self.services.messages.max_message_bytes)
        target = shard_of(env.actor_id, self.services.shards)
        if target == self.shard:
            self.local.append(data)
        else:
            self.remote.append((target, data))

    async def ask(self, ref: ActorRef[Any], msg: BaseModel, timeout: float) -> Any:
        if ref.type == self.envelope.actor and ref.key == self.envelope.key:
            raise ActorsError("an actor cannot ask itself: its turn would wait for itself")
        # A deterministic id per (turn message, position): a re-run of this turn after a
        # crash re-sends the same id, which the target's idempotency check drops.
        self.asks += 1
        message_id = f"{self.envelope.id}.ask{self.asks}"
        services = self.services
        env = build_envelope(
            services.app, ref, msg, message_id=message_id,
            reply_to=services.replies.channel, strict_types=True,
        )  # fmt: skip
        data = encode_envelope(env, services.messages.max_message_bytes)
        target = shard_of(env.actor_id, services.shards)
        fut = services.replies.expect(message_id)
        ttl_ms = int(services.messages.idempotency_ttl * 1000)
        await services.store.append_once(target, message_id, message_id, data, ttl_ms)
        reply = await services.replies.wait(target, message_id, fut, timeout)
        return reply_value(reply, services.app.resolve(ref), env.type)

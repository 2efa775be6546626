"""What a handler does during one turn, collected for the commit.

Sends are buffered here and written by the turn's commit script, so they
happen exactly when the turn's state change happens: both, or neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from .actor import ActorRef, App
from .codec import Envelope
from .errors import ActorsError
from .replies import ReplyListener, reply_value
from .routing import Routed, route
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
        routed = self._route(ref, msg)
        if routed.shard == self.shard:
            self.local.append(routed.data)
        else:
            self.remote.append((routed.shard, routed.data))

    async def ask(self, ref: ActorRef[Any], msg: BaseModel, timeout: float) -> Any:
        if ref.type == self.envelope.actor and ref.key == self.envelope.key:
            raise ActorsError("an actor cannot ask itself: its turn would wait for itself")
        # A deterministic id per (turn message, position), used as its idempotency key:
        # a re-run of this turn after a crash re-sends the same id, which the target drops.
        self.asks += 1
        message_id = f"{self.envelope.id}.ask{self.asks}"
        replies = self.services.replies
        routed = self._route(ref, msg, message_id=message_id, reply_to=replies.channel)
        ttl_ms = int(self.services.messages.idempotency_ttl * 1000)
        reply = await replies.request(routed.shard, message_id, routed.data, message_id, ttl_ms, timeout)
        return reply_value(reply, self.services.app.resolve(ref), routed.envelope.type)

    def _route(self, ref: ActorRef[Any], msg: BaseModel, **kwargs: Any) -> Routed:
        services = self.services
        return route(
            services.app, ref, msg, services.shards, services.messages.max_message_bytes,
            strict_types=True, **kwargs,
        )  # fmt: skip

"""Where a message goes: the shard of an actor, and the checked envelope for a send.

Shared by the client (sends from outside) and turns (sends from inside actors),
so both refuse bad input the same way, at the edge, before anything is written.
"""

from __future__ import annotations

import zlib
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from . import telemetry
from .actor import ActorRef, App
from .codec import Envelope, Routed, dump_model, encode_envelope, new_message_id
from .errors import InvalidIdempotencyKey, UnknownActorType
from .messages import TICK

MAX_IDEMPOTENCY_KEY = 256
"""Characters; a key is part of a Redis key name, kept for ``idempotency_ttl``."""


def check_idempotency_key(key: object) -> str:
    """``key`` as a plain ``str``, or InvalidIdempotencyKey if it is not text of 1 to
    ``MAX_IDEMPOTENCY_KEY`` characters (an int 5 would meet the text "5" in Redis)."""
    if not isinstance(key, str):
        raise InvalidIdempotencyKey(f"an idempotency key must be a str, not {type(key).__name__}")
    if not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
        raise InvalidIdempotencyKey(
            f"an idempotency key must have 1 to {MAX_IDEMPOTENCY_KEY} characters, not {len(key)}"
        )
    # A str subclass (a str enum member) may format as other text ("K.A") inside the key name.
    return str.__str__(key)


def shard_of(actor_id: str, shards: int) -> int:
    """Stable across processes, machines and Python versions (unlike ``hash``)."""
    return zlib.crc32(actor_id.encode()) % shards


def misplaced(actor_id: str, shard: int, shards: int) -> str | None:
    """Why an envelope for ``actor_id`` must not run in ``shard`` (it belongs to another), or
    None. Run there, it would make a second live copy of the actor beside the one in its own
    shard. Every envelope the runtime writes goes to ``shard_of`` its actor."""
    home = shard_of(actor_id, shards)
    return None if home == shard else f"{actor_id} belongs to shard {home}, not shard {shard}"


def foreign_reply_to(reply_to: str | None, reply_prefix: str) -> str | None:
    """Why a worker must not answer on ``reply_to``, or None. Askers (clients and workers)
    listen on reply channels of their namespace, ``reply_prefix<id>`` (``Keys.reply_channel``);
    any other channel could be anyone's."""
    if reply_to is None or (reply_to.startswith(reply_prefix) and len(reply_to) > len(reply_prefix)):
        return None
    return f"reply_to {reply_to!r} is not a reply channel of this namespace ({reply_prefix}<id>)"


def build_envelope(
    app: App | None,
    ref: ActorRef[Any],
    msg: BaseModel,
    *,
    message_id: str | None = None,
    reply_to: str | None = None,
    headers: dict[str, str] | None = None,
    strict_types: bool = False,
) -> Envelope:
    """Check ``msg`` against the target's handler when its class is known, then wrap it.

    Raises UnknownMessageType, pydantic's ValidationError, or (with
    ``strict_types``, inside workers) UnknownActorType.
    """
    if not isinstance(msg, BaseModel):
        raise TypeError(f"a message must be a pydantic model instance, not {type(msg).__name__}")
    if not isinstance(ref, ActorRef):
        raise TypeError(f"send needs an ActorRef (e.g. Counter.ref('k')), not {type(ref).__name__}")
    cls = app.resolve(ref) if app is not None else ref.cls
    if cls is None and strict_types:
        raise UnknownActorType(f"unknown actor type {ref.type!r}")
    payload = dump_model(msg)
    type_name = type(msg).__name__
    if cls is not None:
        # Re-validate the dump against the target's model: catches instances made with
        # model_construct() or mutated after validation, before they reach Redis.
        cls.message_model(type_name).model_validate(payload)
    return Envelope(
        id=message_id or new_message_id(),
        actor=ref.type,
        key=ref.key,
        type=type_name,
        payload=payload,
        headers=headers or {},
        reply_to=reply_to,
    )


def route(
    app: App | None,
    ref: ActorRef[Any],
    msg: BaseModel,
    shards: int,
    max_bytes: int,
    *,
    message_id: str | None = None,
    reply_to: str | None = None,
    headers: dict[str, str] | None = None,
    strict_types: bool = False,
) -> Routed:
    """``build_envelope``, then encode it under ``max_bytes`` (MessageTooLarge) and place it."""
    headers = telemetry.inject(dict(headers or {}))  # the sender's span becomes the turn's parent
    env = build_envelope(
        app, ref, msg, message_id=message_id, reply_to=reply_to, headers=headers, strict_types=strict_types
    )
    return Routed(env, encode_envelope(env, max_bytes), shard_of(env.actor_id, shards))


def route_control(ref: ActorRef[Any], control_type: str, shards: int) -> Routed:
    """A runtime control message (see ``messages.CANCEL``) to ``ref``: no payload, no handler."""
    env = Envelope(id=new_message_id(), actor=ref.type, key=ref.key, type=control_type, payload={})
    return Routed(env, encode_envelope(env, 1 << 20), shard_of(env.actor_id, shards))


def tick_envelope(actor_type: str, key: str, schedule: str, slot: datetime) -> Envelope:
    """The tick of one slot of a schedule; its id is the same for every worker that builds it."""
    stamp = int(slot.timestamp() * 1000)
    payload = {"schedule": schedule, "slot": slot.isoformat()}
    return Envelope(id=f"tick:{actor_type}/{key}#{schedule}@{stamp}", actor=actor_type, key=key, type=TICK,
                    payload=payload)  # fmt: skip

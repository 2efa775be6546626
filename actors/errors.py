"""Every exception the runtime raises on purpose. One root: ``ActorsError``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pydantic_core

if TYPE_CHECKING:
    from .codec import Envelope


class ActorsError(Exception):
    """Root of every error raised by the runtime."""


class ConfigurationError(ActorsError):
    """Settings disagree with each other or with what Redis records
    (for example a shard count different from the one the cluster was created with)."""


class DefinitionError(ActorsError):
    """An actor class or an app is defined wrongly (bad handler signature,
    two handlers for one message type, two actor types with one name)."""


class InvalidArgument(ActorsError, ValueError):
    """A call was given a value it cannot act on, such as an ``ask`` timeout that is not a
    finite number of seconds above 0. Raised at the call, before anything is written."""


class InvalidActorRef(ActorsError, ValueError):
    """An actor reference with an empty or non-text key, or a type name that is empty or
    holds ``/`` (the actor id is ``Type/key``)."""


class UnknownActorType(ActorsError):
    """A message names an actor type that the app does not define."""


class UnknownMessageType(ActorsError):
    """A message's type has no handler on the target actor type."""


class TooLarge(ActorsError):
    """Something the runtime would write to Redis is over its size setting. A write over the
    server's ``proto-max-bulk-len`` would reset the connection and restart the shard in a
    loop; these bounds refuse it first, with a reason that names the size and the setting."""


class MessageTooLarge(TooLarge):
    """An encoded message is over the configured ``max_message_bytes``."""


class StateTooLarge(TooLarge):
    """An actor's state, encoded after a turn, is over ``WorkerSettings.max_state_bytes``. The
    turn fails for good, without a retry (the same state would be too large again): its
    message is dead-lettered with reason ``state too large: ...``, and the state is not
    written (the actor keeps its last committed one)."""

    def __init__(self, actor_id: str, size: int, limit: int) -> None:
        super().__init__(
            f"the state of {actor_id} is {size} bytes encoded; the limit (max_state_bytes) is {limit}"
        )
        self.size = size
        self.limit = limit


class RecordTooLarge(TooLarge):
    """A journal record (a step's outcome) or the reply to an ask is over
    ``WorkerSettings.max_record_bytes``. A step's is journaled as the step's error (its
    function ran; its side effects happened): ``step`` raises ``StepFailed`` with
    ``error_type`` ``RecordTooLarge`` on every run. A reply's fails its turn for good: the
    message is dead-lettered with reason ``reply too large: ...`` and the asker gets that
    reason in a ``HandlerError``."""

    def __init__(self, what: str, size: int, limit: int) -> None:
        super().__init__(f"{what} is {size} bytes encoded; the limit (max_record_bytes) is {limit}")
        self.size = size
        self.limit = limit


class MessageNotEncodable(ActorsError, ValueError):
    """A message holds a value its encoding cannot store: an integer outside the 64-bit range
    of msgpack (-2**63 to 2**64 - 1). Raised at the send, before anything is written."""


class DecodeError(ActorsError):
    """A stream entry or payload could not be decoded."""


class InvalidEnvelope(DecodeError):
    """An envelope that decodes, but with an id, headers or reply channel the runtime must not
    act on. ``reason`` names the field (``invalid id``, ``invalid headers``, ``invalid
    reply_to``); ``envelope`` is the message without what cannot be trusted (no headers
    unless they are sound, no reply channel unless the id and the channel are), so that its
    dead letter can still answer a sound asker."""

    def __init__(self, reason: str, detail: str, envelope: Envelope) -> None:
        super().__init__(detail)
        self.reason = reason
        self.envelope = envelope


class AskTimeout(ActorsError, TimeoutError):
    """``ask`` got no reply within its timeout. The message may still be handled."""


class IdleTimeout(ActorsError, TimeoutError):
    """``Client.wait_idle`` (``actors status --wait-idle``) saw work left when its timeout came.
    ``work`` is what it saw last (a ``NamespaceWork``)."""

    def __init__(self, message: str, work: Any) -> None:
        super().__init__(message)
        self.work = work


class HandlerError(ActorsError):
    """The handler of an ``ask`` failed for good (after its retries), or the
    message was dead-lettered; carries the remote reason and traceback."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason if not detail else f"{reason}\n{detail}")
        self.reason = reason
        self.detail = detail


class Reject(ActorsError):
    """Raised by a handler to refuse its message for good ("insufficient funds"): a business
    outcome, not a failure. It is not retried and leaves no dead letter: the attempt's state
    changes and the sends it buffered are dropped (as for a failed attempt; sends already
    written by a journal write stay), the message is consumed, and an asker gets
    ``Rejected(reason, detail)``. ``detail`` is optional structured data, kept in its JSON
    form (a model becomes a dict; something with no JSON form raises here, where it is
    made). Raised by a step's function, it ends the step at once (not retried), is
    journaled as the step's outcome, and is raised again from ``step`` on every run, so
    that, left alone, it rejects the turn."""

    def __init__(self, reason: str, detail: Any = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail: Any = pydantic_core.to_jsonable_python(detail)


class Rejected(Reject):
    """``ask`` got a rejection: the handler raised ``Reject(reason, detail)``. From inside a
    turn it is journaled like any reply, so every run of the turn gets the same. It is a
    ``Reject``: left uncaught in a handler, it rejects that turn too, with the same reason
    and detail (an orchestrator passes its callee's refusal on to its own asker)."""


class LeaseLost(ActorsError):
    """A commit was refused because this worker no longer holds the shard's lease
    at the epoch the turn started with (fencing)."""


class TurnTimeout(ActorsError):
    """An attempt of a handler ran longer than its turn timeout (``WorkerSettings.turn_timeout``,
    or the actor type's ``turn_timeout``). It fails like any other error: it is retried by the
    retry policy, then dead-lettered."""


class TurnCancelled(ActorsError):
    """``actors cancel`` (``Client.cancel``) ended a turn while it ran: its message is
    dead-lettered with reason ``cancelled``, and an asker gets a HandlerError."""


class DurabilityTimeout(ActorsError, TimeoutError):
    """A write was applied by the server, but the namespace's durability level was not reached
    within ``RedisSettings.durability_timeout``: with ``fsync`` the server did not report its
    AOF fsynced (``WAITAOF``), with ``replica`` no replica acknowledged it (``WAIT``; none may be
    connected). Its outcome is unknown, as after a lost connection: the message may still be
    handled, or lost with the server; retry with an idempotency key. A worker whose commit
    fails so restarts the shard's runner from Redis."""


class Diverged(ActorsError):
    """A shard runner's memory disagrees with its inbox in Redis (the entries it meant to
    take were not the next ones); the runner starts afresh from Redis."""


class RedisUnavailable(ActorsError):
    """A starting worker could not reach Redis within its connect timeout (``actors worker
    --connect-timeout``); without one it waits for Redis as long as it takes."""


class ServerError(ActorsError):
    """The embedded Redis/Valkey server could not be found, started or stopped."""


class ServerNotRunning(ServerError):
    """A command that only reads found the project's embedded server stopped (it starts none)."""


class DuplicateItem(ActorsError):
    """``enqueue`` was given a dedup id that an item still queued or running holds."""

    def __init__(self, dedup_id: str, item_id: str) -> None:
        super().__init__(f"dedup id {dedup_id!r} is already queued or running (item {item_id})")
        self.dedup_id = dedup_id
        self.item_id = item_id


class InvalidIdempotencyKey(ActorsError, ValueError):
    """``send`` or ``ask`` was given an idempotency key that is not a non-empty ``str`` of at
    most 256 characters. Raised at the call, before anything is written."""


class IdempotencyConflict(ActorsError):
    """``send`` or ``ask`` reused an idempotency key, within ``idempotency_ttl``, for a message
    to the same actor that differs from the first (another type or payload). Nothing is
    written; ``message_id`` is the first message's."""

    def __init__(self, key: str, actor: str, message_id: str) -> None:
        super().__init__(
            f"idempotency key {key!r} was used for a different message to {actor} (message {message_id})"
        )
        self.key = key
        self.actor = actor
        self.message_id = message_id

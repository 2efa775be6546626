"""Envelopes and replies: msgpack on the wire, pydantic at the edges. Never pickle.

An inbox entry has one field, ``e``, holding an encoded ``Envelope``. The
payload inside it is the message model dumped in JSON mode (so datetimes,
UUIDs and enums survive) and packed with msgpack.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack  # type: ignore[import-untyped]  # msgpack ships no type information
from pydantic import BaseModel

from .errors import DecodeError, InvalidEnvelope, MessageNotEncodable, MessageTooLarge, StateTooLarge

ENVELOPE_VERSION = 1
FIELD = b"e"
"""The one field of an inbox or outbox entry."""


@dataclass(frozen=True, slots=True)
class Malformed:
    """A stream entry without exactly one ``e`` field. Refused (dead-lettered as undecodable)
    rather than read one way by one read path and another way by another."""

    fields: int
    """How many ``e`` fields it has."""
    first: bytes
    """The first of them (b"" if none): what its dead letter keeps."""

    @property
    def detail(self) -> str:
        if self.fields == 0:
            return f"the entry has no {FIELD.decode()!r} field"
        return f"the entry has {self.fields} {FIELD.decode()!r} fields"


def entry_envelope(flat: Sequence[bytes]) -> bytes | Malformed:
    """The envelope of a stream entry given as the server sends it, [field, value, ...]."""
    if len(flat) == 2 and flat[0] == FIELD:  # what the runtime writes: one field
        return flat[1]
    values = [flat[i + 1] for i in range(0, len(flat) - 1, 2) if flat[i] == FIELD]
    if len(values) == 1:
        return values[0]
    return Malformed(len(values), values[0] if values else b"")


def new_message_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message on its way to an actor."""

    id: str
    actor: str
    key: str
    type: str
    payload: Any
    headers: dict[str, str] = field(default_factory=dict)
    reply_to: str | None = None
    """The pub/sub channel (of the asking client or worker) that receives the reply to ``ask``."""

    @property
    def actor_id(self) -> str:
        return actor_id(self.actor, self.key)


def actor_id(actor_type: str, key: str) -> str:
    """The id of an actor inside its shard's state hash."""
    return f"{actor_type}/{key}"


def message_digest(env: Envelope) -> str:
    """sha256 (hex) of a message's type and payload: what a retry under one idempotency key
    must repeat. Not of the encoded envelope, whose id, headers (trace context) and reply
    channel differ between retries. The payload is a JSON-mode dump; JSON with sorted keys
    makes two equal payloads whose dicts were filled in another order agree."""
    text = json.dumps([env.type, env.payload], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


IDEMPOTENCY_HEADER = "idem"
"""Header of an ask sent under an idempotency key (a client's ``idempotency_key``, or a turn's
deterministic ask id): the key, so that the worker keeps the reply as long as the key's
marker, which sends every retry within its TTL to that reply."""

REPLAY_HEADER = "replay"
"""Header of a message replayed from the dead letters: how many times it was (``"1"``...)."""


def reply_marker_key(env: Envelope) -> str | None:
    """The idempotency key an ask was sent under (its reply lives as long as its marker)."""
    key = env.headers.get(IDEMPOTENCY_HEADER)
    return key if key and env.reply_to else None


def replay_generation(env: Envelope) -> int:
    """How many times this message was replayed from the dead letters (0: never)."""
    text = env.headers.get(REPLAY_HEADER, "")
    return int(text) if text.isdecimal() else 0


def ask_id(env: Envelope, position: int) -> str:
    """The message id of the ask at journal ``position`` of the turn of ``env``: the same on
    every run of that turn (its idempotency key: a re-run asks nothing twice), and new for
    each replay of the message from the dead letters, whose turn starts afresh and must ask
    again (under the first run's id it would be deduplicated, for ``idempotency_ttl``)."""
    generation = replay_generation(env)
    return f"{env.id}.ask{position}" if generation == 0 else f"{env.id}.r{generation}.ask{position}"


def item_id(env: Envelope, position: int) -> str:
    """The item id of the enqueue at journal ``position`` of the turn of ``env``: as for an
    ask, the same on every run of that turn (a re-run queues nothing twice), and new for each
    replay of the message from the dead letters, whose turn starts afresh and queues afresh."""
    generation = replay_generation(env)
    return f"{env.id}.q{position}" if generation == 0 else f"{env.id}.r{generation}.q{position}"


def replayed(raw: bytes) -> bytes:
    """A dead letter's envelope as it is replayed: the same message (its id, so its reply key
    and step idempotency keys, unchanged) with its replay generation raised. An envelope that
    does not decode soundly goes back unchanged (the worker refuses it again)."""
    try:
        env = decode_envelope(raw)
    except DecodeError:
        return raw
    headers = {**env.headers, REPLAY_HEADER: str(replay_generation(env) + 1)}
    # No bound here: the worker checks the size again, as it does for any message.
    return encode_envelope(dataclasses.replace(env, headers=headers), sys.maxsize)


def dump_model(model: BaseModel) -> Any:
    # warnings=False: an instance built with model_construct() may hold wrong types;
    # the caller validates the dump and raises pydantic's error instead of a warning.
    return model.model_dump(mode="json", warnings=False)


M = TypeVar("M", bound=BaseModel)

_VALIDATE_TAKES_EXTRA = "extra" in inspect.signature(BaseModel.model_validate_json).parameters
"""pydantic 2.12 and later can forbid extra fields for one call, at every depth."""


def validate_json(model: type[M], text: str) -> M:
    """``text`` (JSON) validated as ``model``, refusing a field the model does not have (a
    misspelt field would otherwise be dropped, and its default used), unless the model itself
    allows extra fields. Raises pydantic's ValidationError."""
    if model.model_config.get("extra") == "allow":
        return model.model_validate_json(text)
    if _VALIDATE_TAKES_EXTRA:
        return model.model_validate_json(text, extra="forbid")
    value = model.model_validate_json(text)
    data = json.loads(text)  # valid: it just validated
    names = {n for name, f in model.model_fields.items() for n in (name, f.alias) if n}
    unknown = sorted(set(data) - names) if isinstance(data, dict) else []
    if unknown:
        raise ValueError(f"{model.__name__} has no field {unknown[0]!r}")
    return value


def encode_envelope(env: Envelope, max_bytes: int) -> bytes:
    try:
        data: bytes = msgpack.packb(
            [ENVELOPE_VERSION, env.id, env.actor, env.key, env.type, env.payload, env.headers, env.reply_to],
            use_bin_type=True,
        )
    except OverflowError:  # the one thing a JSON dump holds that msgpack cannot
        raise MessageNotEncodable(
            f"message {env.type} to {env.actor_id} holds an integer outside the range msgpack "
            f"stores ({-(2**63)} to {2**64 - 1})"
        ) from None
    if len(data) > max_bytes:
        raise MessageTooLarge(
            f"message {env.type} to {env.actor_id} is {len(data)} bytes encoded; "
            f"the limit (max_message_bytes) is {max_bytes}"
        )
    return data


def decode_envelope(data: bytes) -> Envelope:
    try:
        items = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise DecodeError(f"entry is not valid msgpack: {exc}") from exc
    if not isinstance(items, list) or len(items) != 8 or items[0] != ENVELOPE_VERSION:
        raise DecodeError("entry is not a version-1 envelope")
    _, mid, actor, key, mtype, payload, headers, reply_to = items
    if _sound(mid, actor, key, mtype, headers, reply_to):  # the common case, checked cheaply
        return Envelope(mid, actor, key, mtype, payload, headers, reply_to)
    for name, value in (("actor", actor), ("key", key), ("type", mtype)):
        if not isinstance(value, str):  # the message has no address: nothing to say about it
            raise DecodeError(f"the envelope's {name} is {_kind(value)}, not a string")
    problems = {
        "invalid id": _id_problem(mid),
        "invalid headers": _header_problem(headers),
        "invalid reply_to": _reply_to_problem(reply_to),
    }
    if any(problems.values()):
        # Keep only what can be trusted: the headers drive a queued item's slot and the trace
        # parent, the id names the reply key, reply_to the channel published on.
        sound = Envelope(
            "" if problems["invalid id"] else mid, actor, key, mtype, payload,
            {} if problems["invalid headers"] else headers,
            None if problems["invalid id"] or problems["invalid reply_to"] else reply_to,
        )  # fmt: skip
        reason, detail = next((r, d) for r, d in problems.items() if d)
        raise InvalidEnvelope(reason, detail, sound)
    return Envelope(mid, actor, key, mtype, payload, headers, reply_to)


def _sound(mid: Any, actor: Any, key: Any, mtype: Any, headers: Any, reply_to: Any) -> bool:
    """Every field of the envelope is of its type (what the checks below would find)."""
    return (
        type(mid) is str and mid != "" and type(actor) is str and type(key) is str and type(mtype) is str
        and type(headers) is dict and (reply_to is None or type(reply_to) is str)
        and (not headers or all(type(k) is str and type(v) is str for k, v in headers.items()))
    )  # fmt: skip


def _kind(value: Any) -> str:
    return "nil" if value is None else type(value).__name__


def _id_problem(mid: Any) -> str | None:
    """Why a message id cannot be used (it names the reply key and a queued item), or None."""
    if not isinstance(mid, str):
        return f"the id is {_kind(mid)}, not a string"
    return None if mid else "the id is empty"


def _reply_to_problem(reply_to: Any) -> str | None:
    """Why reply_to is not a channel name or nil, or None. (Whose channel it is, the worker
    checks: ``routing.foreign_reply_to``.)"""
    if reply_to is None or isinstance(reply_to, str):
        return None
    return f"reply_to is {_kind(reply_to)}, not a string or nil"


def _header_problem(headers: Any) -> str | None:
    """Why headers are not the map of strings to strings they must be, or None."""
    if not isinstance(headers, dict):
        return f"the headers are {_kind(headers)}, not a map of strings to strings"
    for name, value in headers.items():
        if not isinstance(name, str):
            return f"header name {name!r} is {_kind(name)}, not a string"
        if not isinstance(value, str):
            return f"header {name!r} is {_kind(value)}, not a string"
    return None


@dataclass(frozen=True, slots=True)
class Routed:
    """A checked message, encoded, with the shard whose inbox it goes to (see ``routing``)."""

    envelope: Envelope
    data: bytes
    shard: int


REJECTION = "actors.Reject"
"""The ``type`` of a reply whose handler raised ``Reject``: ``ok`` is false, ``error`` holds
the reason and ``payload`` the detail. (Other error replies have no type, so a client that
predates rejections reads one as a HandlerError.)"""


@dataclass(frozen=True, slots=True)
class Reply:
    """The outcome of an ``ask``: a value (model dump or None), an error, or a rejection
    (``type`` REJECTION)."""

    message_id: str
    ok: bool
    type: str | None
    payload: Any
    error: str = ""
    detail: str = ""


def encode_reply(reply: Reply) -> bytes:
    data: bytes = msgpack.packb(
        [reply.message_id, reply.ok, reply.type, reply.payload, reply.error, reply.detail],
        use_bin_type=True,
    )
    return data


def decode_reply(data: bytes) -> Reply:
    try:
        mid, ok, rtype, payload, error, detail = msgpack.unpackb(data, raw=False)
    except Exception as exc:
        raise DecodeError(f"reply is not valid: {exc}") from exc
    return Reply(mid, bool(ok), rtype, payload, error, detail)


def encode_state(model: BaseModel, max_bytes: int, owner: str) -> bytes:
    """The snapshot of actor ``owner``'s state; StateTooLarge past ``max_bytes``."""
    data: bytes = msgpack.packb(model.model_dump(mode="json"), use_bin_type=True)
    if len(data) > max_bytes:
        raise StateTooLarge(owner, len(data), max_bytes)
    return data


def packed_size(value: Any) -> int:
    """How many bytes ``value`` takes in msgpack, as a journal record holds it."""
    return len(msgpack.packb(value, use_bin_type=True))


def decode_state(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False)
    except Exception as exc:
        raise DecodeError(f"state snapshot is not valid msgpack: {exc}") from exc

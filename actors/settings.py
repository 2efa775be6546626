"""Settings, split by concern. Each is a frozen, validated pydantic model."""

from __future__ import annotations

import math
import os
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import ConfigurationError, InvalidArgument

MiB = 1024 * 1024
DEFAULT_SHARDS = 16
DAY = 24 * 3600.0
MAX_SHARDS = 4096
URL_ENV = "ACTORS_REDIS_URL"
NAMESPACE_ENV = "ACTORS_NAMESPACE"

Durability = Literal["everysec", "fsync", "replica"]
"""When a write that tells someone it happened (a send, a turn's commit) is acknowledged:
``everysec`` once the server applied it (its AOF is fsynced every second: a crash of the
server's machine can lose the last second or two), ``fsync`` once the server's AOF holds it
on disk (``WAITAOF 1 0``), ``replica`` once at least one replica has it (``WAIT 1``)."""
DURABILITY_LEVELS: tuple[Durability, ...] = ("everysec", "fsync", "replica")
DEFAULT_DURABILITY: Durability = "everysec"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RedisSettings(_Frozen):
    """Where Redis is. ``url=None`` means the project's embedded server."""

    url: str | None = None
    namespace: str = Field(default="actors", pattern=r"^[A-Za-z0-9_.\-]+$")
    durability: Durability | None = None
    """The namespace's durability level (see ``Durability``), recorded in Redis like the shard
    count by the first process that uses the namespace; every later one must name the same
    level or None (then it follows the record; ``everysec`` if there is none yet)."""
    durability_timeout: float = Field(default=5.0, gt=0)
    """Seconds a write waits for the level (an fsync, a replica's acknowledgement) before it
    fails with ``DurabilityTimeout`` (the write was applied; its durability is unknown)."""

    @classmethod
    def from_env(
        cls, url: str | None = None, namespace: str | None = None, durability: Durability | None = None
    ) -> RedisSettings:
        """Explicit arguments win over ``ACTORS_REDIS_URL`` / ``ACTORS_NAMESPACE``."""
        return cls(
            url=url or os.environ.get(URL_ENV) or None,
            namespace=namespace or os.environ.get(NAMESPACE_ENV) or "actors",
            durability=durability,
        )


def check_shard_count(value: object, where: str = "shards") -> int:
    """``value`` as a shard count (a whole number from 1 to ``MAX_SHARDS``), else ConfigurationError."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SHARDS:
        raise ConfigurationError(f"{where} must be a whole number from 1 to {MAX_SHARDS}, not {value!r}")
    return value


def check_seconds(value: object, what: str) -> float:
    """``value`` as a duration: a finite number of seconds above 0, else InvalidArgument (a
    0 would give up before anything could happen, a NaN would mean no bound at all)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise InvalidArgument(f"{what} must be a finite number of seconds above 0, not {value!r}")
    return float(value)


def redact_url(url: str | None) -> str:
    """``url`` as it may be printed: its password replaced by ``***`` (None: the embedded server)."""
    if not url:
        return "the embedded server"
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


class MessageSettings(_Frozen):
    """Limits and retention shared by clients and workers."""

    max_message_bytes: int = Field(default=1 * MiB, gt=0)
    idempotency_ttl: float = Field(default=24 * 3600.0, gt=0)
    """How long an idempotency key is remembered (seconds)."""
    reply_ttl: float = Field(default=300.0, gt=0)
    """How long the reply to an ``ask`` is kept for a late or re-asking reader."""


class LeaseSettings(_Frozen):
    """Shard ownership. A dead worker's shards move after at most ttl + renew_interval."""

    ttl: float = Field(default=2.0, gt=0)
    renew_interval: float = Field(default=0.5, gt=0)
    stall_limit: float = Field(default=10.0, gt=0)
    """Leases are renewed from a thread of their own while the worker's event loop is busy,
    but not once it has not run for this many seconds: then its shards move."""

    @model_validator(mode="after")
    def _renew_before_expiry(self) -> LeaseSettings:
        if self.renew_interval * 2 > self.ttl:
            raise ValueError("lease renew_interval must be at most half the lease ttl")
        return self


class RetrySettings(_Frozen):
    """What happens when a handler raises: retried with exponential backoff, then dead-lettered."""

    max_attempts: int = Field(default=3, ge=1)
    backoff: float = Field(default=0.05, ge=0)
    backoff_max: float = Field(default=5.0, ge=0)

    def delay(self, attempt: int) -> float:
        return float(min(self.backoff_max, self.backoff * 2 ** (attempt - 1)))


class WorkerSettings(_Frozen):
    """How a worker process runs its shards."""

    shards: int | None = Field(default=None, ge=1, le=MAX_SHARDS)
    """None: use the count Redis records (16 if none is recorded yet)."""
    lease: LeaseSettings = LeaseSettings()
    retry: RetrySettings = RetrySettings()
    messages: MessageSettings = MessageSettings()
    idle_timeout: float = Field(default=60.0, gt=0)
    """An activation with no message for this long is dropped from memory."""
    max_activations: int = Field(default=10_000, ge=1)
    """Per shard; past it the least recently used idle activations are dropped."""
    read_count: int = Field(default=500, ge=1)
    max_inflight: int = Field(default=2_000, ge=1)
    """Per shard: messages read but not yet committed before reading pauses."""
    commit_batch: int = Field(default=256, ge=1)
    commit_batch_bytes: int = Field(default=4 * MiB, gt=0)
    """A commit takes writes until it has ``commit_batch`` of them or this many bytes (their
    snapshots, open turns, envelopes, replies and texts); a larger write goes alone. The
    commit script gets its whole batch as one argument, which the server refuses past its
    ``proto-max-bulk-len`` (512 MB by default, often less on managed services). Ordinary
    writes are a few hundred bytes, so this binds only when big states or records come
    together; it also bounds how long one script holds the server."""
    max_state_bytes: int = Field(default=16 * MiB, gt=0)
    """An actor's state, encoded, at most; a turn that leaves a larger one fails for good
    (``StateTooLarge``: dead-lettered at once, the state not written). The snapshot is
    rewritten by every turn that changes it, so a state near this is data that belongs
    elsewhere; keep it under the server's ``proto-max-bulk-len`` with room to spare."""
    max_record_bytes: int = Field(default=4 * MiB, gt=0)
    """One journal record (a step's outcome) or an ask's reply, encoded, at most
    (``RecordTooLarge``): a step's larger outcome is journaled as the step's error, a larger
    reply fails its turn for good. A record is written once, but a resumed turn reads its
    whole journal back, so records are meant to be small."""
    block_ms: int = Field(default=1_000, ge=1)
    trim_interval: float = Field(default=5.0, gt=0)
    turn_timeout: float | None = Field(default=3600.0, gt=0)
    """Seconds an attempt of a handler may run, steps and asks included (an actor type may
    set its own); past it the attempt fails with TurnTimeout, is retried by the retry policy,
    then dead-lettered. None: no bound. Each resumption of a suspended turn is an attempt."""
    rolling_upgrade: bool = False
    """Start even if live workers of the namespace serve another app or version whose types
    this worker's app lacks (``--rolling-upgrade``; see ``actors.sharing``): for a version that
    drops a type, or a rollback. A version that only adds types needs no flag."""
    allow_eviction: bool = False
    """Start even if the server's ``maxmemory-policy`` is not ``noeviction`` (with a warning):
    such a server may delete mailboxes, states and leases when its memory is full."""
    max_redeliveries: int = Field(default=3, ge=1)
    """A turn that was started and then interrupted by the end of its runner (its process
    was killed or exited, or its event loop blocked until the lease moved) is recovered
    and run again this many times; the next time, it is dead-lettered instead (a message
    that kills its worker). Progress (a journal write) starts the count afresh. Such a
    handler runs at most ``max_redeliveries + 2`` times: a message an idle runner read
    with XREAD and that ended its worker before the next commit took it into the group
    is read afresh, uncounted, once more."""
    dlq_max_len: int | None = Field(default=100_000, ge=0)
    """Per shard: past this many dead letters the oldest are trimmed as new ones are written
    (``XADD ... MAXLEN ~``: whole stream nodes go, so up to one node, 100 entries by default,
    more may stay). 0 or None: no bound."""
    dlq_max_age: float | None = Field(default=30 * DAY, ge=0)
    """Seconds a dead letter is kept: older ones are trimmed every ``trim_interval``.
    0 or None: no bound."""

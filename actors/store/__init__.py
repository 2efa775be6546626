"""Every Redis call the runtime makes, and nothing else. No other module imports redis.

The store speaks bytes and small typed records (``records``); encoding stays in
``codec``. ``Store`` is one object made of parts by what they serve: ``connection``
(clients, scripts, errors), ``inbox`` (a shard's streams), ``commits`` (a shard's actors:
state, the commit script, open turns, timers), ``leases`` (membership, leases and the
LeaseKeeper thread), ``limits`` (limiters and queues).
"""

from __future__ import annotations

from redis.exceptions import ResponseError

from ..keys import Keys
from .commits import CommitStore
from .connection import (
    STALL_TIMEOUT,
    TRANSIENT_ERRORS,
    describe_error,
    error_reason,
    honour_cancel,
    is_refusal,
    is_transient,
    make_client,
)
from .inbox import InboxStore
from .leases import LOOP_LAG_WARNING, LeaseKeeper, LeaseStore
from .limits import LimitStore
from .records import (
    BACKLOG,
    DONE,
    DUPLICATE,
    QUEUED,
    RELEASED,
    DeadLetter,
    Deferred,
    Entry,
    KeyedAppend,
    LoadedActor,
    OutItem,
    ShardInfo,
    ShardWork,
    Take,
    Write,
)
from .work import WorkStore

__all__ = [
    "BACKLOG", "DONE", "DUPLICATE", "LOOP_LAG_WARNING", "QUEUED", "RELEASED", "ResponseError",
    "STALL_TIMEOUT", "TRANSIENT_ERRORS", "DeadLetter", "Deferred", "Entry", "KeyedAppend", "LeaseKeeper",
    "LoadedActor", "OutItem", "ShardInfo", "ShardWork", "Store", "Take", "Write", "describe_error",
    "error_reason", "honour_cancel", "is_refusal", "is_transient",
]  # fmt: skip


class Store(InboxStore, CommitStore, LeaseStore, LimitStore, WorkStore):
    """Typed access to the runtime's Redis keys for one namespace."""

    @classmethod
    def from_url(cls, url: str, namespace: str) -> Store:
        return cls(
            make_client(url, retries=3), Keys(namespace), appender=make_client(url, retries=0), url=url
        )

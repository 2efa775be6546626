"""Every Redis call the runtime makes, and nothing else. No other module imports redis.

The store speaks bytes and small typed records (``records``); encoding stays in
``codec``. ``Store`` is one object made of parts by what they serve: ``connection``
(clients, scripts, errors), ``inbox`` (a shard's streams), ``commits`` (a shard's actors:
state, the commit script, open turns, timers), ``leases`` (membership, leases and the
LeaseKeeper thread), ``limits`` (limiters and queues), ``markers`` (idempotency markers
whose protection has ended), ``durability`` and ``acks`` (the namespace's durability level,
and the wait it adds to every write that tells someone it happened).
"""

from __future__ import annotations

from redis.exceptions import ResponseError

from ..keys import Keys
from .commits import CommitStore
from .connection import STALL_TIMEOUT, TRANSIENT_ERRORS, honour_cancel, is_transient, make_client
from .durability import DurabilityStore
from .inbox import InboxStore
from .leases import LOOP_LAG_WARNING, LeaseKeeper, LeaseStore
from .limits import LimitStore
from .markers import MarkerStore
from .records import (
    BACKLOG,
    DONE,
    DUPLICATE,
    QUEUED,
    RELEASED,
    DeadLetter,
    Deferred,
    Dispatch,
    Entry,
    LoadedActor,
    OutItem,
    ShardInfo,
    StoredTurn,
    Take,
    Write,
    write_bytes,
)

__all__ = [
    "BACKLOG", "DONE", "DUPLICATE", "LOOP_LAG_WARNING", "QUEUED", "RELEASED", "ResponseError",
    "STALL_TIMEOUT", "TRANSIENT_ERRORS", "DeadLetter", "Deferred", "Dispatch", "Entry", "LeaseKeeper",
    "LoadedActor", "OutItem", "ShardInfo", "Store", "StoredTurn", "Take", "Write", "honour_cancel",
    "is_transient", "write_bytes",
]  # fmt: skip


class Store(InboxStore, CommitStore, LeaseStore, LimitStore, MarkerStore, DurabilityStore):
    """Typed access to the runtime's Redis keys for one namespace."""

    @classmethod
    def from_url(cls, url: str, namespace: str) -> Store:
        return cls(
            make_client(url, retries=3), Keys(namespace), appender=make_client(url, retries=0), url=url
        )

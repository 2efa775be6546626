"""Every Redis call the runtime makes, and nothing else. No other module imports redis.

The store speaks bytes and small typed records (``records``); encoding stays in
``codec``. ``Store`` is one object made of parts by what they serve: ``connection``
(clients, scripts, errors), ``inbox`` (a shard's streams), ``commits`` (a shard's actors:
state, the commit script, open turns, timers), ``leases`` (membership, leases and the
LeaseKeeper thread), ``limits`` (limiters and queues), ``markers`` (idempotency markers
whose protection has ended), ``namespace`` (the app each worker serves), ``health`` (the
server and the user's rights, for a starting worker and ``doctor``), ``durability`` and ``acks``
(the namespace's durability level, and the wait it adds to every write that tells someone it
happened). ``reader`` is a worker's blocking inbox reads, many shards in one ``XREAD``, on
connections of its own (``InboxReader``), and ``feed`` one runner's wait on it (``InboxFeed``).
"""

from __future__ import annotations

from redis.exceptions import ResponseError

from ..keys import Keys
from .cluster import is_cluster
from .cluster_reader import ClusterInboxReader
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
from .durability import DurabilityStore
from .feed import InboxFeed
from .health import NO_USER, RUNTIME_COMMANDS, HealthStore, Refusal, acl_rules
from .inbox import InboxStore
from .leases import LOOP_LAG_WARNING, LeaseKeeper, LeaseStore
from .limits import LimitStore
from .markers import MarkerStore
from .namespace import AppRecord, NamespaceStore
from .reader import InboxReader
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
    KeyedAppend,
    LoadedActor,
    OutItem,
    ShardInfo,
    ShardWork,
    StoredTurn,
    Take,
    Write,
    write_bytes,
)
from .work import WorkStore

__all__ = [
    "BACKLOG", "DONE", "DUPLICATE", "LOOP_LAG_WARNING", "QUEUED", "RELEASED", "ResponseError",
    "STALL_TIMEOUT", "TRANSIENT_ERRORS", "DeadLetter", "Deferred", "Dispatch", "Entry", "InboxFeed",
    "InboxReader", "Reader", "KeyedAppend", "LeaseKeeper", "LoadedActor", "OutItem", "ShardInfo", "ShardWork",
    "Store", "StoredTurn", "Take", "Write", "describe_error", "error_reason", "honour_cancel",
    "is_refusal", "is_transient", "write_bytes", "AppRecord", "NO_USER", "Refusal",
    "RUNTIME_COMMANDS", "acl_rules",
]  # fmt: skip


Reader = InboxReader | ClusterInboxReader


class Store(InboxStore, CommitStore, LeaseStore, LimitStore, MarkerStore, NamespaceStore, HealthStore,
            WorkStore, DurabilityStore):  # fmt: skip
    """Typed access to the runtime's Redis keys for one namespace."""

    def inbox_reader(self, count: int, block_ms: int) -> Reader:
        """The worker's blocking inbox reads: one ``XREAD`` for many shards on a server, a
        call per shard on a cluster (where one call cannot span slots)."""
        if is_cluster(self.redis):
            return ClusterInboxReader(self, count, block_ms)
        return InboxReader(self, count, block_ms)

    @classmethod
    def from_url(cls, url: str, namespace: str) -> Store:
        return cls(
            make_client(url, retries=3), Keys(namespace), appender=make_client(url, retries=0), url=url
        )

"""Queues behind limiters: how an item is queued, its headers, and the end of its dedup id.

Items wait in the limiter's queue (``queue_*.lua``) until ``Limits`` dispatches them to
their actors' inboxes as fast as the limiter allows."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .codec import Routed, decode_envelope
from .errors import DecodeError, DuplicateItem
from .store import Store

log = logging.getLogger("actors.limits")


QUEUE_HEADER = "queue"
DEDUP_HEADER = "dedup"
DEDUP_TTL_MS = 7 * 24 * 3600 * 1000
"""How long a dedup id is kept at most should no process of the app ever look at its queue
again; while any worker runs, one whose item has ended is freed within a lease TTL."""
CHECKS_PER_CALL = 100
"""Dispatched items a check loop looks at per round trip (it goes on while batches are full)."""
DISPATCH_DEADLINE_MS = 30_000
POLL = 5.0
"""Seconds between looks at a queue when no event says it changed."""


@dataclass(frozen=True, slots=True)
class QueueItem:
    """How an item is queued: ``priority`` (-1000..1000, higher first), ``dedup_id`` (refused
    while another item holding it is queued or running), ``partition`` (partitions take turns)."""

    priority: int = 0
    dedup_id: str = ""
    partition: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.priority, int) or not -1000 <= self.priority <= 1000:
            raise ValueError(f"priority must be an integer from -1000 to 1000, not {self.priority!r}")

    def headers(self, name: str) -> dict[str, str]:
        return {QUEUE_HEADER: name, DEDUP_HEADER: self.dedup_id}


async def enqueue(store: Store, name: str, routed: Routed, item: QueueItem, seen_ttl_ms: int) -> str:
    """Put ``routed`` (built with ``item.headers(name)``) on limiter ``name``'s queue."""
    args = (
        name, routed.envelope.id, routed.shard, routed.data, item.dedup_id, item.partition,
        item.priority, DEDUP_TTL_MS, seen_ttl_ms,
    )  # fmt: skip
    queued, holder = await store.queue_enqueue(*args)
    if not queued and await forget_if_ended(store, name, holder):
        # Its holder's turn ended unrecorded (and no worker has noticed yet): ask again.
        queued, holder = await store.queue_enqueue(*args)
    if not queued:
        raise DuplicateItem(item.dedup_id, holder)
    return holder


async def forget_if_ended(store: Store, name: str, item_id: str) -> bool:
    """Free the dedup id of dispatched item ``item_id`` if its shard no longer holds it;
    whether it did. An item still queued (no ``out`` record yet) is alive."""
    out = await store.queue_out_item(name, item_id)
    if out is None or (await store.items_alive([out]))[0]:
        return False
    await store.queue_done([(name, out.item_id, out.dedup_id)])
    return True


def queued_item(headers: dict[str, str], message_id: str) -> tuple[str, str, str] | None:
    """(limiter, item id, dedup id) if the message came through a queue."""
    name = headers.get(QUEUE_HEADER)
    return None if not name else (name, message_id, headers.get(DEDUP_HEADER, ""))


def item_target(envelope: bytes) -> str:
    """The actor a queued envelope goes to: the scope of its item id as an idempotency key.
    One that cannot be decoded (only a raw write can queue it) still goes on to its inbox,
    where the worker dead-letters it with the reason, rather than stalling the queue."""
    try:
        return decode_envelope(envelope).actor_id
    except DecodeError:
        return ""

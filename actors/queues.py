"""Queues behind limiters: how an item is queued, its headers, and the end of its dedup id.

Items wait in the limiter's queue (``queue_*.lua``) until ``Limits`` dispatches them to
their actors' inboxes as fast as the limiter allows."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from .codec import Routed, decode_envelope
from .errors import DecodeError, DuplicateItem
from .markers import Markers
from .store import Dispatch, Store

log = logging.getLogger("actors.limits")


QUEUE_HEADER = "queue"
DEDUP_HEADER = "dedup"
DEDUP_TTL_MS = 7 * 24 * 3600 * 1000
"""How long a dedup id is kept at most should no process of the app ever look at its queue
again; while any worker runs, one whose item has ended is freed within a lease TTL."""
CHECKS_PER_CALL = 100
"""Dispatched items a check loop looks at per round trip (it goes on while batches are full)."""
DISPATCH_DEADLINE_MS = 30_000
"""A dispatch lapses this long after its rate wait unless confirmed: the item goes back to
``ready`` for another dispatch."""
APPEND_MARGIN_MS = 5_000
"""A dispatcher appends an item only while its dispatch surely has this long left (by its own
clock, counted from before it asked for the item), so that the append reaches Redis before
the dispatch lapses and another dispatch of the item can start: the assumption that no
request takes this long to arrive is the one the item's single append rests on once its
dispatch marker is gone (as a lease's effects rest on the lease's margin)."""
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


async def enqueue_from_client(
    store: Store, name: str, routed: Routed, item: QueueItem, seen_ttl_ms: int
) -> str:
    """``enqueue`` for a client, whose item id is its call's own: once the call has returned,
    no retry of it can run, so the item id's ``seen:`` marker goes at once (best effort)."""
    item_id = await enqueue(store, name, routed, item, seen_ttl_ms)
    try:
        await store.forget_markers([(store.keys.queue_seen(name, item_id), 0)])
    except Exception as exc:  # it expires on its own
        log.warning("queue %r: could not delete the marker of item %s: %s", name, item_id, exc)
    return item_id


async def append_item(store: Store, item: Dispatch, deadline: float, ttl_ms: int) -> str | None:
    """Append a dispatched item to its actor's inbox, once (``enqueue_once.lua`` keyed by the
    item id: a dispatch repeated after one that appended and died appends nothing), and only
    while its dispatch surely lasts ``APPEND_MARGIN_MS`` more: ``deadline`` is when it lapses
    by this process's ``time.monotonic()``, reckoned from before the dispatch was asked for.
    Returns the inbox entry id ('' if appended before and since trimmed), or None if not
    appended (too late: the dispatch lapses, and the item is dispatched again)."""
    left = deadline - APPEND_MARGIN_MS / 1000 - time.monotonic()
    if left <= 0:
        log.warning("dispatch of item %s is too late to append (it lapses; dispatched again)", item.item_id)
        return None
    target = item_target(item.envelope)
    try:
        async with asyncio.timeout(left):
            # No digest: an item's envelope never changes (queue_enqueue keeps the first).
            appended, entry_id = await store.append_once(
                item.shard, target, item.item_id, item.item_id, item.envelope, ttl_ms, digest=""
            )
    except TimeoutError:
        log.warning("append of item %s did not return in time (it lapses; dispatched again)", item.item_id)
        return None
    if not appended:  # an earlier dispatch appended it, and died unconfirmed
        entry_id = await store.find_entry(item.shard, item.envelope)
    return entry_id


async def confirm_item(
    store: Store, markers: Markers, name: str, item: Dispatch, entry_id: str, check_ms: int
) -> None:
    """The item is in its actor's inbox: it leaves the queue (``queue_dispatched.lua``), and
    its dispatch marker goes as soon as no dispatch of it can still append it: at once, or,
    if the caller's dispatch had lapsed and another one holds the item, once that one's
    deadline has passed."""
    target = item_target(item.envelope)
    live_ms = await store.queue_dispatched(name, item.item_id, entry_id, target, check_ms, item.deadline_ms)
    if live_ms >= 0:  # the other dispatch appends only before its deadline (see append_item)
        keep_ms = live_ms + APPEND_MARGIN_MS if live_ms else 0
        markers.item_dispatched(item.shard, target, item.item_id, keep_ms)


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

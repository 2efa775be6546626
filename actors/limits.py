"""Rate and concurrency limiters that hold across every worker process.

    app = App(Crawler, limiters=[Limiter("llm", rate=50, per=timedelta(minutes=1), concurrency=10)])
    ...
    await self.step(call_llm, prompt, limiter="llm")      # each attempt takes a token and a slot
    class Crawler(Actor, limiter="crawl"): ...            # each turn does

Rate: GCRA on Redis's clock (``limiter_acquire.lua``). A token is a reservation:
the script says how long to wait, so a token costs one Redis call however many
wait. ``burst`` tokens may go at once; the long-run rate is ``rate`` per ``per``.

Concurrency: a slot is a member of a zset scored by its lease expiry, renewed
while held (by the worker's LeaseKeeper thread, so a stalled event loop does not lose
it), released when the work ends (completes, fails or is cancelled; a step function
running in a thread holds its slot until the thread ends, even past its timeout). A
holder that dies (SIGKILL) loses its slots when their leases expire. A process
asks for one slot at a time per limiter (its local waiters queue in order) and
asks again when any process releases a slot (pub/sub) or the earliest lease
expires, so waiting costs no polling.

``per_worker`` caps concurrent holders in each worker process, without Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import Any

from .codec import Routed
from .errors import ConfigurationError
from .limiter import Limiter
from .markers import Markers
from .queues import (
    CHECKS_PER_CALL,
    DISPATCH_DEADLINE_MS,
    POLL,
    QueueItem,
    append_item,
    confirm_item,
    enqueue,
)
from .store import RELEASED, Store

log = logging.getLogger("actors.limits")


class _Queue:
    """One limiter's state in this process."""

    def __init__(self, limiter: Limiter) -> None:
        self.limiter = limiter
        self.local = asyncio.Semaphore(limiter.per_worker) if limiter.per_worker else None
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.released = asyncio.Event()
        """Set when any process releases a slot (or queues an item): waiters ask again."""
        self.changed = asyncio.Event()
        """Set when an item is queued, or a slot released while the dispatcher found none free."""
        self.full = False
        """The dispatcher's last look found every slot taken."""
        self.holding = 0


class Limits:
    """The limiters of one process (a worker's, shared by all its turns)."""

    def __init__(
        self, store: Store, limiters: dict[str, Limiter], lease_ms: int, idempotency_ttl_ms: int = 0,
        *, renew: bool = True, markers: Markers | None = None,
    ) -> None:  # fmt: skip
        self.store = store
        self.markers = markers or Markers(store)
        """Where the dispatchers leave the markers of the items they confirmed."""
        self._own_markers = markers is None
        self.lease_ms = lease_ms
        self.idempotency_ttl_ms = idempotency_ttl_ms or 24 * 3600 * 1000
        self._queues = {name: _Queue(limiter) for name, limiter in limiters.items()}
        self._held: set[tuple[str, str]] = set()
        """Slots held now, (limiter, holder); the worker's LeaseKeeper thread renews them."""
        self._held_lock = threading.Lock()
        self._holding: dict[asyncio.Task[Any] | None, set[str]] = {}
        """The limiters each task holds now (a turn's, its queued item's, its step's)."""
        self._renew = renew
        """Renew held slots from this event loop; a worker renews them from its LeaseKeeper
        thread instead (``held_slots``), so that a stalled loop does not lose them."""
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        if not self._queues:
            return
        if self._own_markers:
            self.markers.start()
        declared = {n: q.limiter.model_dump_json() for n, q in self._queues.items()}
        recorded = await self.store.declare_limiters(declared)
        for name, definition in declared.items():
            if recorded.get(name) != definition:
                log.warning(
                    "limiter %r is defined differently by another process: %s (here: %s)",
                    name, recorded.get(name), definition,
                )  # fmt: skip
        subscribed = asyncio.Event()
        events = self.store.keys.limiter_events()
        self._tasks = [
            asyncio.create_task(self.store.listen(events, self._on_event, subscribed)),
        ]
        if self._renew:
            self._tasks.append(asyncio.create_task(self._renew_loop()))
        await subscribed.wait()
        self._tasks += [asyncio.create_task(self._dispatch_loop(q)) for q in self._queues.values()]
        self._tasks += [asyncio.create_task(self._check_loop(name)) for name in self._queues]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._own_markers:
            await self.markers.stop()

    def waiting(self) -> dict[str, int]:
        """Per limiter: how many turns of this process wait for it."""
        return {name: len(q.waiters) for name, q in self._queues.items()}

    def check(self, name: str) -> None:
        if name not in self._queues:
            known = ", ".join(sorted(self._queues)) or "none"
            raise ConfigurationError(f"no limiter named {name!r} in the app (it defines: {known})")

    @contextlib.asynccontextmanager
    async def hold(self, name: str | None) -> AsyncIterator[None]:
        """Wait for a token and a slot of limiter ``name`` (None: no limit); the slot is
        given back on exit. A hold of a limiter the same task already holds (a step with
        ``limiter="L"`` in a turn of a type limited by ``L``, or fed by ``L``'s queue) is
        already held: it takes nothing more, rather than wait for itself at the cap."""
        if name is None or name in self._holding.get(asyncio.current_task(), ()):
            yield
            return
        self.check(name)
        queue = self._queues[name]
        async with queue.local or contextlib.nullcontext():
            holder = await self._acquire(queue) if queue.limiter.global_ else None
            queue.holding += 1
            try:
                with self._held_by_task(name):
                    yield
            finally:
                queue.holding -= 1
                if holder is not None and queue.limiter.concurrency is not None:
                    await self._release(name, holder)

    async def _acquire(self, queue: _Queue) -> str:
        """Wait for this process's turn, then for a slot; sleep out the rate reservation."""
        limiter = queue.limiter
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.waiters.append(turn)
        if queue.waiters[0] is turn:
            turn.set_result(None)
        holder = uuid.uuid4().hex
        try:
            await turn
            while True:
                queue.released.clear()  # before asking: a release heard meanwhile wakes us at once
                granted, wait_ms, _ = await self.store.limiter_acquire(
                    limiter.name, holder, self.lease_ms, limiter.concurrency or 0,
                    limiter.interval_ms, limiter.tolerance_ms,
                )  # fmt: skip
                if granted:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(queue.released.wait(), timeout=max(wait_ms, 1) / 1000)
            if limiter.concurrency is not None:
                self._hold_slot(limiter.name, holder)
        finally:
            queue.waiters.remove(turn)
            if queue.waiters and not queue.waiters[0].done():
                queue.waiters[0].set_result(None)
        if wait_ms:
            try:
                await asyncio.sleep(wait_ms / 1000)
            except BaseException:
                if limiter.concurrency is not None:
                    await self._release(limiter.name, holder)
                raise
        return holder

    async def _release(self, name: str, holder: str) -> None:
        with self._held_lock:
            self._held.discard((name, holder))
        try:
            await asyncio.shield(self.store.limiter_release(name, holder))
        except Exception as exc:  # its lease expires on its own
            log.warning("could not release a slot of limiter %r: %s", name, exc)

    def _on_event(self, data: bytes) -> None:
        kind, _, name = data.decode(errors="replace").partition(":")
        queue = self._queues.get(name)
        if queue is None:
            return
        if f"{kind}:" == RELEASED:
            queue.released.set()
            if queue.full:  # a dispatcher that found every slot taken may go on
                queue.changed.set()
        else:
            queue.changed.set()

    # ---- queues --------------------------------------------------------------------
    async def enqueue(self, name: str, routed: Routed, item: QueueItem) -> str:
        """Queue a routed message (its envelope carries ``item.headers``); returns its item id."""
        self.check(name)
        return await enqueue(self.store, name, routed, item, self.idempotency_ttl_ms)

    @contextlib.asynccontextmanager
    async def hold_item(self, name: str | None, item_id: str) -> AsyncIterator[None]:
        """Hold the slot a queued item was dispatched with (taken again if its lease
        expired meanwhile) while its turn runs."""
        queue = self._queues.get(name) if name is not None else None
        if queue is None:
            yield
            return
        async with queue.local or contextlib.nullcontext():
            if queue.limiter.concurrency is None:
                with self._held_by_task(queue.limiter.name):
                    yield
                return
            await self._take_item_slot(queue, item_id)
            try:
                with self._held_by_task(queue.limiter.name):
                    yield
            finally:
                await self._release(queue.limiter.name, item_id)

    async def _take_item_slot(self, queue: _Queue, item_id: str) -> None:
        assert queue.limiter.concurrency is not None
        while True:
            queue.released.clear()
            granted, wait_ms, _ = await self.store.limiter_acquire(
                queue.limiter.name, item_id, self.lease_ms, queue.limiter.concurrency, 0, 0
            )
            if granted:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(queue.released.wait(), timeout=max(wait_ms, 1) / 1000)
        self._hold_slot(queue.limiter.name, item_id)

    @contextlib.contextmanager
    def _held_by_task(self, name: str) -> Iterator[None]:
        """Note that the current task holds limiter ``name`` (not the tasks it starts: they
        wait for their own slots)."""
        task = asyncio.current_task()
        assert task is not None
        names = self._holding.setdefault(task, set())
        names.add(name)
        try:
            yield
        finally:
            names.discard(name)
            if not names:
                del self._holding[task]

    def _hold_slot(self, name: str, holder: str) -> None:
        with self._held_lock:
            self._held.add((name, holder))

    def held_slots(self) -> list[tuple[str, str]]:
        """The slots held now, (limiter, holder); safe to call from any thread. Whoever holds
        a slot gives it back when its code ends; until then the worker renews it (from its
        LeaseKeeper thread, whatever the event loop does)."""
        with self._held_lock:
            return list(self._held)

    async def _dispatch_loop(self, queue: _Queue) -> None:
        """Move the queue's items to their actors' inboxes as fast as the limiter allows."""
        limiter = queue.limiter
        while True:
            queue.changed.clear()
            try:
                asked = time.monotonic()  # the dispatch's deadline is reckoned from before it
                status, wait_ms, item = await self.store.queue_dispatch(
                    limiter.name, self.lease_ms, limiter.concurrency or 0,
                    limiter.interval_ms, limiter.tolerance_ms, DISPATCH_DEADLINE_MS,
                )  # fmt: skip
                queue.full = status == 0
                if item is not None:
                    await asyncio.sleep(wait_ms / 1000)
                    deadline = asked + (wait_ms + DISPATCH_DEADLINE_MS) / 1000
                    entry_id = await append_item(self.store, item, deadline, self.idempotency_ttl_ms)
                    if entry_id is not None:
                        await confirm_item(
                            self.store, self.markers, limiter.name, item, entry_id, self._check_interval_ms
                        )
                    continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("queue %r: dispatch failed: %s", limiter.name, exc)
                status, wait_ms = 2, 0
            timeout = max(wait_ms, 1) / 1000 if status == 0 else POLL
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(queue.changed.wait(), timeout=timeout)

    @property
    def _check_interval_ms(self) -> int:
        """Between two looks at a dispatched item's shard: with a sweep every quarter lease,
        an item's dedup id is freed at most 3/4 of a lease TTL after its turn ended unrecorded
        (a lease TTL if the process that claimed the look died before it looked)."""
        return self.lease_ms // 2

    async def _check_loop(self, name: str) -> None:
        """Free the dedup ids of dispatched items whose turns ended with no ``items_done``
        (their worker died, or stopped, between the commit and ``queue_done``; or a
        ``wait_for`` of another turn consumed the item). The end of a turn cannot be
        recorded with its commit: the shard's keys and the limiter's are in two hash tags."""
        while True:
            await asyncio.sleep(self.lease_ms / 4000)
            try:
                while await self._check_items(name) == CHECKS_PER_CALL:
                    pass
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next sweep, or another process's, looks again
                log.warning("queue %r: could not look at dispatched items: %s", name, exc)

    async def _check_items(self, name: str) -> int:
        """One batch of due looks; how many items were looked at."""
        due = await self.store.queue_checks(name, self._check_interval_ms, CHECKS_PER_CALL)
        if not due:
            return 0
        alive = await self.store.items_alive(due)
        ended = [(name, out.item_id, out.dedup_id) for out, live in zip(due, alive, strict=True) if not live]
        if ended:
            await self.store.queue_done(ended)
        return len(due)

    async def items_done(self, items: list[tuple[str, str, str]]) -> None:
        """(limiter, item id, dedup id) of queued items whose turns ended."""
        try:
            await self.store.queue_done(items)
        except Exception as exc:  # slots and dedup ids expire on their own
            log.warning("could not record the end of %d queued items: %s", len(items), exc)

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            held = self.held_slots()
            if not held:
                continue
            try:
                await self.store.limiter_renew(held, self.lease_ms)
            except Exception as exc:
                log.warning("could not renew limiter slots: %s", exc)

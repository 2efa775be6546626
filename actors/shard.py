"""The turn loop of one owned shard: receive -> turn -> commit -> forward.

Reading this file top to bottom follows a message:

1. ``_read_loop`` claims the previous owner's pending entries, then reads new
   ones; ``_timer_loop`` takes due timers (sleeps, wait timeouts, and, for a new
   owner, the open turns to recover).
2. ``_dispatch`` checks each entry (bad input goes to the dead-letter stream)
   and queues it on its actor's activation, loading actors in one call.
3. ``_drain_actor`` does an actor's work one piece at a time, in order: its open
   turn if it has one (resumed when woken or when a message it waits for
   arrives; other messages are deferred behind it), then its deferred messages,
   then its queue. ``_turn`` calls the handler, with retries; a durable
   primitive may write the turn's journal (``flush``) or suspend it (``Suspend``).
4. ``_commit_loop`` applies every ready write of the shard in one fenced script.
5. ``_forward_loop`` moves committed cross-shard messages to their shards.

Any Redis error or lost lease ends the runner; its owner (the worker) drops
every activation and starts afresh from what Redis holds, so memory never
runs ahead of a commit.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import time
import traceback
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry.trace import SpanKind
from pydantic import BaseModel

from . import telemetry
from .actor import Actor, Handler
from .codec import (
    Envelope,
    Malformed,
    Reply,
    decode_envelope,
    decode_state,
    dump_model,
    encode_envelope,
    encode_reply,
    encode_state,
)
from .errors import (
    ActorsError,
    DecodeError,
    Diverged,
    InvalidEnvelope,
    LeaseLost,
    TurnCancelled,
    TurnTimeout,
    UnknownActorType,
    UnknownMessageType,
)
from .journal import FOREVER_MS, Journal, JournalMismatch, OpenTurn, Record, RedisClock, Suspend
from .lease import Lease
from .limits import queued_item
from .messages import CANCEL, TICK, Tick
from .routing import foreign_reply_to, misplaced, shard_of, tick_envelope
from .schedules import Schedule, slot_datetime
from .settings import WorkerSettings
from .store import BACKLOG, DUPLICATE, Entry, LoadedActor, Take, Write
from .turn import Queued, TurnContext, TurnInfo, TurnServices

log = logging.getLogger("actors.shard")

TIMER_BATCH = 500
TIMER_POLL_MAX = 5.0
"""Seconds between two looks at the timer index when no known timer is due sooner."""
TURN_CHECK = 1.0
"""Seconds between two looks for turns past their timeout."""
DEFERRED_SCAN = 1000
"""At most this many deferred messages are offered to a ``wait_for``."""


class ShardReset(ActorsError):
    """Memory may disagree with Redis (a turn was already committed): start afresh."""


class Activation:
    """An actor in memory: its instance, last committed snapshot, open turn and queued messages."""

    __slots__ = (
        "actor",
        "backlog",
        "broken",
        "counted",
        "id",
        "last_used",
        "open",
        "queue",
        "recovering",
        "running",
        "snapshot",
        "task",
        "woken",
    )

    def __init__(self, aid: str, actor: Actor | None, snapshot: bytes | None, broken: str = "") -> None:
        self.id = aid
        self.actor = actor
        self.snapshot = snapshot
        self.queue: deque[Queued] = deque()
        self.task: asyncio.Task[None] | None = None
        self.last_used = time.monotonic()
        self.broken = broken
        self.open: OpenTurn | None = None
        """Its open turn as Redis holds it (running, suspended or parked)."""
        self.woken = False
        """Its open turn's timer fired (or it was running when its owner died): resume it."""
        self.backlog = False
        """Messages may be deferred in Redis behind a turn that has since closed."""
        self.recovering = False
        """Loaded at timer 0: its open turn or deferred head may have been running when its
        previous runner ended; the next start of it is counted (``count_delivery``)."""
        self.counted = False
        """A start of its current turn was counted: the write that ends the turn forgets it."""
        self.running: TurnContext | None = None
        """The attempt of its handler running now (for timeouts and ``actors cancel``)."""


@dataclass(slots=True)
class Source:
    """Where the message of a running turn lives, as the next write must take it from."""

    act: Activation
    origin: str
    """``i`` inbox, ``o`` open turn, ``q`` head of the deferred list."""
    ref: str | bytes
    raw: bytes
    recovered: bool = False
    """A previous runner may have started this turn and died with it: count this start."""


class ShardRunner:
    def __init__(self, lease: Lease, consumer: str, services: TurnServices, settings: WorkerSettings) -> None:
        self.lease = lease
        self.shard = lease.shard
        self.steps = lease.steps
        self._margin = settings.lease.renew_interval
        """An effect starts only if the lease surely lasts this much longer (see ``fenced``)."""
        self.consumer = consumer
        self.services = services
        self.store = services.store
        self.settings = settings
        self.clock = RedisClock()
        self.activations: dict[str, Activation] = {}
        self.inflight = 0
        self.parked = 0
        """Of ``inflight``, turns waiting for the reply to an ask (see ``park``)."""
        self.lag = 0
        """Inbox entries not yet read, as of the last chores (only kept when metrics are on)."""
        self._room = asyncio.Event()
        self._room.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = asyncio.Event()
        self._writes: list[tuple[Write, asyncio.Future[int]]] = []
        self._commit_wakeup = asyncio.Event()
        self._forward_wakeup = asyncio.Event()
        self._seen_newest = ""
        self._seen = 0
        """Inbox entries ``read_after`` showed this runner, and the newest one's id."""
        self._taken = 0
        """How many of those a commit took into the group (see Take)."""
        self._take_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._reading: asyncio.Future[list[Entry]] | None = None
        self._timer_wakeup = asyncio.Event()
        self._next_timer_ms = 0
        self._actor_tasks: set[asyncio.Task[None]] = set()
        self._task_room = asyncio.Event()
        self._waking: set[asyncio.Task[None]] = set()
        self._actor_failure: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reply_ttl_ms = int(settings.messages.reply_ttl * 1000)
        self._claimed: set[str] = set()
        """Entries claimed from a previous runner's pending list, not yet started."""
        self._running: set[Activation] = set()
        """Activations whose handler is running an attempt now."""

    async def run(self) -> None:
        """Run until cancelled, drained, or an error (which propagates)."""
        try:
            await self._sync_clock()
            async with asyncio.TaskGroup() as tg:
                helpers = [
                    tg.create_task(self._commit_loop(), name=f"commit-{self.shard}"),
                    tg.create_task(self._forward_loop(), name=f"forward-{self.shard}"),
                    tg.create_task(self._watch_actors(), name=f"actors-{self.shard}"),
                    tg.create_task(self._watch_turns(), name=f"turns-{self.shard}"),
                ]
                timers = tg.create_task(self._timer_loop(), name=f"timers-{self.shard}")
                schedules = tg.create_task(self._schedule_loop(), name=f"schedules-{self.shard}")
                await self._read_loop()
                await timers
                await schedules
                await self._idle.wait()
                while self._actor_tasks:  # resumed turns and deferred messages finish too
                    await asyncio.wait(set(self._actor_tasks))
                for task in helpers:
                    task.cancel()
        finally:
            for task in self._actor_tasks:
                task.cancel()
            await asyncio.gather(*self._actor_tasks, return_exceptions=True)

    async def _watch_actors(self) -> None:
        """Turn a failed actor task (lost lease, Redis error) into the runner's failure."""
        await self._actor_failure

    async def _watch_turns(self) -> None:
        """Every second, end the attempts that have run past their turn timeout."""
        while True:
            await asyncio.sleep(TURN_CHECK)
            now = time.monotonic()
            for act in list(self._running):
                ctx = act.running
                if ctx is None or act.actor is None or ctx.interrupted is not None:
                    continue
                limit = type(act.actor).turn_timeout or self.settings.turn_timeout
                if limit is not None and now - ctx.started > limit:
                    why = f"{act.id}: the handler ran past its turn timeout of {limit}s"
                    log.warning("shard %s: %s", self.shard, why)
                    self._interrupt(act, TurnTimeout(why))

    def _interrupt(self, act: Activation, why: BaseException) -> None:
        """End the running attempt of ``act``: cancel its handler now, or once the journal
        write of it in flight is done (``flush`` raises then, if it is the handler's own)."""
        ctx = act.running
        if ctx is None or ctx.interrupted is not None:
            return
        ctx.interrupted = why
        task = act.task
        if task is None:
            return
        if ctx.writing is None:
            task.cancel()
        elif not ctx.flushing:
            ctx.writing.add_done_callback(lambda _: task.cancel() if ctx.in_handler else None)

    def _actor_done(self, task: asyncio.Task[None]) -> None:
        self._actor_tasks.discard(task)
        self._waking.discard(task)
        self._task_room.set()
        if not task.cancelled() and task.exception() is not None:
            self._fail(task.exception())  # type: ignore[arg-type]

    def drain(self) -> None:
        """Stop reading; ``run`` returns once every read message is committed."""
        self._stopping.set()
        self._timer_wakeup.set()
        if self._reading is not None:
            self._reading.cancel()

    async def _sync_clock(self) -> None:
        sent = time.monotonic()
        now = await self.store.server_time_ms()
        self.clock.observe(now, sent, time.monotonic())

    # ---- 1. receive --------------------------------------------------------------
    async def _read_loop(self) -> None:
        """Take the inbox's entries in order: one round trip per wake-up.

        Entries enter the group (and so a pending list) only through fenced scripts,
        so a paused former owner can never take any. At start the runner claims its
        pending entries and reads with the fenced ``read_new`` until a batch is not
        full: the group has then delivered everything up to its newest entry. From
        there it blocks on a plain ``XREAD`` after the newest entry it has seen, and
        the turns of what that returns start at once; the next commit takes those
        entries into the group first (``Take``), and effects outside the commit wait
        for that (``confirmed``). After ``block_ms`` with nothing new, it takes what
        it has seen and reads with ``read_new`` again.
        """
        s = self.settings
        claimed = await self.store.claim_pending(self.shard, self.consumer, s.read_count)
        self._claimed = {entry_id for entry_id, _ in claimed}
        await self._dispatch(claimed)
        next_chores = time.monotonic() + s.trim_interval
        after: str | None = None
        while not self._stopping.is_set():
            if not self._room.is_set():
                await self._relieve()
                await self._wait_for_room(s.trim_interval)
            if self._stopping.is_set():
                break
            if not self._room.is_set():
                pass  # still full: only the chores below, then look again
            elif after is None:
                entries, newest = await self.store.read_new(
                    self.shard, self.lease.value, self.consumer, s.read_count
                )
                await self._dispatch(entries)
                after = None if len(entries) == s.read_count else newest
            else:
                seen = await self._read_after(after)
                if seen is None:
                    return
                if seen:
                    after = self._seen_newest = seen[-1][0]
                    self._seen += len(seen)
                    await self._dispatch(seen)
                else:
                    # Quiet for block_ms: take what is seen (long turns may hold it) and
                    # read with the fenced script next; both tell a paused former owner
                    # at once that its lease is gone.
                    await self.confirmed()
                    after = None
            if time.monotonic() >= next_chores:
                await self._chores()
                next_chores = time.monotonic() + s.trim_interval

    async def _wait_for_room(self, timeout: float) -> None:
        """Until reading may go on, draining begins, or ``timeout`` seconds have passed."""
        waits = {asyncio.ensure_future(self._room.wait()), asyncio.ensure_future(self._stopping.wait())}
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    async def _read_after(self, after: str) -> list[Entry] | None:
        """Entries after ``after``, blocking up to ``block_ms`` for one ([] if none came);
        None if draining began meanwhile."""
        s = self.settings
        # A task of its own, so that drain() can cancel the wait and only the wait.
        self._reading = asyncio.ensure_future(
            self.store.read_after(self.shard, after, s.read_count, s.block_ms)
        )
        try:
            return await self._reading
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._stopping.is_set() and task is not None and not task.cancelling():
                return None
            raise
        finally:
            self._reading = None

    async def confirmed(self) -> None:
        """Return once every entry this runner has dispatched is taken into the group as its
        own (raises LeaseLost if the lease is gone). Effects outside the commit (a step's
        function, an ask, queueing, a limiter hold) wait for this, so a former owner that
        has not noticed its lease is gone cannot cause them."""
        if self._taken >= self._seen:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._take_waiters.append((self._seen, waiter))
        self._commit_wakeup.set()
        await waiter

    async def fenced(self) -> None:
        """Return once this runner may start an effect outside its commit: every entry it
        has dispatched is taken into the group as its own (``confirmed``) and its lease
        surely lasts at least a renew interval longer (``Lease.deadline``). Otherwise the
        runner fails with LeaseLost, even if a handler catches the error."""
        await self.confirmed()
        remaining = self.lease.remaining()
        if remaining < self._margin:
            exc = LeaseLost(
                f"shard {self.shard}: the lease at epoch {self.lease.epoch} is not surely held "
                f"long enough to start an effect ({remaining:.3f}s left)"
            )
            self._fail(exc)
            raise exc

    def _fail(self, exc: BaseException) -> None:
        """End the runner with ``exc`` (its owner decides what follows)."""
        if not self._actor_failure.done():
            self._actor_failure.set_exception(exc)

    async def _chores(self) -> None:
        await self._open_long_turns(older_than=self.settings.trim_interval)
        await self.store.trim_inbox(self.shard)
        self._evict_idle()
        if telemetry.metering():
            self.lag = (await self.store.shard_info(self.shard)).lag or 0

    def _evict_idle(self) -> None:
        now = time.monotonic()
        idle = [(a.last_used, aid) for aid, a in self.activations.items() if a.task is None and not a.queue]
        excess = len(self.activations) - self.settings.max_activations
        idle.sort()
        for n, (last_used, aid) in enumerate(idle):
            if n < excess or now - last_used > self.settings.idle_timeout:
                del self.activations[aid]

    async def _timer_loop(self) -> None:
        """Wake actors whose timers are due. First, every actor left at 0 by a previous
        owner (open turns it was running or had woken, deferred messages), in batches."""
        async for actor_ids in self.store.timers_at_zero(self.shard, TIMER_BATCH):
            if self._stopping.is_set():
                return  # draining: the next owner finds them at 0
            await self._wake(actor_ids, recovering=True)
        while not self._stopping.is_set():
            sent = time.monotonic()
            now, later, due = await self.store.due_timers(self.shard, self.lease.value, TIMER_BATCH)
            self.clock.observe(now, sent, time.monotonic())
            if due:
                await self._wake(due, recovering=False)
            if len(due) == TIMER_BATCH:
                continue
            pause = TIMER_POLL_MAX if later is None else min(TIMER_POLL_MAX, max(0.0, (later - now) / 1000))
            self._next_timer_ms = now + int(pause * 1000)
            self._timer_wakeup.clear()
            if self._stopping.is_set():
                return  # drain() may have set the wake-up just before it was cleared
            try:
                await asyncio.wait_for(self._timer_wakeup.wait(), timeout=pause)
            except TimeoutError:
                pass

    async def _schedule_loop(self) -> None:
        """Fire the due slots of the schedules of this shard's actors into the inbox."""
        mine = [
            (f"{cls.type_name}/{key}#{spec.name}", cls.type_name, key, spec)
            for cls in self.services.app.actor_types
            for spec, _ in cls.schedules.values()
            for key in spec.keys
            if shard_of(f"{cls.type_name}/{key}", self.services.shards) == self.shard
        ]
        if not mine:
            return
        marks = await self.store.schedule_marks(self.shard, [m[0] for m in mine], self.clock.upper())
        last = dict(zip([m[0] for m in mine], marks, strict=True))
        while not self._stopping.is_set():
            for field, actor_type, key, spec in mine:
                fire, newest = spec.due(last[field], self.clock.upper())
                if newest > last[field]:
                    last[field] = await self._fire(field, actor_type, key, spec, fire, newest)
            wake = min(spec.next_after(last[field]) for field, _, _, spec in mine)
            pause = min(TIMER_POLL_MAX, max(0.0, (wake - self.clock.lower()) / 1000))
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=pause)
            except TimeoutError:
                pass

    async def _fire(
        self, field: str, actor_type: str, key: str, spec: Schedule, slots: list[int], newest: int
    ) -> int:
        """Fire ``slots`` and record ``newest`` as done; returns the newest slot Redis records."""
        limit = self.settings.messages.max_message_bytes
        envelopes = [tick_envelope(actor_type, key, spec.name, slot_datetime(slot)) for slot in slots]
        ticks = [(slot, encode_envelope(env, limit)) for slot, env in zip(slots, envelopes, strict=True)]
        sent = time.monotonic()
        now, mark = await self.store.fire_schedule(self.shard, self.lease.value, field, newest, ticks)
        self.clock.observe(now, sent, time.monotonic())
        return mark

    def _timer_set(self, due_ms: int) -> None:
        """A turn of ours set a timer; look again sooner if it is due before the next look."""
        if due_ms < self._next_timer_ms:
            self._timer_wakeup.set()

    async def _wake(self, actor_ids: list[str], recovering: bool) -> None:
        """Resume the open turns (or deferred messages) of ``actor_ids``: ones a previous
        runner left at 0 (``recovering``: it may have been running them), or timers due."""
        # Bounded like reading: a takeover or a burst of timers must not start every turn at
        # once. Only turns woken here count: ones waiting for a limiter must not stop timers.
        while len(self._waking) >= self.settings.max_inflight:
            self._task_room.clear()
            await self._task_room.wait()
        await self._activate({aid: aid.partition("/")[0] for aid in actor_ids})
        telemetry.record("timers_fired", len(actor_ids))
        for aid in actor_ids:
            act = self.activations[aid]
            act.recovering = recovering
            if act.open is not None:
                act.woken = True
            else:
                act.backlog = True  # deferred messages left, or a stale timer to settle
            self._waking.add(self._start(act))

    # ---- 2. check and queue -------------------------------------------------------
    async def _dispatch(self, entries: list[Entry]) -> None:
        accepted: list[Queued] = []
        for entry_id, raw in entries:
            checked = self._check(entry_id, raw)
            if isinstance(checked, Queued):
                self._took()
                accepted.append(checked)
            else:
                reason, detail, env = checked
                write = self._dead_letter_write("", "i", entry_id, _kept(raw), reason, detail, env)
                await self._write(write)
        await self._activate({q.envelope.actor_id: q.envelope.actor for q in accepted})
        for queued in accepted:
            act = self.activations[queued.envelope.actor_id]
            act.queue.append(queued)
            if queued.message is None and act.running is not None:  # a cancel ends a running turn too
                self._interrupt(act, TurnCancelled(f"{act.id}: its running turn was cancelled"))
            self._start(act)

    def _check(
        self, entry_id: str | None, raw: bytes | Malformed
    ) -> Queued | tuple[str, str, Envelope | None]:
        """The entry as a queued message, or (reason, detail, envelope if decodable) to dead-letter."""
        if isinstance(raw, Malformed):
            return "undecodable", raw.detail, None
        try:
            env = decode_envelope(raw)
        except InvalidEnvelope as exc:  # an id, headers or reply channel not to act on
            return exc.reason, str(exc), exc.envelope
        except DecodeError as exc:
            return "undecodable", str(exc), None
        limit = self.settings.messages.max_message_bytes
        if len(raw) > limit:
            return "too large", f"{len(raw)} bytes; the limit (max_message_bytes) is {limit}", env
        foreign = foreign_reply_to(env.reply_to, self.store.keys.reply_channel(""))
        if foreign is not None:
            return "invalid reply_to", foreign, dataclasses.replace(env, reply_to=None)
        try:
            cls = self.services.app.actor_type(env.actor)
            misplaced_in = misplaced(env.actor_id, self.shard, self.services.shards)
            if misplaced_in is not None:  # its own shard holds the actor: no second copy here
                return "wrong shard", misplaced_in, env
            if env.type == CANCEL:
                return Queued(entry_id, raw, env, None)
            model = Tick if env.type == TICK else cls.message_model(env.type)
        except UnknownActorType as exc:
            return "unknown actor type", str(exc), env
        except UnknownMessageType as exc:
            return "unknown message type", str(exc), env
        try:
            message = model.model_validate(env.payload)
        except Exception as exc:  # a user validator may raise anything, not only ValidationError
            return "invalid payload", f"{type(exc).__name__}: {exc}", env
        if isinstance(message, Tick) and message.schedule not in cls.schedules:
            return "unknown schedule", f"{cls.__name__} has no schedule named {message.schedule!r}", env
        return Queued(entry_id, raw, env, message)

    async def _activate(self, wanted: dict[str, str]) -> None:
        """Make sure each actor id has an activation, loading actors in one call."""
        missing = [aid for aid in wanted if aid not in self.activations]
        if not missing:
            return
        loaded = await self.store.load_actors(self.shard, missing)
        for aid, found in zip(missing, loaded, strict=True):
            # Another caller may have activated it while we loaded; theirs is as fresh.
            self.activations.setdefault(aid, self._restore(wanted[aid], aid, found))

    def _restore(self, actor_type: str, aid: str, found: LoadedActor) -> Activation:
        key = aid.partition("/")[2]
        try:
            cls = self.services.app.actor_type(actor_type)
            state = _load_state(cls, found.snapshot)
            act = Activation(aid, cls(key, state), found.snapshot)
        except Exception as exc:  # UnknownActorType, DecodeError, or whatever a validator raises
            act = Activation(aid, None, found.snapshot, broken=f"actor {aid} cannot be loaded: {exc}")
        if found.open_turn is not None:
            try:
                act.open = OpenTurn.decode(found.open_turn)
            except DecodeError as exc:
                reason = f"its open turn cannot be read: {exc}"
                act.open = OpenTurn(b"", [], None, FOREVER_MS, reason, write=_write_number(found.open_turn))
            act.woken = found.timer == 0
        else:
            act.backlog = found.timer is not None
        act.recovering = found.timer == 0
        return act

    def _start(self, act: Activation) -> asyncio.Task[None]:
        if act.task is None:
            act.task = asyncio.create_task(self._drain_actor(act))
            self._actor_tasks.add(act.task)
            act.task.add_done_callback(self._actor_done)
        return act.task

    # ---- 3. an actor's work, in order --------------------------------------------------
    async def _drain_actor(self, act: Activation) -> None:
        while await self._advance(act):
            pass
        act.task = None
        act.last_used = time.monotonic()

    async def _advance(self, act: Activation) -> bool:
        """Do the actor's next piece of work; False when it has none."""
        if act.open is not None:
            return await self._advance_open(act)
        if act.backlog:
            await self._advance_backlog(act)
            return True
        if not act.queue:
            return False
        queued = act.queue.popleft()
        try:
            if queued.message is None:  # a cancel with no open turn to end
                log.info("shard %s: %s has no open turn to cancel", self.shard, act.id)
                await self._write(Write("c", act.id, "i", queued.entry_id or ""))
            else:
                entry_id = queued.entry_id or ""
                recovered = entry_id in self._claimed
                self._claimed.discard(entry_id)
                await self._turn(act, queued, Source(act, "i", entry_id, queued.raw, recovered))
        finally:
            self._finished()
        return True

    async def _advance_open(self, act: Activation) -> bool:
        """Work for an actor with an open turn: cancel it, resume it, or defer messages behind it."""
        assert act.open is not None
        control = next((q for q in act.queue if q.message is None), None)
        if control is not None:
            await self._cancel(act, control)
            return True
        waiting = act.open.waiting
        wanted = waiting is not None and any(q.envelope.type == waiting for q in act.queue)
        if (act.woken or wanted or not act.open.suspended) and not act.open.parked:
            timer = act.woken and act.open.suspended  # not a running turn a dead owner left
            self._note_wake(act.open, "timer fired" if timer else "wait resumed" if wanted else "recovered")
            act.woken = False
            await self._resume(act)
            return True
        behind = list(act.queue)
        if behind:
            await self._write(Write("f", act.id, defers=[(q.entry_id or "", q.raw) for q in behind]))
            self._settled(act, behind)
            return True
        return False

    def _note_wake(self, open_turn: OpenTurn, what: str) -> None:
        """What woke an open turn: a timer's lateness (metric), and a span in the trace of
        the turn's message."""
        lateness = max(0, self.clock.lower() - open_turn.due_ms) if what == "timer fired" else 0
        if what == "timer fired":
            telemetry.record("timer_lateness", lateness)
        if not telemetry.tracing():
            return
        try:
            env = decode_envelope(open_turn.envelope)
        except DecodeError:
            return
        attributes = {"actor.type": env.actor, "actor.key": env.key, "timer.lateness_ms": lateness}
        with telemetry.span(f"{what} {env.actor}", attributes, parent=env.headers):
            pass

    async def _advance_backlog(self, act: Activation) -> None:
        """Handle the oldest message deferred behind a turn that has closed."""
        raws = await self.store.deferred(self.shard, act.id, 1)
        if not raws:
            act.backlog = await self._write(Write("s", act.id)) == BACKLOG
            return
        raw = raws[0]
        checked = self._check(None, raw)
        if isinstance(checked, Queued):
            await self._turn(act, checked, Source(act, "q", raw, raw, self._recovering(act)))
            return
        reason, detail, env = checked
        act.backlog = (
            await self._write(self._dead_letter_write(act.id, "q", raw, raw, reason, detail, env)) == BACKLOG
        )

    async def _resume(self, act: Activation) -> None:
        """Run an open turn again from the top; its journal replays what it already did."""
        assert act.open is not None
        checked = self._check(None, act.open.envelope)
        if isinstance(checked, Queued):
            source = Source(act, "o", str(act.open.write), act.open.envelope, self._recovering(act))
            await self._turn(act, checked, source)
            return
        reason, detail, env = checked
        write = self._dead_letter_write(
            act.id, "o", str(act.open.write), act.open.envelope, reason, detail, env
        )
        self._closed(act, await self._write(write))

    @staticmethod
    def _recovering(act: Activation) -> bool:
        """Whether this start of the actor's open turn or deferred head is a recovery (once)."""
        recovering, act.recovering = act.recovering, False
        return recovering

    async def _cancel(self, act: Activation, control: Queued) -> None:
        assert act.open is not None
        checked = self._check(None, act.open.envelope)
        env = checked.envelope if isinstance(checked, Queued) else checked[2]
        reason = "cancelled"
        detail = f"its open turn was cancelled (message {control.envelope.id})"
        write = self._dead_letter_write(
            act.id, "o", str(act.open.write), act.open.envelope, reason, detail, env, acks=[control]
        )
        log.info("shard %s: cancelled the open turn of %s", self.shard, act.id)
        self._closed(act, await self._write(write))
        self._settled(act, [control])

    @staticmethod
    def _closed(act: Activation, result: int) -> None:
        """The actor's open turn (or deferred message) was just closed by a write."""
        act.open = None
        act.woken = False
        act.backlog = result == BACKLOG

    # ---- 3b. turns ---------------------------------------------------------------------
    async def _turn(self, act: Activation, queued: Queued, source: Source) -> None:
        env = queued.envelope
        actor = act.actor
        handler = None if actor is None else _handler(type(actor), queued)
        if actor is None or handler is None:
            reason = act.broken or (
                f"{env.actor} has no handler for {env.type} and no open wait_for received it"
            )
            write = self._dead_letter_write(act.id, source.origin, source.ref, source.raw, reason, "", env)
            self._closed(act, await self._write(write))
            return
        if source.origin == "i" and isinstance(source.ref, str):  # the entry id is its append time
            waited = self.clock.lower() - int(source.ref.partition("-")[0])
            telemetry.record("queue_wait", max(0, waited), {"actor.type": env.actor})
        if not source.recovered:
            await self._attempts(act, actor, handler, queued, source)
        elif await self._count_start(act, env, "look") == 0:
            await self._counted_attempts(act, actor, handler, queued, source)
        else:
            # Interrupted before as a recovered turn: it may be the one that ends its worker.
            # Such turns run one at a time in the process, and are counted only once they
            # run, so that the culprit does not take the turns waiting with it down with
            # it, run after run, until they too would count as poison.
            async with self.services.quarantine:
                await self._counted_attempts(act, actor, handler, queued, source)

    async def _counted_attempts(self, act: Activation, actor: Actor, handler: Handler, queued: Queued,
                                source: Source) -> None:  # fmt: skip
        """Count this start of a recovered turn; run it, or past ``max_redeliveries``
        dead-letter its message instead (a message that kills its worker)."""
        starts = await self._count_start(act, queued.envelope)
        if starts > self.settings.max_redeliveries:
            await self._poisoned(act, queued.envelope, source, starts)
        else:
            await self._attempts(act, actor, handler, queued, source)

    async def _attempts(self, act: Activation, actor: Actor, handler: Handler, queued: Queued,
                        source: Source) -> None:  # fmt: skip
        """Run the handler, retried by the retry policy, and write the turn's outcome."""
        env = queued.envelope
        retry = self.settings.retry
        attempt = 0
        self._running.add(act)
        try:
            while True:
                attempt += 1
                info = TurnInfo(env.id, env.type, self.shard, self.lease.epoch, self.consumer, attempt)
                records = [] if act.open is None else _copy_records(act.open.records)
                ctx = TurnContext(self.services, self, self.shard, env, info, Journal(records), source=source)
                actor._turn = act.running = ctx
                try:
                    result = await self._call(ctx, actor, handler, queued)
                    _take_back_interruption(ctx)  # a handler that swallowed it finished anyway
                    if ctx.journal.mismatch is not None:
                        raise ctx.journal.mismatch  # the handler caught it: park all the same
                    snapshot = encode_state(actor.state)
                    reply = self._reply(env, result)
                    break
                except Suspend as suspend:
                    actor.state = _load_state(type(actor), act.snapshot)
                    if ctx.journal.mismatch is not None:
                        await self._park(ctx, str(ctx.journal.mismatch))
                    else:
                        await self._suspend(ctx, suspend)
                    return
                except JournalMismatch as exc:
                    actor.state = _load_state(type(actor), act.snapshot)
                    await self._park(ctx, str(exc))
                    return
                except RUNNER_ERRORS:
                    raise  # the runner's own trouble (a lost lease, a memory that ran ahead of Redis)
                except BaseException as caught:
                    if ctx.misuse is not None:  # primitives ran at once: a retry would do the same
                        await _outlive_primitive(ctx)
                        await self._give_up(act, ctx, handler, ctx.misuse, attempt)
                        return
                    failure = _take_back_interruption(ctx) or caught
                    if isinstance(failure, asyncio.CancelledError) and _cancelling():
                        raise  # this turn is being stopped; a CancelledError the handler raised is a failure
                    actor.state = _load_state(type(actor), act.snapshot)  # a failed attempt leaves no trace
                    if ctx.journal.mismatch is not None:
                        await self._park(ctx, str(ctx.journal.mismatch))
                        return
                    if isinstance(failure, TurnCancelled) or attempt >= retry.max_attempts:
                        await self._give_up(act, ctx, handler, failure, attempt)
                        return
                    try:
                        await asyncio.sleep(retry.delay(attempt))
                    except asyncio.CancelledError:
                        why = _take_back_interruption(ctx)  # cancelled while waiting to retry
                        if why is None or _cancelling():
                            raise
                        await self._give_up(act, ctx, handler, why, attempt)
                        return
                finally:
                    actor._turn = act.running = None
        finally:
            self._running.discard(act)
        where = ctx.source
        write = Write(
            "c", act.id, where.origin, where.ref,
            snapshot=None if snapshot == act.snapshot else snapshot,
            local=ctx.local, remote=ctx.remote,
            reply_key=self.store.keys.reply(self.shard, env.id) if env.reply_to else None,
            reply_channel=env.reply_to, reply=reply,
            item=queued_item(env.headers, env.id),
            **_consumed(ctx),
        )  # fmt: skip
        result = await self._write(write)
        act.snapshot = snapshot
        self._settled(act, ctx.consumed)
        if where.origin != "i":
            self._closed(act, result)

    async def _give_up(self, act: Activation, ctx: TurnContext, handler: Handler, exc: BaseException,
                       attempt: int) -> None:  # fmt: skip
        """Dead-letter the turn's message: its handler failed for good, or it was cancelled."""
        source, env = ctx.source, ctx.envelope
        detail = "".join(traceback.format_exception(exc))
        acks: list[Queued] = []
        if isinstance(exc, TurnCancelled):
            reason, detail = "cancelled", str(exc)
            acks = [q for q in act.queue if q.message is None][:1]  # the cancel, taken with it
        else:
            assert act.actor is not None
            reason = f"handler {type(act.actor).__name__}.{handler.name} failed {attempt} times: {exc!r}"
        write = self._dead_letter_write(
            act.id, source.origin, source.ref, source.raw, reason, detail, env, acks
        )
        self._closed(act, await self._write(write))
        self._settled(act, acks)

    async def _count_start(self, act: Activation, env: Envelope, mode: str = "count") -> int:
        """Count this start of a recovered turn in Redis; returns the starts counted (with
        ``look``: the starts counted before, counting nothing)."""
        delivery = _delivery(act, env)
        starts = await self.store.count_delivery(self.shard, self.lease.value, act.id, delivery, mode)
        act.counted = act.counted or mode == "count"
        return starts

    async def forgive_running(self) -> None:
        """A graceful hand-over gives up the turns still running: their next start, by the
        next owner, is not counted as an interruption (see ``max_redeliveries``)."""
        running = [act for act in self._running if act.running is not None]
        for act in running:
            assert act.running is not None
            try:
                await self._count_start(act, act.running.envelope, "forgive")
            except Exception as exc:  # best effort: at worst the next start counts
                log.warning("shard %s: could not forgive the turn of %s: %r", self.shard, act.id, exc)

    async def _poisoned(self, act: Activation, env: Envelope, source: Source, starts: int) -> None:
        """Dead-letter a message whose turn ended its runner too often (a message that kills
        its worker), instead of running it again."""
        reason = (
            f"its turn was started {starts} times and interrupted {starts - 1} times by the end of its "
            f"runner (the worker was killed or exited, or its event loop blocked until the lease moved); "
            f"max_redeliveries is {self.settings.max_redeliveries}"
        )
        write = self._dead_letter_write(act.id, source.origin, source.ref, source.raw, reason, "", env)
        self._closed(act, await self._write(write))

    async def _call(self, ctx: TurnContext, actor: Actor, handler: Handler, queued: Queued) -> Any:
        """One attempt of the handler: within its limiters, in a span that is the child of
        the span that sent the message (whichever attempt, whichever worker)."""
        env, info = queued.envelope, ctx.info
        name = f"turn {type(actor).__name__}.{handler.name}"
        attributes = {"actor.type": env.actor, "actor.key": env.key, "message.type": env.type,
                      "message.id": env.id, "shard": self.shard, "attempt": info.attempt,
                      "epoch": info.epoch, "resumed": ctx.source.origin == "o"}  # fmt: skip
        limits = self.services.limits
        started = time.perf_counter()
        outcome = "done"
        with telemetry.span(name, attributes, kind=SpanKind.CONSUMER, parent=env.headers) as current:
            try:
                queue = _queue_of(env)
                # A turn fed by its type's own limiter's queue holds the slot it was dispatched with.
                type_limiter = None if queue == type(actor).limiter else type(actor).limiter
                if type_limiter is not None or queue is not None:
                    await self.fenced()  # only the owner may spend the limiter's capacity
                async with limits.hold(type_limiter), limits.hold_item(queue, env.id):
                    ctx.in_handler = True
                    task = asyncio.current_task()
                    assert task is not None
                    self.services.running[task] = f"the turn of {env.actor_id} ({name[5:]})"
                    try:
                        return await handler.fn(actor, queued.message)
                    finally:
                        del self.services.running[task]
                        ctx.in_handler = False
                        await _write_done(ctx)
            except Suspend:
                outcome = "suspended"
                raise
            except BaseException as exc:
                outcome = "failed"
                telemetry.failed(current, exc)
                raise
            finally:
                if current is not None:
                    current.set_attribute("turn.outcome", outcome)
                elapsed_ms = (time.perf_counter() - started) * 1000
                self.services.stats.record(elapsed_ms)
                telemetry.count_turn(env.actor, outcome, elapsed_ms)

    @staticmethod
    def _reply(env: Envelope, result: Any) -> bytes:
        if not env.reply_to:
            return b""
        if result is not None and not isinstance(result, BaseModel):
            raise TypeError(f"a handler must return a pydantic model or None, not {type(result).__name__}")
        payload = None if result is None else dump_model(result)
        rtype = None if result is None else type(result).__name__
        return encode_reply(Reply(env.id, True, rtype, payload))

    # ---- 3c. journal writes (the runner is the turn's TurnHost) ---------------------------
    async def flush(self, ctx: TurnContext) -> None:
        """Write the journal so far, with the sends buffered so far; the turn is open after.
        An interruption that came meanwhile ends the attempt once the write is done."""
        source: Source = ctx.source
        ctx.flushing = True
        try:
            await self._write_open(ctx, OpenTurn(source.raw, ctx.journal.records))
        finally:
            ctx.flushing = False
        if ctx.interrupted is not None:
            raise asyncio.CancelledError()

    async def _suspend(self, ctx: TurnContext, suspend: Suspend) -> None:
        """Store the suspended turn and its timer; messages queued behind it are deferred."""
        source: Source = ctx.source
        act = source.act
        behind = [q for q in act.queue if q.message is not None and q not in ctx.consumed]
        open_turn = OpenTurn(source.raw, ctx.journal.records, suspend.waiting, suspend.due_ms,
                             since_ms=self.clock.upper())  # fmt: skip
        await self._write_open(ctx, open_turn, behind)
        act.woken = False
        self._timer_set(suspend.due_ms)

    async def _park(self, ctx: TurnContext, reason: str) -> None:
        source: Source = ctx.source
        act = source.act
        log.error("shard %s: parked the open turn of %s: %s", self.shard, act.id, reason)
        records = [] if act.open is None else act.open.records
        parked = OpenTurn(source.raw, records, None, FOREVER_MS, reason, since_ms=self.clock.upper())
        ctx.local.clear()
        ctx.remote.clear()
        ctx.consumed.clear()
        await self._write_open(ctx, parked)

    async def _write_open(self, ctx: TurnContext, open_turn: OpenTurn, behind: Sequence[Queued] = ()) -> None:
        """Journal the turn: open it (its message leaves the inbox or the deferred list), or
        record its progress. One at a time per turn: the handler (``flush``) and the runner
        (``_open_running``) may both write."""
        while ctx.writing is not None:
            await asyncio.shield(ctx.writing)
        ctx.writing = done = asyncio.get_running_loop().create_future()
        try:
            await self._journal(ctx, open_turn, behind)
        finally:
            ctx.writing = None
            done.set_result(None)

    async def _journal(self, ctx: TurnContext, open_turn: OpenTurn, behind: Sequence[Queued]) -> None:
        source: Source = ctx.source
        act = source.act
        open_turn.write = act.open.write + 1 if source.origin == "o" and act.open is not None else 1
        # What this write carries: the handler may go on meanwhile, if the runner writes.
        records, local, remote = list(open_turn.records), list(ctx.local), list(ctx.remote)
        consumed = list(ctx.consumed)
        open_turn.records = records
        write = Write(
            "j", act.id, source.origin, source.ref,
            local=local, remote=remote,
            open_turn=open_turn.encode(), score=open_turn.due_ms,
            defers=[(q.entry_id or "", q.raw) for q in behind],
            acks=[q.entry_id for q in consumed if q.entry_id is not None],
            unlists=[q.raw for q in consumed if q.entry_id is None],
        )  # fmt: skip
        await self._write(write)
        del ctx.local[: len(local)], ctx.remote[: len(remote)], ctx.consumed[: len(consumed)]
        self._settled(act, [*consumed, *behind])
        act.open = dataclasses.replace(open_turn, records=_copy_records(records))
        source.origin, source.ref = "o", str(open_turn.write)

    async def candidates(self, ctx: TurnContext, message_type: str) -> list[Queued]:
        """Messages of ``message_type`` behind this turn: deferred ones, then queued ones."""
        source: Source = ctx.source
        act = source.act
        found: list[Queued] = []
        if act.open is not None or act.backlog or source.origin != "i":
            raws = await self.store.deferred(self.shard, act.id, DEFERRED_SCAN)
            if source.origin == "q":
                raws = raws[1:]  # the head is this turn's own message
            for raw in raws:
                checked = self._check(None, raw)
                if isinstance(checked, Queued) and checked.envelope.type == message_type:
                    found.append(checked)
        found += [q for q in act.queue if q.message is not None and q.envelope.type == message_type]
        return [q for q in found if q not in ctx.consumed]

    def _settled(self, act: Activation, items: Iterable[Queued]) -> None:
        """Inbox messages whose fate a write just decided leave the actor's queue."""
        for queued in items:
            if queued.entry_id is not None:
                act.queue.remove(queued)
                self._finished()

    def _dead_letter_write(
        self,
        aid: str,
        origin: str,
        ref: str | bytes,
        raw: bytes,
        reason: str,
        detail: str,
        env: Envelope | None,
        acks: Sequence[Queued] = (),
    ) -> Write:
        log.warning(
            "shard %s: dead-lettered a message%s: %s", self.shard, f" to {aid}" if aid else "", reason
        )
        telemetry.record("dead_letters", 1, {"actor.type": env.actor if env is not None else ""})
        reply: dict[str, Any] = {}
        if env is not None and env.reply_to:
            error = encode_reply(Reply(env.id, False, None, None, reason, detail))
            reply = {"reply_key": self.store.keys.reply(self.shard, env.id), "reply_channel": env.reply_to,
                     "reply": error}  # fmt: skip
        item = None if env is None else queued_item(env.headers, env.id)
        return Write("d", aid, origin, ref, envelope=raw, reason=reason, detail=detail,
                     acks=[q.entry_id for q in acks if q.entry_id], item=item, **reply)  # fmt: skip

    # ---- 4. commit ---------------------------------------------------------------------
    async def _write(self, write: Write) -> int:
        """Apply ``write`` with the next batch; DONE or BACKLOG. A duplicate resets the shard."""
        act = self.activations.get(write.actor_id)
        if act is not None and act.counted and write.op in ("c", "d"):
            write = dataclasses.replace(write, forget_delivery=True)
            act.counted = False
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._writes.append((write, fut))
        self._commit_wakeup.set()
        result = await fut
        if result == DUPLICATE:
            raise ShardReset(
                f"shard {self.shard}: a write for {write.actor_id or write.ref!r} was already applied"
            )
        return result

    async def _commit_loop(self) -> None:
        """One script in flight at a time; writes that come meanwhile form the next batch,
        so a busy shard commits in batches and an idle one commits each turn at once."""
        limit = self.settings.commit_batch
        while True:
            await self._commit_wakeup.wait()
            self._commit_wakeup.clear()
            while self._writes or self._take_waiters:
                batch, self._writes = self._writes[:limit], self._writes[limit:]
                seen = self._seen
                take = (
                    Take(self.consumer, self._seen_newest, seen - self._taken) if seen > self._taken else None
                )
                results = await self.store.commit(
                    self.shard, self.lease.value, [w for w, _ in batch], self._reply_ttl_ms, take
                )
                self._taken = seen
                self._wake_take_waiters()
                forwarded = False
                items_done = []
                for (write, fut), result in zip(batch, results, strict=True):
                    forwarded = forwarded or bool(write.remote)
                    if write.item is not None:  # a duplicate too: its first run's reply may be lost
                        items_done.append(write.item)
                    if not fut.done():
                        fut.set_result(result)
                if forwarded:
                    self._forward_wakeup.set()
                if items_done:
                    await self.services.limits.items_done(items_done)

    def _wake_take_waiters(self) -> None:
        waiting = []
        for needed, waiter in self._take_waiters:
            if needed <= self._taken:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                waiting.append((needed, waiter))
        self._take_waiters = waiting

    # ---- 5. forward ---------------------------------------------------------------------
    async def _forward_loop(self) -> None:
        while True:
            await self._forward_pending()
            try:
                # The wake-up comes from our own commits; the timeout catches entries
                # a previous owner committed but never forwarded.
                await asyncio.wait_for(self._forward_wakeup.wait(), timeout=5.0)
            except TimeoutError:
                pass
            self._forward_wakeup.clear()

    async def _forward_pending(self) -> None:
        while True:
            rows = await self.store.read_outbox(self.shard, 512)
            if not rows:
                return
            await self.fenced()
            by_target: dict[int, list[tuple[str, bytes]]] = {}
            for entry_id, target, envelope in rows:
                by_target.setdefault(target, []).append((entry_id, envelope))
            for target, items in by_target.items():
                await self.store.forward(self.shard, target, items)
            await self.store.delete_outbox(self.shard, [entry_id for entry_id, _, _ in rows])

    # ---- flow control ------------------------------------------------------------------
    def _took(self) -> None:
        self.inflight += 1
        self._idle.clear()
        self._update_room()

    def _finished(self) -> None:
        self.inflight -= 1
        self._update_room()
        if self.inflight == 0:
            self._idle.set()

    def park(self, parked: bool) -> None:
        """A turn starts (or stops) waiting for the reply to an ask: meanwhile it does not
        count toward ``max_inflight``, so that a shard full of such turns still reads the
        messages they wait for (asks to actors of the same shard)."""
        self.parked += 1 if parked else -1
        self._update_room()

    def _update_room(self) -> None:
        if self.inflight - self.parked < self.settings.max_inflight:
            self._room.set()
        else:
            self._room.clear()

    async def _relieve(self) -> None:
        """Reading is paused (``max_inflight``): open the running turns that have messages
        queued behind them, which then wait in Redis (deferred), not in memory."""
        crowded = sorted(self._running, key=lambda a: len(a.queue), reverse=True)
        for act in crowded:
            if self._room.is_set():
                return
            await self._open_running(act)

    async def _open_running(self, act: Activation) -> None:
        """Journal a running turn from outside its handler: its message moves out of the
        inbox into an open turn (so that trimming goes on past it), and the messages queued
        behind it are deferred in Redis (so that they do not hold reading up). A long or
        hung turn then holds only its actor."""
        ctx = act.running
        if ctx is None or not ctx.in_handler or ctx.writing is not None or ctx.interrupted is not None:
            return
        behind = [q for q in act.queue if q.message is not None and q not in ctx.consumed]
        if ctx.source.origin == "o" and not behind:
            return
        await self._write_open(ctx, OpenTurn(ctx.source.raw, ctx.journal.records), behind)

    async def _open_long_turns(self, older_than: float) -> None:
        """Open the turns that have run for ``older_than`` seconds (see ``_open_running``)."""
        now = time.monotonic()
        for act in list(self._running):
            ctx = act.running
            if ctx is not None and now - ctx.started >= older_than:
                await self._open_running(act)


RUNNER_ERRORS = (LeaseLost, Diverged, ShardReset)
"""Errors that end a turn's runner rather than fail the turn: they are not the handler's."""


def _delivery(act: Activation, env: Envelope) -> str:
    """What ``count_delivery`` counts starts of: the message, and for an open turn its
    write number, so that a crash-prone workflow that still makes progress is not poison."""
    return env.id if act.open is None else f"{env.id}@{act.open.write}"


async def _outlive_primitive(ctx: TurnContext) -> None:
    """Wait for a primitive still running in another task of the handler (cancelled when a
    second one was refused) to end: the turn's next work must not overlap it."""
    active = ctx.active
    if active is not None and active[1] is not None and active[1] is not asyncio.current_task():
        await asyncio.gather(active[1], return_exceptions=True)


async def _write_done(ctx: TurnContext) -> None:
    """Wait for a journal write the runner began while the handler ran (``_open_running``):
    what follows the handler must see where the turn's message lives now. A cancellation
    that arrives meanwhile is raised after the write."""
    cancelled = False
    while ctx.writing is not None:
        try:
            await asyncio.shield(ctx.writing)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError()


def _take_back_interruption(ctx: TurnContext) -> BaseException | None:
    """The reason the host interrupted this attempt, if it did; the cancellation that
    delivered it is taken back, so that it does not count as the task's own."""
    why = ctx.interrupted
    task = asyncio.current_task()
    if why is not None and task is not None and task.cancelling():
        task.uncancel()
    return why


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _write_number(raw: bytes) -> int:
    """The write number of an open turn whose body cannot be read (so it can be cancelled)."""
    try:
        return int(raw.partition(b":")[0])
    except ValueError:
        return 0


def _queue_of(env: Envelope) -> str | None:
    item = queued_item(env.headers, env.id)
    return None if item is None else item[0]


def _handler(cls: type[Actor], queued: Queued) -> Handler | None:
    """The method a message goes to: by type, or a tick by its schedule."""
    if isinstance(queued.message, Tick):
        return cls.schedules[queued.message.schedule][1]
    return cls.handlers.get(queued.envelope.type)


def _consumed(ctx: TurnContext) -> dict[str, Any]:
    """The write fields that take the messages ``wait_for`` received out of the mailbox."""
    return {
        "acks": [q.entry_id for q in ctx.consumed if q.entry_id is not None],
        "unlists": [q.raw for q in ctx.consumed if q.entry_id is None],
    }


def _copy_records(records: list[Record]) -> list[Record]:
    """Records for a new attempt: a failed one may have changed its own (a wait it received)."""
    return [Record(r.kind, r.name, copy.deepcopy(r.value)) for r in records]


def _load_state(cls: type[Actor], snapshot: bytes | None) -> Any:
    """An actor's state from its committed snapshot (a fresh State if it has none)."""
    return cls.State() if snapshot is None else cls.State.model_validate(decode_state(snapshot))


def _kept(raw: bytes | Malformed) -> bytes:
    """What the dead letter of an inbox entry keeps: its envelope, or the first of several."""
    return raw.first if isinstance(raw, Malformed) else raw

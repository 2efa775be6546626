"""What a handler does during one turn: sends, asks and the durable primitives.

Sends are buffered here and written by the turn's commit script, so they
happen exactly when the turn's state change happens: both, or neither. The
durable primitives (``step``, ``sleep``, ``wait_for``, ``ask``) go through the
turn's journal (see ``journal``): a completed one is written to Redis before
the handler goes on, together with the sends buffered so far, and a re-run of
the turn returns what was recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry.trace import SpanKind
from pydantic import BaseModel

from . import telemetry
from .actor import ActorRef, App, StepOptions, TurnInfo
from .codec import IDEMPOTENCY_HEADER, Envelope, Reply, Routed, ask_id, decode_reply, encode_reply, item_id
from .errors import ActorsError, DuplicateItem
from .journal import FOREVER_MS, Journal, Record, RedisClock, Send, Suspend
from .limits import Limits
from .markers import Markers
from .queues import QueueItem
from .replies import ReplyListener, reply_value
from .routing import route, shard_of
from .settings import MessageSettings
from .steps import StepInfo, bounded, callable_name, run_step, step_result

if TYPE_CHECKING:
    from .lease import StepsInFlight
    from .store import Reader, Store

log = logging.getLogger("actors.turn")


@dataclass(frozen=True, slots=True)
class TurnServices:
    """What every turn of a worker shares."""

    app: App
    store: Store
    shards: int
    messages: MessageSettings
    replies: ReplyListener
    limits: Limits
    markers: Markers
    """Where a turn leaves the markers its journal writes made useless."""
    reader: Reader
    """Where the shard runners wait for new inbox entries (one XREAD for many shards)."""
    stats: TurnStats = field(default_factory=lambda: TurnStats())
    quarantine: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held by a recovered turn that was interrupted before: such turns run one at a time
    in a worker process (see ``ShardRunner._turn``)."""
    max_record_bytes: int = 4 * 1024 * 1024
    """``WorkerSettings.max_record_bytes``: a step's outcome past it is journaled as its error."""


class TurnStats:
    """Recent turn durations of this process, for ``actors top`` (through the worker's info)."""

    def __init__(self, keep: int = 2000) -> None:
        self.turns = 0
        self.recent: deque[float] = deque(maxlen=keep)

    def record(self, ms: float) -> None:
        self.turns += 1
        self.recent.append(ms)

    def summary(self) -> dict[str, str]:
        ordered = sorted(self.recent)
        if not ordered:
            return {"turns": str(self.turns)}
        p50 = ordered[len(ordered) // 2]
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        return {"turns": str(self.turns), "turn_p50_ms": f"{p50:.3f}", "turn_p99_ms": f"{p99:.3f}"}


@dataclass(frozen=True, slots=True)
class Queued:
    """A checked message on its way into a turn.

    ``entry_id`` is its inbox entry, or None for a message deferred behind an open turn.
    """

    entry_id: str | None
    raw: bytes
    envelope: Envelope
    message: BaseModel | None
    """The validated message; None for a control message (cancel)."""
    arrived: str = ""
    """The inbox entry id it arrived with (its ``entry_id``; for a deferred message, kept by
    its type's index), whose time part is when it reached its shard's inbox by Redis's
    clock; '' if unknown."""


class TurnHost(Protocol):
    """What a turn needs from the shard runner that runs it."""

    clock: RedisClock

    async def flush(self, ctx: TurnContext) -> None:
        """Write the journal and the buffered sends, opening the turn if it is not yet."""

    async def candidates(self, ctx: TurnContext, message_type: str) -> list[Queued]:
        """Messages of ``message_type`` waiting behind the turn, in arrival order, each with
        the inbox entry id it arrived with (``Queued.arrived``)."""

    steps: StepsInFlight
    """The step functions of the host's shard that are running now."""

    def awaiting_reply(self, waiting: bool) -> None:
        """The turn starts (True) or stops (False) waiting for the reply to an ask."""

    async def deliver(self, ctx: TurnContext, target: str, ask: Send | None = None) -> None:
        """Deliver now, with a journal write, the turn's pending sends to actor ``target``
        (and ``ask``, the request of an ask to it), so that what follows does not overtake
        them."""

    async def fenced(self) -> None:
        """Return once the turn's message is surely this host's to handle and its lease is
        surely held for a while yet; raise LeaseLost otherwise. Every effect outside the
        commit (a step function's attempt, an ask, an enqueue, a limiter hold) waits for it."""


@dataclass(slots=True)
class TurnContext:
    services: TurnServices
    host: TurnHost
    shard: int
    envelope: Envelope
    info: TurnInfo
    journal: Journal
    source: Any = None
    """Where the turn's message lives; the host's business."""
    pending: list[Send] = field(default_factory=list)
    """Sends not delivered yet, in order: the open turn's (``OpenTurn.pending``), then this
    attempt's. They go out with the commit or a suspension, or, those to one actor, with
    an ask or enqueue to that actor (``TurnHost.deliver``)."""
    consumed: list[Queued] = field(default_factory=list)
    """Messages ``wait_for`` received, removed from the mailbox by the next write."""
    refused: list[tuple[Queued, str, str]] = field(default_factory=list)
    """Those of ``consumed`` that a wait refused, with the reason and detail of their dead
    letter: they matched it but arrived after its deadline (the next write dead-letters them)."""
    active: tuple[str, asyncio.Task[Any] | None] | None = None
    """The durable primitive in progress, and the task that called it."""
    interrupted: BaseException | None = None
    """Why the host ended this running attempt from outside (its turn timeout, or ``actors
    cancel``); the host cancels the handler, or, during a journal write, raises after it."""
    writing: asyncio.Future[None] | None = None
    """Done when the journal write of this turn in flight is (None: none is): writes of one
    turn never overlap, and an interruption waits for the write."""
    flushing: bool = False
    """The handler itself awaits that write (``flush``), and raises an interruption after it."""
    in_handler: bool = False
    """The handler is running (not yet returned or raised): the host may open the turn."""
    misuse: ActorsError | None = None
    """Primitives ran at once: the turn fails for good (a retry would do the same)."""
    started: float = field(default_factory=time.monotonic)

    # ---- sends -------------------------------------------------------------------
    def send(self, ref: ActorRef[Any], msg: BaseModel) -> None:
        self._check_idle("send")
        name = _target(ref, msg)
        if self.journal.replay("send", name) is not None:
            return  # written by an earlier journal write of this turn
        routed = self._route(ref, msg)
        self.pending.append((routed.envelope.actor_id, routed.shard, routed.data))
        self.journal.record("send", name, None)

    async def ask(self, ref: ActorRef[Any], msg: BaseModel, timeout: float) -> Any:
        with self._primitive("ask"):
            return await self._ask(ref, msg, timeout)

    async def _ask(self, ref: ActorRef[Any], msg: BaseModel, timeout: float) -> Any:
        if ref.type == self.envelope.actor and ref.key == self.envelope.key:
            raise ActorsError("an actor cannot ask itself: its turn would wait for itself")
        name = _target(ref, msg)
        position = self.journal.position
        record = self.journal.replay("ask", name)
        if record is None or record.value is None:
            # A deterministic id per (turn message, position): the reply a re-run waits for is
            # the one to the request the first run sent (new for each replay of a dead letter).
            message_id = ask_id(self.envelope, position)
            attributes = {"actor.type": ref.type, "actor.key": ref.key}
            with telemetry.span(f"ask {type(msg).__name__}", attributes, kind=SpanKind.CLIENT):
                record, reply = await self._request(ref, msg, name, message_id, record, timeout)
            self._check_sole()
            record = self.journal.update(record, encode_reply(reply))
            await self.host.flush(self)
            # Journaled: a re-run replays the reply, and no one else waits for it.
            self.services.markers.ask_answered(shard_of(ref.id, self.services.shards), ref.id, message_id)
        return reply_value(decode_reply(record.value), self.services.app.resolve(ref), type(msg).__name__)

    async def _request(self, ref: ActorRef[Any], msg: BaseModel, name: str, message_id: str,
                       record: Record | None, timeout: float) -> tuple[Record, Reply]:  # fmt: skip
        """Send the ask, unless the journal says an earlier run did (a record with no reply
        yet), and wait for its reply. The request goes out with a journal write of the turn,
        after the sends the turn made to the same actor: order holds, and through the outbox
        for another shard, as for every send."""
        replies = self.services.replies
        fut = replies.expect(message_id)
        try:
            if record is None:
                await self.host.fenced()
                routed = self._route(ref, msg, message_id=message_id, reply_to=replies.channel,
                                     headers={IDEMPOTENCY_HEADER: message_id})  # fmt: skip
                target = routed.envelope.actor_id
                ttl_ms = int(self.services.messages.idempotency_ttl * 1000)
                await self.services.store.remember_ask(routed.shard, target, message_id, ttl_ms)
                record = self.journal.record("ask", name, None)  # sent: a re-run waits, not asks
                await self.host.deliver(self, target, (target, routed.shard, routed.data))
            self.host.awaiting_reply(True)
            try:
                shard = shard_of(ref.id, self.services.shards)
                return record, await replies.wait(shard, message_id, fut, timeout)
            finally:
                self.host.awaiting_reply(False)
        except BaseException:
            replies.forget(message_id)
            raise

    async def enqueue(self, queue: str, ref: ActorRef[Any], msg: BaseModel, item: QueueItem) -> str:
        with self._primitive("enqueue"):
            return await self._enqueue(queue, ref, msg, item)

    async def _enqueue(self, queue: str, ref: ActorRef[Any], msg: BaseModel, item: QueueItem) -> str:
        self.services.limits.check(queue)
        name = f"{queue}:{_target(ref, msg)}"
        position = self.journal.position
        record = self.journal.replay("enqueue", name)
        if record is None:
            # A deterministic item id: a re-run before the result was journaled queues
            # nothing new, and the dispatcher appends each item id once.
            queued_id = item_id(self.envelope, position)
            await self.host.fenced()
            routed = self._route(ref, msg, message_id=queued_id, headers=item.headers(queue))
            await self.host.deliver(self, routed.envelope.actor_id)  # the sends before it, first
            try:
                value = ["ok", await self.services.limits.enqueue(queue, routed, item)]
            except DuplicateItem as exc:
                value = ["duplicate", exc.dedup_id, exc.item_id]
            self._check_sole()
            record = self.journal.record("enqueue", name, value)
            await self.host.flush(self)
            # Journaled: a re-run replays it, and no one else enqueues this item id.
            self.services.markers.enqueue_journaled(queue, queued_id)
        if record.value[0] == "duplicate":
            raise DuplicateItem(record.value[1], record.value[2])
        return str(record.value[1])

    def _route(self, ref: ActorRef[Any], msg: BaseModel, **kwargs: Any) -> Routed:
        services = self.services
        return route(
            services.app, ref, msg, services.shards, services.messages.max_message_bytes,
            strict_types=True, **kwargs,
        )  # fmt: skip

    # ---- durable primitives ------------------------------------------------------
    async def step(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                   options: StepOptions) -> Any:  # fmt: skip
        with self._primitive("step"):
            return await self._step(fn, args, kwargs, options)

    async def _step(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                    options: StepOptions) -> Any:  # fmt: skip
        name = options.name or callable_name(fn)
        if options.limiter is not None:
            self.services.limits.check(options.limiter)
        position = self.journal.position
        record = self.journal.replay("step", name)
        if record is None:
            key = f"{self.envelope.id}#{position}"  # the turn's message and the step's journal position
            with telemetry.span(f"step {name}", {"step.name": name}):
                info = StepInfo(key, self.info.epoch, name, 0)
                outcome = await run_step(fn, args, kwargs, options, self.services.limits, self.host, info)
            outcome = bounded(outcome, name, self.services.max_record_bytes)
            self._check_sole()
            record = self.journal.record("step", name, outcome)
            await self.host.flush(self)
        return step_result(record, name, fn)

    async def sleep(self, delay_ms: int | None, until_ms: int | None) -> None:
        self._check_idle("sleep")
        record = self.journal.replay("sleep", "")
        if record is None:
            due = until_ms if until_ms is not None else self.host.clock.upper() + (delay_ms or 0)
            record = self.journal.record("sleep", "", due)
        if record.value > self.host.clock.lower():
            raise Suspend(record.value, None)

    async def wait_for(self, model: type[BaseModel], timeout_ms: int | None,
                       where: Callable[[Any], bool] | None) -> Any:  # fmt: skip
        with self._primitive("wait_for"):
            return await self._wait_for(model, timeout_ms, where)

    async def _wait_for(self, model: type[BaseModel], timeout_ms: int | None,
                        where: Callable[[Any], bool] | None) -> Any:  # fmt: skip
        name = model.__name__
        record = self.journal.replay("wait", name)
        if record is None:
            due = FOREVER_MS if timeout_ms is None else self.host.clock.upper() + timeout_ms
            record = self.journal.record("wait", name, [due, False, None])
        else:
            due, done, payload = record.value
            if done:
                return None if payload is None else model.model_validate(payload)
        # A matching message that arrived before the turn got here satisfies the wait too;
        # one that reached Redis at or after the deadline never does, however late the turn
        # looks (a worker down across the deadline, a timer not yet fired).
        late: list[Queued] = []
        for queued in await self.host.candidates(self, name):
            if where is not None and not where(model.model_validate(queued.envelope.payload)):
                continue
            if _arrived_late(queued, due):
                late.append(queued)
                continue
            return await self._receive(record, model, queued)
        if due <= self.host.clock.lower():
            self._refuse(late, name, due)
            await self._decide(record, [due, True, None])
            return None
        raise Suspend(due, name)

    def _refuse(self, late: list[Queued], name: str, due: int) -> None:
        """Dead-letter, with the write that journals the timeout, the matches that came too late."""
        for queued in late:
            arrived = _arrival_ms(queued)
            when = "an unknown time" if arrived is None else _iso(arrived)
            detail = (
                f"{self.envelope.actor_id} waited for {name} until {_iso(due)} (Redis clock); this "
                f"message reached its shard's inbox at {when}"
            )
            self.consumed.append(queued)
            self.refused.append((queued, LATE, detail))
            telemetry.record("dead_letters", 1, {"actor.type": self.envelope.actor})

    async def _receive(self, record: Record, model: type[BaseModel], queued: Queued) -> BaseModel:
        self.consumed.append(queued)
        await self._decide(record, [record.value[0], True, queued.envelope.payload])
        return model.model_validate(queued.envelope.payload)

    async def _decide(self, record: Record, value: list[Any]) -> None:
        """Journal the wait's outcome before the handler goes on, as after a step: a re-run
        (after a crash in what follows) must replay this outcome, not decide again from
        what has arrived by then."""
        self._check_sole()
        self.journal.update(record, value)
        await self.host.flush(self)

    @contextlib.contextmanager
    def _primitive(self, what: str) -> Iterator[None]:
        """Mark ``what`` in progress until it returns (see ``_check_idle``)."""
        self._check_idle(what)
        self.active = (what, asyncio.current_task())
        try:
            yield
        finally:
            self.active = None

    def _check_idle(self, what: str) -> None:
        """Refuse a primitive while another one of this turn is in progress: from the step's
        own function, or concurrently (``asyncio.gather``, ``create_task``), where the
        journal's order would depend on timing and a replay could swap results."""
        if self.active is None:
            return
        running, task = self.active
        current = asyncio.current_task()
        if running == "step" and task is current:
            raise ActorsError(f"{what} cannot be called inside a step's function; call it from the handler")
        self.misuse = ActorsError(
            f"{what} was called while {running} of the same turn was still in progress: a turn's "
            "durable primitives (step, ask, enqueue, wait_for, sleep, send) must run one at a time, "
            "in order (not under asyncio.gather or create_task), so that a replay returns each "
            "its own result"
        )
        if task is not None and task is not current:
            task.cancel()  # the first one must not journal a result either
        raise self.misuse

    def _check_sole(self) -> None:
        """Before journaling a primitive's result: refuse it if primitives ran at once."""
        if self.misuse is not None:
            raise self.misuse


LATE = "arrived after the wait timed out"
"""The dead-letter reason of a message that matched a wait but reached Redis after its deadline."""


def _arrival_ms(queued: Queued) -> int | None:
    """When the message reached its shard's inbox (ms, Redis clock): its entry id's time part."""
    stamp = queued.arrived.partition("-")[0]
    return int(stamp) if stamp.isdigit() else None


def _arrived_late(queued: Queued, due: int) -> bool:
    """At or after the deadline ``due`` (a message of unknown arrival cannot prove it was on time).
    Entry ids are in ms: one stamped ``due`` arrived at ``due`` or within the ms after it."""
    if due >= FOREVER_MS:
        return False
    arrived = _arrival_ms(queued)
    return arrived is None or arrived >= due


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def _target(ref: ActorRef[Any], msg: BaseModel) -> str:
    return f"{ref.id}:{type(msg).__name__}"

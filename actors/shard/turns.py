"""One turn: the handler's attempts (retried by the retry policy), within its limiters and
turn timeout, and the write of its outcome: commit, suspend, park or dead-letter. A turn
that a previous runner may have started and died with is counted in Redis first, and past
``max_redeliveries`` dead-lettered instead of run (a message that kills its worker)."""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import SpanKind
from pydantic import BaseModel

from .. import telemetry
from ..actor import Actor, TurnInfo
from ..codec import REJECTION, Envelope, Reply, dump_model, encode_reply, encode_state
from ..definition import Handler
from ..errors import RecordTooLarge, Reject, StateTooLarge, TurnCancelled, TurnTimeout
from ..journal import Journal, JournalMismatch, Suspend
from ..queues import queued_item
from ..store import Write
from ..turn import Queued, TurnContext
from .journaling import split_sends
from .state import (
    RUNNER_ERRORS,
    Activation,
    Source,
    cancelling,
    consumed,
    copy_records,
    delivery,
    handler_for,
    load_state,
    queue_of,
    reply_fields,
)
from .work import closed

if TYPE_CHECKING:
    from .runner import ShardRunner

log = logging.getLogger("actors.shard")

TURN_CHECK = 1.0
"""Seconds between two looks for turns past their timeout."""

AT_ONCE = (TurnCancelled, StateTooLarge, RecordTooLarge)
"""Failures that are final at once, with no retry: a cancel, and an outcome too large to write
(its state, or its reply), which a retry would come to again."""

NO_WAIT = "no wait was open"
"""The dead-letter reason of a message with no handler that no open ``wait_for`` took (a late
match that a wait saw is dead-lettered by the wait instead, as ``turn.LATE``)."""


class Turns:
    def __init__(self, runner: ShardRunner) -> None:
        self.runner = runner
        self.started = asyncio.Event()
        """Set when an actor task starts (``Work.start``): ``watch`` looks only while some run."""

    def running(self) -> list[Activation]:
        """The activations whose handler runs an attempt now (a scan: cheaper than keeping a
        set up to date on every turn, and only timeouts and hand-overs ask, now and then)."""
        return [act for act in self.runner.activations.values() if act.running is not None]

    def turn(self, act: Activation, queued: Queued, source: Source) -> Awaitable[None]:
        """The turn of ``queued``: its attempts, or the dead letter of a message no handler
        takes. (Not a coroutine itself: the common case awaits ``_attempts`` directly.)"""
        r = self.runner
        env = queued.envelope
        actor = act.actor
        handler = None if actor is None else handler_for(type(actor), queued)
        if actor is None or handler is None:
            return self._unhandled(act, env, source)
        if source.origin == "i" and isinstance(source.ref, str):  # the entry id is its append time
            waited = r.clock.lower() - int(source.ref.partition("-")[0])
            telemetry.record("queue_wait", max(0, waited), {"actor.type": env.actor})
        if not source.recovered:
            return self._attempts(act, actor, handler, queued, source)
        return self._recovered(act, actor, handler, queued, source)

    async def _unhandled(self, act: Activation, env: Envelope, source: Source) -> None:
        r = self.runner
        reason, detail = act.broken, ""
        if not reason:
            reason = NO_WAIT
            detail = f"{env.actor} has no handler for {env.type} and no open wait_for received it"
        write = r.journaling.dead_letter_write(
            act.id, source.origin, source.ref, source.raw, reason, detail, env
        )
        closed(act, await r.commits.write(write))

    async def _recovered(self, act: Activation, actor: Actor, handler: Handler, queued: Queued,
                         source: Source) -> None:  # fmt: skip
        """A turn a previous runner may have started and died with (see the module docstring)."""
        r = self.runner
        if await self._count_start(act, queued.envelope, "look") == 0:
            await self._counted_attempts(act, actor, handler, queued, source)
        else:
            # Interrupted before as a recovered turn: it may be the one that ends its worker.
            # Such turns run one at a time in the process, and are counted only once they
            # run, so that the culprit does not take the turns waiting with it down with
            # it, run after run, until they too would count as poison.
            async with r.services.quarantine:
                await self._counted_attempts(act, actor, handler, queued, source)

    async def _counted_attempts(self, act: Activation, actor: Actor, handler: Handler, queued: Queued,
                                source: Source) -> None:  # fmt: skip
        """Count this start of a recovered turn; run it, or past ``max_redeliveries``
        dead-letter its message instead (a message that kills its worker)."""
        starts = await self._count_start(act, queued.envelope)
        if starts > self.runner.settings.max_redeliveries:
            await self._poisoned(act, queued.envelope, source, starts)
        else:
            await self._attempts(act, actor, handler, queued, source)

    async def _attempts(self, act: Activation, actor: Actor, handler: Handler, queued: Queued,
                        source: Source) -> None:  # fmt: skip
        """Run the handler, retried by the retry policy, and write the turn's outcome."""
        r = self.runner
        env = queued.envelope
        retry = r.settings.retry
        attempt = 0
        while True:
            attempt += 1
            info = TurnInfo(env.id, env.type, r.shard, r.lease.epoch, r.consumer, attempt)
            records = [] if act.open is None else copy_records(act.open.records)
            journal = Journal(records)
            pending = [] if act.open is None else list(act.open.pending)
            ctx = TurnContext(r.services, r.journaling, r.shard, env, info, journal, source=source,
                              pending=pending)  # fmt: skip
            actor._turn = act.running = ctx
            try:
                result = await self._call(ctx, actor, handler, queued)
                _take_back_interruption(ctx)  # a handler that swallowed it finished anyway
                if ctx.journal.mismatch is not None:
                    raise ctx.journal.mismatch  # the handler caught it: park all the same
                snapshot = encode_state(actor.state, r.settings.max_state_bytes, act.id)
                reply = _reply(env, result, r.settings.max_record_bytes)
                break
            except Suspend as suspend:
                actor.state = load_state(type(actor), act.snapshot)
                if ctx.journal.mismatch is not None:
                    await r.journaling.park(ctx, str(ctx.journal.mismatch))
                else:
                    await r.journaling.suspend(ctx, suspend)
                return
            except JournalMismatch as exc:
                actor.state = load_state(type(actor), act.snapshot)
                await r.journaling.park(ctx, str(exc))
                return
            except RUNNER_ERRORS:
                raise  # the runner's own trouble (a lost lease, a memory that ran ahead of Redis)
            except BaseException as caught:
                if ctx.misuse is not None:  # primitives ran at once: a retry would do the same
                    await _outlive_primitive(ctx)
                    await self._give_up(act, ctx, handler, ctx.misuse, attempt)
                    return
                failure = _take_back_interruption(ctx) or caught
                if isinstance(failure, asyncio.CancelledError) and cancelling():
                    raise  # this turn is being stopped; a CancelledError the handler raised is a failure
                actor.state = load_state(type(actor), act.snapshot)  # a failed attempt leaves no trace
                if ctx.journal.mismatch is not None:
                    await r.journaling.park(ctx, str(ctx.journal.mismatch))
                    return
                if isinstance(failure, Reject):  # a business refusal: consumed, never retried
                    await self._reject(act, ctx, failure)
                    return
                if isinstance(failure, AT_ONCE) or attempt >= retry.max_attempts:
                    await self._give_up(act, ctx, handler, failure, attempt)
                    return
                try:
                    await asyncio.sleep(retry.delay(attempt))
                except asyncio.CancelledError:
                    why = _take_back_interruption(ctx)  # cancelled while waiting to retry
                    if why is None or cancelling():
                        raise
                    await self._give_up(act, ctx, handler, why, attempt)
                    return
            finally:
                actor._turn = act.running = None
        where = ctx.source
        # The turn's sends go out with its commit.
        local, remote = split_sends(r.shard, ctx.pending) if ctx.pending else ([], [])
        write = Write(
            "c", act.id, where.origin, where.ref,
            snapshot=None if snapshot == act.snapshot else snapshot,
            local=local, remote=remote,
            item=queued_item(env.headers, env.id),
            **reply_fields(r.store.keys, r.shard, env, reply),
            **consumed(ctx),
        )  # fmt: skip
        result = await r.commits.write(write)
        act.snapshot = snapshot
        r.journaling.settled(act, ctx.consumed)
        if where.origin != "i":
            closed(act, result)

    async def _reject(self, act: Activation, ctx: TurnContext, rejection: Reject) -> None:
        """Consume a message its handler refused (``Reject``): a commit with no state change and
        none of the attempt's buffered sends or received messages (dropped, as for a failed
        attempt), closing its open turn; an asker gets the rejection, and no dead letter is made."""
        r = self.runner
        env, where = ctx.envelope, ctx.source
        log.info("shard %s: %s rejected message %s: %s", r.shard, act.id, env.id, rejection.reason)
        reply = encode_reply(Reply(env.id, False, REJECTION, rejection.detail, rejection.reason))
        write = Write(
            "c", act.id, where.origin, where.ref, item=queued_item(env.headers, env.id),
            **reply_fields(r.store.keys, r.shard, env, reply),
        )  # fmt: skip
        closed(act, await r.commits.write(write))

    async def _give_up(self, act: Activation, ctx: TurnContext, handler: Handler, exc: BaseException,
                       attempt: int) -> None:  # fmt: skip
        """Dead-letter the turn's message: its handler failed for good, or it was cancelled."""
        r = self.runner
        source, env = ctx.source, ctx.envelope
        detail = "".join(traceback.format_exception(exc))
        acks: list[Queued] = []
        if isinstance(exc, TurnCancelled):
            reason, detail = "cancelled", str(exc)
            acks = [q for q in act.queue if q.message is None][:1]  # the cancel, taken with it
        elif isinstance(exc, StateTooLarge | RecordTooLarge):
            reason, detail = _too_large(exc)
        else:
            assert act.actor is not None
            reason = f"handler {type(act.actor).__name__}.{handler.name} failed {attempt} times: {exc!r}"
        write = r.journaling.dead_letter_write(
            act.id, source.origin, source.ref, source.raw, reason, detail, env, acks
        )
        closed(act, await r.commits.write(write))
        r.journaling.settled(act, acks)

    async def _count_start(self, act: Activation, env: Envelope, mode: str = "count") -> int:
        """Count this start of a recovered turn in Redis; returns the starts counted (with
        ``look``: the starts counted before, counting nothing)."""
        r = self.runner
        starts = await r.store.count_delivery(r.shard, r.lease.value, act.id, delivery(act, env), mode)
        act.counted = act.counted or mode == "count"
        return starts

    async def forgive_running(self) -> None:
        """A graceful hand-over gives up the turns still running: their next start, by the
        next owner, is not counted as an interruption (see ``max_redeliveries``)."""
        for act in self.running():
            assert act.running is not None
            try:
                await self._count_start(act, act.running.envelope, "forgive")
            except Exception as exc:  # best effort: at worst the next start counts
                log.warning("shard %s: could not forgive the turn of %s: %r", self.runner.shard, act.id, exc)

    async def _poisoned(self, act: Activation, env: Envelope, source: Source, starts: int) -> None:
        """Dead-letter a message whose turn ended its runner too often (a message that kills
        its worker), instead of running it again."""
        r = self.runner
        reason = (
            f"its turn was started {starts} times and interrupted {starts - 1} times by the end of its "
            f"runner (the worker was killed or exited, or its event loop blocked until the lease moved); "
            f"max_redeliveries is {r.settings.max_redeliveries}"
        )
        write = r.journaling.dead_letter_write(act.id, source.origin, source.ref, source.raw, reason, "", env)
        closed(act, await r.commits.write(write))

    async def _call(self, ctx: TurnContext, actor: Actor, handler: Handler, queued: Queued) -> Any:
        """One attempt of the handler: within its limiters, in a span that is the child of
        the span that sent the message (whichever attempt, whichever worker)."""
        r = self.runner
        env, info = queued.envelope, ctx.info
        name = f"{type(actor).__name__}.{handler.name}"
        attributes = {"actor.type": env.actor, "actor.key": env.key, "message.type": env.type,
                      "message.id": env.id, "shard": r.shard, "attempt": info.attempt,
                      "epoch": info.epoch, "resumed": ctx.source.origin == "o"}  # fmt: skip
        limits = r.services.limits
        started = time.perf_counter()
        outcome = "done"
        span = telemetry.span(f"turn {name}", attributes, kind=SpanKind.CONSUMER, parent=env.headers)
        with span as current:
            try:
                queue = queue_of(env)
                # A turn fed by its type's own limiter's queue holds the slot it was dispatched with.
                type_limiter = None if queue == type(actor).limiter else type(actor).limiter
                if type_limiter is not None or queue is not None:
                    await r.commits.fenced()  # only the owner may spend the limiter's capacity
                async with limits.hold(type_limiter), limits.hold_item(queue, env.id):
                    ctx.in_handler = True
                    try:
                        return await handler.fn(actor, queued.message)
                    finally:
                        ctx.in_handler = False
                        if ctx.writing is not None:
                            await _write_done(ctx)
            except Suspend:
                outcome = "suspended"
                raise
            except Reject as exc:
                outcome = "rejected" if _rejects(ctx) else "failed"
                if outcome == "failed":
                    telemetry.failed(current, exc)
                raise
            except BaseException as exc:
                outcome = "failed"
                telemetry.failed(current, exc)
                raise
            finally:
                if current is not None:
                    current.set_attribute("turn.outcome", outcome)
                elapsed_ms = (time.perf_counter() - started) * 1000
                r.services.stats.record(elapsed_ms)
                telemetry.count_turn(env.actor, outcome, elapsed_ms)

    async def watch(self) -> None:
        """Every second while actor tasks run, end the attempts that have run past their
        turn timeout."""
        r = self.runner
        while True:
            if not r.work.tasks:  # no attempt can run: wait for a task rather than tick
                self.started.clear()
                await self.started.wait()
            await asyncio.sleep(TURN_CHECK)
            now = time.monotonic()
            for act in self.running():
                ctx = act.running
                if ctx is None or act.actor is None or ctx.interrupted is not None:
                    continue
                limit = type(act.actor).turn_timeout or r.settings.turn_timeout
                if limit is not None and now - ctx.started > limit:
                    why = f"{act.id}: the handler ran past its turn timeout of {limit}s"
                    log.warning("shard %s: %s", r.shard, why)
                    self.interrupt(act, TurnTimeout(why))

    def interrupt(self, act: Activation, why: BaseException) -> None:
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


def _rejects(ctx: TurnContext) -> bool:
    """Whether a Reject the handler raised rejects its turn: not when the attempt was
    interrupted, misused primitives or hit a journal mismatch, which decide the outcome
    (``_attempts`` looks at them first)."""
    return ctx.interrupted is None and ctx.misuse is None and ctx.journal.mismatch is None


def _reply(env: Envelope, result: Any, max_bytes: int) -> bytes:
    if not env.reply_to:
        return b""
    if result is not None and not isinstance(result, BaseModel):
        raise TypeError(f"a handler must return a pydantic model or None, not {type(result).__name__}")
    payload = None if result is None else dump_model(result)
    rtype = None if result is None else type(result).__name__
    data = encode_reply(Reply(env.id, True, rtype, payload))
    if len(data) > max_bytes:  # an asking turn would journal it as one record
        raise RecordTooLarge(f"the reply of {env.actor_id} to {env.type}", len(data), max_bytes)
    return data


def _too_large(exc: StateTooLarge | RecordTooLarge) -> tuple[str, str]:
    """The dead letter's reason and detail of a turn whose outcome was too large to write (its
    state, or its reply: a RecordTooLarge here is the reply's, a step's is journaled): given
    at once, since a retry would come to the same size."""
    what = "state" if isinstance(exc, StateTooLarge) else "reply"
    return f"{what} too large: {exc}", f"the turn was not retried and its {what} was not written"


async def _outlive_primitive(ctx: TurnContext) -> None:
    """Wait for a primitive still running in another task of the handler (cancelled when a
    second one was refused) to end: the turn's next work must not overlap it."""
    active = ctx.active
    if active is not None and active[1] is not None and active[1] is not asyncio.current_task():
        await asyncio.gather(active[1], return_exceptions=True)


async def _write_done(ctx: TurnContext) -> None:
    """Wait for a journal write the runner began while the handler ran (``open_running``):
    what follows the handler must see where the turn's message lives now. A cancellation
    that arrives meanwhile is raised after the write."""
    was_cancelled = False
    while ctx.writing is not None:
        try:
            await asyncio.shield(ctx.writing)
        except asyncio.CancelledError:
            was_cancelled = True
    if was_cancelled:
        raise asyncio.CancelledError()


def _take_back_interruption(ctx: TurnContext) -> BaseException | None:
    """The reason the host interrupted this attempt, if it did; the cancellation that
    delivered it is taken back, so that it does not count as the task's own."""
    why = ctx.interrupted
    if why is None:
        return None
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        task.uncancel()
    return why

"""What a turn writes before it ends, and what its runner does for it: the ``TurnHost``.

A turn's first journal write *opens* it (its message leaves the inbox or the deferred
list for the shard's ``turns`` hash); later writes record its progress; a suspended or
parked turn is written the same way. The handler writes through ``flush`` (after each
durable primitive), the runner through ``open_running`` (a long or hung turn, or one with
messages queued behind it while reading is paused); the writes of one turn never overlap.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from .. import telemetry
from ..codec import Envelope, Reply, encode_reply
from ..journal import (
    FOREVER_MS,
    INLINE_JOURNAL_BYTES,
    OpenTurn,
    Record,
    RedisClock,
    Send,
    Suspend,
    encode_record,
)
from ..lease import StepsInFlight
from ..queues import queued_item
from ..store import Write
from ..turn import Queued, TurnContext
from .state import Activation, Source, copy_records, deferral, reply_fields, taken_out

if TYPE_CHECKING:
    from .runner import ShardRunner

log = logging.getLogger("actors.shard")


def _nothing(send: Send) -> bool:
    return False


def _everything(send: Send) -> bool:
    return True


def split_sends(shard: int, sends: Sequence[Send]) -> tuple[list[bytes], list[tuple[int, bytes]]]:
    """Sends as the commit script takes them: to this shard's inbox, and to the outbox."""
    local = [data for _, target, data in sends if target == shard]
    remote = [(target, data) for _, target, data in sends if target != shard]
    return local, remote


class JournalPart(NamedTuple):
    """What one journal write does to the turn's journal."""

    inline: list[bytes] | None
    """The message and every record, kept in the header (the journal is small); or None."""
    keep: int
    """Items of the journal list kept (0: the list starts anew, or is deleted if inline)."""
    items: list[bytes]
    """Appended to the list after those kept."""
    base: int
    """The first record written by this write (the records before it are in Redis already)."""
    appended: list[Record]
    """The records from ``base`` on, as this write takes them."""
    stored: int | None
    """How many records the list holds after the write (None: no list)."""


def journal_part(envelope: bytes, records: list[Record], changed: int, count: int,
                 stored: int | None) -> JournalPart:  # fmt: skip
    """The first ``count`` records, ``changed`` the lowest replaced since the last write, of a
    turn whose list holds ``stored`` (None: no list): in the header while small, else appended
    to the list from the first record it lacks or that changed."""
    base = 0 if stored is None else min(changed, stored)
    appended = records[base:count]
    items = [encode_record(r) for r in appended]
    if stored is not None:
        return JournalPart(None, 1 + base, items, base, appended, count)  # item 0 is the message
    if len(envelope) + sum(map(len, items)) <= INLINE_JOURNAL_BYTES:
        return JournalPart([envelope, *items], 0, [], base, appended, None)
    return JournalPart(None, 0, [envelope, *items], base, appended, count)


class Journaling:
    """The TurnHost of a runner's turns (see ``turn.TurnHost``)."""

    def __init__(self, runner: ShardRunner) -> None:
        self.runner = runner
        self.clock: RedisClock = runner.clock
        self.steps: StepsInFlight = runner.lease.steps

    async def fenced(self) -> None:
        await self.runner.commits.fenced()

    def awaiting_reply(self, waiting: bool) -> None:
        self.runner.flow.park(waiting)

    async def deliver(self, ctx: TurnContext, target: str, ask: Send | None = None) -> None:
        """Deliver the pending sends to ``target`` (and ``ask``) now, with a journal write:
        an ask or a queued item must not overtake the sends the turn made to that actor
        before it. The other pending sends stay with the open turn."""
        if ask is None and not any(send[0] == target for send in ctx.pending):
            return
        source: Source = ctx.source
        extra = [ask] if ask is not None else []
        open_turn = OpenTurn(source.raw, ctx.journal.records)
        await self._write_open(ctx, open_turn, (), lambda send: send[0] == target, extra)

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

    async def suspend(self, ctx: TurnContext, suspend: Suspend) -> None:
        """Store the suspended turn and its timer; messages queued behind it are deferred."""
        source: Source = ctx.source
        act = source.act
        behind = [q for q in act.queue if q.message is not None and q not in ctx.consumed]
        open_turn = OpenTurn(source.raw, ctx.journal.records, suspend.waiting, suspend.due_ms,
                             since_ms=self.clock.upper())  # fmt: skip
        await self._write_open(ctx, open_turn, behind, _everything)  # sends go out when it suspends
        act.woken = False
        self.runner.timers.timer_set(suspend.due_ms)

    async def park(self, ctx: TurnContext, reason: str) -> None:
        """Park the turn (a journal mismatch): it waits, visible, until cancelled."""
        source: Source = ctx.source
        act = source.act
        log.error("shard %s: parked the open turn of %s: %s", self.runner.shard, act.id, reason)
        records = [] if act.open is None else act.open.records
        parked = OpenTurn(source.raw, records, None, FOREVER_MS, reason, since_ms=self.clock.upper())
        ctx.pending[:] = [] if act.open is None else act.open.pending  # this attempt's sends are dropped
        ctx.consumed.clear()
        await self._write_open(ctx, parked)

    async def _write_open(self, ctx: TurnContext, open_turn: OpenTurn, behind: Sequence[Queued] = (),
                          deliver: Callable[[Send], bool] = _nothing,
                          extra: Sequence[Send] = ()) -> None:  # fmt: skip
        """Journal the turn: open it, or record its progress, delivering the pending sends
        ``deliver`` picks (and ``extra``) and keeping the others. One write at a time per turn."""
        while ctx.writing is not None:
            await asyncio.shield(ctx.writing)
        ctx.writing = done = asyncio.get_running_loop().create_future()
        try:
            await self._journal(ctx, open_turn, behind, deliver, extra)
        finally:
            ctx.writing = None
            done.set_result(None)

    async def _journal(self, ctx: TurnContext, open_turn: OpenTurn, behind: Sequence[Queued],
                       deliver: Callable[[Send], bool], extra: Sequence[Send]) -> None:  # fmt: skip
        source: Source = ctx.source
        act = source.act
        written = act.open if source.origin == "o" else None
        open_turn.write = written.write + 1 if written is not None else 1
        # What this write carries, taken now: the handler may go on meanwhile, if the runner writes.
        records = open_turn.records
        whole = (len(records), len(records))  # a parked turn: the records as last written
        changed, count = ctx.journal.taken() if records is ctx.journal.records else whole
        part = journal_part(
            open_turn.envelope, records, changed, count, None if written is None else written.stored
        )
        consumed = list(ctx.consumed)
        out = [send for send in ctx.pending if deliver(send)]
        open_turn.pending = [send for send in ctx.pending if not deliver(send)]
        local, remote = split_sends(self.runner.shard, [*out, *extra])
        write = Write(
            "j", act.id, source.origin, source.ref,
            local=local, remote=remote,
            open_turn=open_turn.header(part.inline), score=open_turn.due_ms,
            journal_keep=part.keep, journal_items=part.items,
            defers=[deferral(q) for q in behind],
            **taken_out(ctx, consumed),
        )  # fmt: skip
        await self.runner.commits.write(write)
        delivered = set(out)
        ctx.pending[:] = [send for send in ctx.pending if send not in delivered]
        del ctx.consumed[: len(consumed)]
        self.settled(act, [*consumed, *behind])
        # The records as Redis now holds them: those kept, then copies of those appended.
        mirror = written.records if written is not None and written.stored is not None else []
        del mirror[part.base :]
        mirror += copy_records(part.appended)
        act.open = dataclasses.replace(open_turn, records=mirror, stored=part.stored)
        source.origin, source.ref = "o", str(open_turn.write)

    async def candidates(self, ctx: TurnContext, message_type: str) -> list[Queued]:
        """Messages of ``message_type`` behind this turn: deferred ones (all of them, read from
        their type's index, whatever else is deferred), then queued ones; each knows its
        arrival (``Queued.arrived``)."""
        r = self.runner
        source: Source = ctx.source
        act = source.act
        found: list[Queued] = []
        if act.open is not None or act.backlog or source.origin != "i":
            items = await r.store.deferred_of_type(r.shard, act.id, message_type)
            if source.origin == "q" and items and items[0][1] == source.raw:
                items = items[1:]  # this turn's own message, still the deferred head
            for arrived, raw in items:
                checked = r.mailbox.check(None, raw)
                if isinstance(checked, Queued) and checked.envelope.type == message_type:
                    found.append(dataclasses.replace(checked, arrived=arrived))
        found += [q for q in act.queue if q.message is not None and q.envelope.type == message_type]
        return [q for q in found if q not in ctx.consumed]

    def settled(self, act: Activation, items: Iterable[Queued]) -> None:
        """Inbox messages whose fate a write just decided leave the actor's queue."""
        for queued in items:
            if queued.entry_id is not None:
                act.queue.remove(queued)
                self.runner.flow.finished()

    def dead_letter_write(
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
        r = self.runner
        log.warning("shard %s: dead-lettered a message%s: %s", r.shard, f" to {aid}" if aid else "", reason)
        telemetry.record("dead_letters", 1, {"actor.type": env.actor if env is not None else ""})
        reply: dict[str, Any] = {}
        if env is not None:
            error = encode_reply(Reply(env.id, False, None, None, reason, detail))
            reply = reply_fields(r.store.keys, r.shard, env, error)
        item = None if env is None else queued_item(env.headers, env.id)
        return Write("d", aid, origin, ref, envelope=raw, reason=reason, detail=detail,
                     acks=[q.entry_id for q in acks if q.entry_id], item=item, **reply)  # fmt: skip

    async def relieve(self) -> None:
        """Reading is paused (``max_inflight``): open the running turns that have messages
        queued behind them, which then wait in Redis (deferred), not in memory."""
        r = self.runner
        crowded = sorted(r.turns.running(), key=lambda a: len(a.queue), reverse=True)
        for act in crowded:
            if r.flow.room.is_set():
                return
            await self.open_running(act)

    async def open_running(self, act: Activation) -> None:
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

    async def open_long_turns(self, older_than: float) -> None:
        """Open the turns that have run for ``older_than`` seconds (see ``open_running``)."""
        now = time.monotonic()
        for act in self.runner.turns.running():
            ctx = act.running
            if ctx is not None and now - ctx.started >= older_than:
                await self.open_running(act)

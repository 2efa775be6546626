"""Steps 1 and 2 of the data path: read the shard's inbox in order, check each entry (bad
input goes to the dead-letter stream with its reason), and queue it on its actor.

Entries enter the consumer group (and so a pending list) only through fenced scripts, so
a paused former owner can never take any. At start the runner claims its pending entries
and reads with the fenced ``read_new`` until a batch is not full: the group has then
delivered everything up to its newest entry. From there it waits on its feed of the
worker's inbox reader (``store.reader``: one plain ``XREAD`` for many shards) for entries
after the newest it has seen, and the turns of what that returns start at once; the next
commit takes those entries into the group first, and effects outside the commit wait for
that (``Commits.confirmed``). One round trip per wake-up.

An idle runner makes no call of its own: it waits on its feed until entries come or its
chores are due, and its chores call Redis only for what changed or came due (see
``_next_chores``). Its lease is watched by the worker's LeaseKeeper, which stops the runner
when a renewal fails, and every write it makes is fenced."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from typing import TYPE_CHECKING

from .. import telemetry
from ..codec import Envelope, Malformed, decode_envelope
from ..errors import DecodeError, InvalidEnvelope, TurnCancelled, UnknownActorType, UnknownMessageType
from ..messages import CANCEL, TICK, Tick
from ..routing import foreign_reply_to, misplaced
from ..store import Entry, InboxFeed
from ..turn import Queued
from .state import kept, spread

if TYPE_CHECKING:
    from .runner import ShardRunner

TRIM_AFTER = 100
"""Entries read before the chores trim the inbox. ``XTRIM MINID ~`` drops whole stream nodes
only (at most 100 entries or 4 KiB each, by default), so a trim after fewer entries mostly
drops nothing: a shard with a message now and then would pay a call for each."""

Checked = Queued | tuple[str, str, Envelope | None]
"""An entry as a queued message, or (reason, detail, envelope if decodable) to dead-letter."""


class Mailbox:
    def __init__(self, runner: ShardRunner) -> None:
        self.runner = runner
        self.claimed: set[str] = set()
        """Entries claimed from a previous runner's pending list, not yet started."""
        self.lag = 0
        """Inbox entries not yet read, as of the last chores (only kept when metrics are on)."""
        self._feed: InboxFeed | None = None
        self._reply_prefix = runner.store.keys.reply_channel("")
        self._touched = True
        """The inbox or its group changed since the last chores."""
        self._untrimmed = TRIM_AFTER
        """Entries read since everything read up to then was trimmed (at start, unknown: a
        previous owner's)."""
        self._chores_due = math.inf
        """When (monotonic) the next chores are due."""

    def stop_reading(self) -> None:
        """End the wait for new entries in progress, if any (draining): that wait only, the
        reader's XREAD goes on for the other shards."""
        if self._feed is not None:
            self._feed.interrupt()

    async def read_loop(self) -> None:
        """Read until draining, one round trip per wake-up (see the module docstring)."""
        self._feed = feed = self.runner.services.reader.open(self.runner.shard)
        try:
            await self._read_until_drained(feed)
        finally:
            feed.close()

    def touched(self) -> None:
        """The inbox or its consumer group changed (entries read, a commit): trim within a
        ``trim_interval``, as a busy shard always does."""
        self._touched = True
        now = time.monotonic()
        if self._chores_due > now + self.runner.settings.trim_interval:
            self._chores_due = now + spread(self.runner.settings.trim_interval)
            if self._feed is not None:  # its wait was until the old time: look again
                self._feed.interrupt()

    async def _read_until_drained(self, feed: InboxFeed) -> None:
        r, s = self.runner, self.runner.settings
        fresh = await r.store.take_handover(r.shard)  # never started by the last owner
        claimed = await r.store.claim_pending(r.shard, r.consumer, s.read_count)
        self.claimed = {entry_id for entry_id, _ in claimed if entry_id not in fresh}
        await self.dispatch(claimed)
        self._chores_due = time.monotonic() + spread(s.trim_interval)
        after: str | None = None
        while not r.stopping.is_set():
            if not r.flow.room.is_set():
                await r.journaling.relieve()
                await self._wait_for_room(s.trim_interval)
            if r.stopping.is_set():
                break
            if not r.flow.room.is_set():
                pass  # still full: only the chores below, then look again
            elif after is None:
                entries, newest = await r.store.read_new(r.shard, r.lease.value, r.consumer, s.read_count)
                await self.dispatch(entries)
                after = None if len(entries) == s.read_count else newest
            else:
                seen = await self._read_after(feed, after)
                if seen is None:
                    return
                if seen:
                    after = seen[-1][0]
                    r.commits.saw(seen)
                    await self.dispatch(seen)
                else:
                    # Quiet until the chores: take what is seen (long turns may hold it).
                    await r.commits.confirmed()
            if time.monotonic() >= self._chores_due:
                await self._chores()
                self._chores_due = self._next_chores()

    async def _wait_for_room(self, timeout: float) -> None:
        """Until reading may go on, draining begins, or ``timeout`` seconds have passed."""
        r = self.runner
        waits = {asyncio.ensure_future(r.flow.room.wait()), asyncio.ensure_future(r.stopping.wait())}
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    async def _read_after(self, feed: InboxFeed, after: str) -> list[Entry] | None:
        """Entries after ``after``, waiting for one until the chores are due ([] if none
        came); None if draining began meanwhile."""
        seen = await feed.read_after(after, max(0.0, self._chores_due - time.monotonic()))
        if not seen and self.runner.stopping.is_set():
            return None
        return seen

    async def _chores(self) -> None:
        r = self.runner
        await r.journaling.open_long_turns(older_than=r.settings.trim_interval)
        if self._touched:
            self._touched = False  # a commit during the trim touches it again
            if self._untrimmed >= TRIM_AFTER:
                read = self._untrimmed
                # Take what was read first: entries read and not yet taken are neither pending
                # nor delivered, so "nothing pending" would not mean "trimmed up to them".
                await r.commits.confirmed()
                _, pending = await r.store.trim_inbox(r.shard)
                if not pending:  # trimmed up to the last entry read, a stream node aside
                    self._untrimmed -= read
        r.work.evict_idle()
        await r.retention.chores()
        if telemetry.metering():
            self.lag = (await r.store.shard_info(r.shard)).lag or 0

    def _next_chores(self) -> float:
        """When (monotonic) the chores next have something to do, a ``trim_interval`` from
        now at the soonest: then while the shard is busy (its inbox changed, actor tasks run:
        long turns to open) or metrics are on (the lag to read); otherwise once an idle
        activation is to be evicted or the retention chores are due (``inf``: none is)."""
        r = self.runner
        soonest = time.monotonic() + spread(r.settings.trim_interval)
        if self._touched or r.work.tasks or telemetry.metering():
            return soonest
        return max(soonest, min(r.work.eviction_due(), r.retention.due()))

    async def dispatch(self, entries: list[Entry]) -> None:
        r = self.runner
        if entries:
            self._untrimmed += len(entries)
            self.touched()
        accepted: list[Queued] = []
        for entry_id, raw in entries:
            checked = self.check(entry_id, raw)
            if isinstance(checked, Queued):
                r.flow.took()
                accepted.append(checked)
            else:
                reason, detail, env = checked
                write = r.journaling.dead_letter_write("", "i", entry_id, kept(raw), reason, detail, env)
                await r.commits.write(write)
        ids = [q.envelope.actor_id for q in accepted]
        await r.work.activate({aid: q.envelope.actor for aid, q in zip(ids, accepted, strict=True)})
        if r.stopping.is_set():  # draining began meanwhile (the read was in flight): as
            # Work.release_queued does, handing them over (a fenced read took them: pending)
            r.work.forget([q for q in accepted if not r.work.keeps(q)])
            accepted = [q for q in accepted if r.work.keeps(q)]
            ids = [q.envelope.actor_id for q in accepted]
        for aid, queued in zip(ids, accepted, strict=True):
            act = r.activations[aid]
            act.queue.append(queued)
            if queued.message is None and act.running is not None:  # a cancel ends a running turn too
                r.turns.interrupt(act, TurnCancelled(f"{act.id}: its running turn was cancelled"))
            r.work.start(act)

    def check(self, entry_id: str | None, raw: bytes | Malformed) -> Checked:
        """The entry as a queued message, or (reason, detail, envelope if decodable) to dead-letter."""
        r = self.runner
        if isinstance(raw, Malformed):
            return "undecodable", raw.detail, None
        try:
            env = decode_envelope(raw)
        except InvalidEnvelope as exc:  # an id, headers or reply channel not to act on
            return exc.reason, str(exc), exc.envelope
        except DecodeError as exc:
            return "undecodable", str(exc), None
        limit = r.settings.messages.max_message_bytes
        if len(raw) > limit:
            return "too large", f"{len(raw)} bytes; the limit (max_message_bytes) is {limit}", env
        foreign = None if env.reply_to is None else foreign_reply_to(env.reply_to, self._reply_prefix)
        if foreign is not None:
            return "invalid reply_to", foreign, dataclasses.replace(env, reply_to=None)
        try:
            cls = r.services.app.actor_type(env.actor)
            misplaced_in = misplaced(env.actor_id, r.shard, r.services.shards)
            if misplaced_in is not None:  # its own shard holds the actor: no second copy here
                return "wrong shard", misplaced_in, env
            if env.type == CANCEL:
                return Queued(entry_id, raw, env, None, entry_id or "")
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
        return Queued(entry_id, raw, env, message, entry_id or "")

"""Step 3 of the data path: each actor's work, one piece at a time, in order. Its open
turn if it has one (resumed when woken or when a message it waits for arrives; other
messages are deferred behind it), then its deferred messages, then its queue. Actors are
activated on demand (snapshot, timer score and open turn in one round trip) and dropped
from memory when idle."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING

from .. import telemetry
from ..codec import decode_envelope
from ..errors import DecodeError
from ..journal import FOREVER_MS, OpenTurn
from ..store import BACKLOG, LoadedActor, Write
from ..turn import Queued
from .state import Activation, Source, deferral, load_state, write_number

if TYPE_CHECKING:
    from .runner import ShardRunner

log = logging.getLogger("actors.shard")


class Work:
    def __init__(self, runner: ShardRunner) -> None:
        self.runner = runner
        self.tasks: set[asyncio.Task[None]] = set()
        """Every actor task of the runner that has not finished."""
        self._loading: dict[str, int] = {}
        """Actor id -> activations of it being loaded now (the retention sweep leaves them be)."""

    async def activate(self, wanted: dict[str, str]) -> None:
        """Make sure each actor id has an activation, loading actors in one call.

        Once it returns, every one has (until the caller's next await). An activation may go
        while others load (evicted, by the retention sweep too): then it is loaded again."""
        r = self.runner
        while missing := [aid for aid in wanted if aid not in r.activations]:
            deleting = r.retention.deleting(missing)
            if deleting is not None:  # its snapshot may be going: load what Redis keeps after
                await deleting
                continue
            self._hold(missing, 1)
            try:
                loaded = await r.store.load_actors(r.shard, missing)
            finally:
                self._hold(missing, -1)
            for aid, found in zip(missing, loaded, strict=True):
                # Another caller may have activated it while we loaded; theirs is as fresh.
                r.activations.setdefault(aid, self._restore(wanted[aid], aid, found))

    def loading(self, actor_id: str) -> bool:
        return actor_id in self._loading

    def _hold(self, actor_ids: list[str], step: int) -> None:
        for aid in actor_ids:
            count = self._loading.get(aid, 0) + step
            if count:
                self._loading[aid] = count
            else:
                del self._loading[aid]

    def _restore(self, actor_type: str, aid: str, found: LoadedActor) -> Activation:
        key = aid.partition("/")[2]
        try:
            cls = self.runner.services.app.actor_type(actor_type)
            state = load_state(cls, found.snapshot)
            act = Activation(aid, cls(key, state), found.snapshot)
        except Exception as exc:  # UnknownActorType, DecodeError, or whatever a validator raises
            act = Activation(aid, None, found.snapshot, broken=f"actor {aid} cannot be loaded: {exc}")
        if found.open_turn is not None:
            try:
                act.open = OpenTurn.decode(found.open_turn, found.journal)
            except DecodeError as exc:
                reason = f"its open turn cannot be read: {exc}"
                act.open = OpenTurn(b"", [], None, FOREVER_MS, reason, write=write_number(found.open_turn))
            act.woken = found.timer == 0
        else:
            act.backlog = found.timer is not None
        act.recovering = found.timer == 0
        return act

    def start(self, act: Activation) -> asyncio.Task[None]:
        if act.task is None:
            act.task = asyncio.create_task(self._drain_actor(act))
            self.tasks.add(act.task)
            act.task.add_done_callback(self._actor_done)
            self.runner.turns.started.set()
        return act.task

    def _actor_done(self, task: asyncio.Task[None]) -> None:
        """Turn a failed actor task (lost lease, Redis error) into the runner's failure."""
        self.tasks.discard(task)
        timers = self.runner.timers
        timers.waking.discard(task)
        timers.task_room.set()
        if not task.cancelled() and task.exception() is not None:
            self.runner.fail(task.exception())  # type: ignore[arg-type]

    def evict_idle(self) -> None:
        r = self.runner
        now = time.monotonic()
        idle = [(a.last_used, aid) for aid, a in r.activations.items() if a.task is None and not a.queue]
        excess = len(r.activations) - r.settings.max_activations
        idle.sort()
        for n, (last_used, aid) in enumerate(idle):
            if n < excess or now - last_used > r.settings.idle_timeout:
                del r.activations[aid]

    def eviction_due(self) -> float:
        """When (monotonic) ``evict_idle`` next has an idle activation to evict (``inf``: none;
        a busy one, when its work ends, is a change the mailbox sees)."""
        r = self.runner
        if len(r.activations) > r.settings.max_activations:
            return time.monotonic()
        idle = [a.last_used for a in r.activations.values() if a.task is None and not a.queue]
        return min(idle) + r.settings.idle_timeout if idle else math.inf

    def release_queued(self) -> int:
        """Draining: forget the messages queued in memory whose turns have not started, and
        return how many. Redis keeps each: an entry seen by ``read_after`` and not yet taken
        is still undelivered in the group (the next owner reads it), a taken one is pending
        (the next owner claims it), in order either way. Kept: the messages a running turn
        has received (its write acks them) and the asks of this worker's own turns (their
        askers wait for the reply to finish)."""
        r = self.runner
        released = 0
        for act in r.activations.values():
            received = act.running.consumed if act.running is not None else []
            kept = [q for q in act.queue if q in received or self.keeps(q)]
            self.forget([q for q in act.queue if q not in kept])
            released += len(act.queue) - len(kept)
            act.queue.clear()
            act.queue.extend(kept)
        return released

    def forget(self, unstarted: list[Queued]) -> None:
        """Draining: let go of inbox messages taken and never started, naming them for the
        next owner (``handed_over``) unless they were claimed from an earlier owner."""
        r = self.runner
        # Never started here, nor (unless claimed) by anyone: the next owner's to take as fresh.
        r.handed_over += [q.entry_id for q in unstarted if q.entry_id and q.entry_id not in r.mailbox.claimed]
        for _ in unstarted:
            r.flow.finished()

    def keeps(self, queued: Queued) -> bool:
        """Whether a draining runner still runs this message: an ask of one of this worker's
        turns (a turn waiting for the reply would otherwise wait until the grace is over)."""
        return queued.envelope.reply_to == self.runner.services.replies.channel

    async def _drain_actor(self, act: Activation) -> None:
        # Draining, an actor finishes the piece of work in progress, and what stays queued.
        stopping = self.runner.stopping
        while (not stopping.is_set() or act.queue) and await self._advance(act):
            pass
        act.task = None
        act.last_used = time.monotonic()

    async def _advance(self, act: Activation) -> bool:
        """Do the actor's next piece of work; False when it has none."""
        r = self.runner
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
                log.info("shard %s: %s has no open turn to cancel", r.shard, act.id)
                await r.commits.write(Write("c", act.id, "i", queued.entry_id or ""))
            else:
                entry_id = queued.entry_id or ""
                recovered = entry_id in r.mailbox.claimed
                r.mailbox.claimed.discard(entry_id)
                await r.turns.turn(act, queued, Source(act, "i", entry_id, queued.raw, recovered))
        finally:
            r.flow.finished()
        return True

    async def _advance_open(self, act: Activation) -> bool:
        """Work for an actor with an open turn: cancel it, resume it, or defer messages behind it."""
        assert act.open is not None
        r = self.runner
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
            await r.commits.write(Write("f", act.id, defers=[deferral(q) for q in behind]))
            r.journaling.settled(act, behind)
            return True
        return False

    def _note_wake(self, open_turn: OpenTurn, what: str) -> None:
        """What woke an open turn: a timer's lateness (metric), and a span in the trace of
        the turn's message."""
        lateness = max(0, self.runner.clock.lower() - open_turn.due_ms) if what == "timer fired" else 0
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
        r = self.runner
        raws = await r.store.deferred(r.shard, act.id, 1)
        if not raws:
            act.backlog = await r.commits.write(Write("s", act.id)) == BACKLOG
            return
        raw = raws[0]
        checked = r.mailbox.check(None, raw)
        if isinstance(checked, Queued):
            await r.turns.turn(act, checked, Source(act, "q", raw, raw, _recovering(act)))
            return
        reason, detail, env = checked
        write = r.journaling.dead_letter_write(act.id, "q", raw, raw, reason, detail, env)
        act.backlog = await r.commits.write(write) == BACKLOG

    async def _resume(self, act: Activation) -> None:
        """Run an open turn again from the top; its journal replays what it already did."""
        assert act.open is not None
        r = self.runner
        checked = r.mailbox.check(None, act.open.envelope)
        if isinstance(checked, Queued):
            source = Source(act, "o", str(act.open.write), act.open.envelope, _recovering(act))
            await r.turns.turn(act, checked, source)
            return
        reason, detail, env = checked
        write = r.journaling.dead_letter_write(
            act.id, "o", str(act.open.write), act.open.envelope, reason, detail, env
        )
        closed(act, await r.commits.write(write))

    async def _cancel(self, act: Activation, control: Queued) -> None:
        assert act.open is not None
        r = self.runner
        checked = r.mailbox.check(None, act.open.envelope)
        env = checked.envelope if isinstance(checked, Queued) else checked[2]
        reason = "cancelled"
        detail = f"its open turn was cancelled (message {control.envelope.id})"
        write = r.journaling.dead_letter_write(
            act.id, "o", str(act.open.write), act.open.envelope, reason, detail, env, acks=[control]
        )
        log.info("shard %s: cancelled the open turn of %s", r.shard, act.id)
        closed(act, await r.commits.write(write))
        r.journaling.settled(act, [control])


def closed(act: Activation, result: int) -> None:
    """The actor's open turn (or deferred message) was just closed by a write."""
    act.open = None
    act.woken = False
    act.backlog = result == BACKLOG


def _recovering(act: Activation) -> bool:
    """Whether this start of the actor's open turn or deferred head is a recovery (once)."""
    recovering, act.recovering = act.recovering, False
    return recovering

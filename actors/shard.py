"""The turn loop of one owned shard: receive -> turn -> commit -> forward.

Reading this file top to bottom follows a message:

1. ``_read_loop`` claims the previous owner's pending entries, then reads new ones.
2. ``_dispatch`` checks each entry (bad input goes to the dead-letter stream)
   and queues it on its actor's activation, loading snapshots in one call.
3. ``_drain_actor`` runs the actor's turns one at a time, in order; ``_turn``
   calls the handler, with retries.
4. ``_commit_loop`` commits every ready turn of the shard in one fenced script.
5. ``_forward_loop`` moves committed cross-shard messages to their shards.

Any Redis error or lost lease ends the runner; its owner (the worker) drops
every activation and starts afresh from what Redis holds, so memory never
runs ahead of a commit.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from .actor import Actor
from .codec import (
    Envelope,
    Reply,
    decode_envelope,
    decode_state,
    dump_model,
    encode_reply,
    encode_state,
)
from .errors import ActorsError, DecodeError, UnknownActorType, UnknownMessageType
from .settings import WorkerSettings
from .store import Entry, TurnRecord
from .turn import TurnContext, TurnInfo, TurnServices

log = logging.getLogger("actors.shard")


@dataclass(frozen=True, slots=True)
class Lease:
    shard: int
    epoch: int
    value: str
    """``<worker id>|<epoch>``, what the commit script compares."""


class ShardReset(ActorsError):
    """Memory may disagree with Redis (a turn was already committed): start afresh."""


@dataclass(frozen=True, slots=True)
class Queued:
    entry_id: str
    raw: bytes
    envelope: Envelope
    message: BaseModel


class Activation:
    """An actor in memory: its instance, last committed snapshot and queued messages."""

    __slots__ = ("actor", "broken", "last_used", "queue", "snapshot", "task")

    def __init__(self, actor: Actor | None, snapshot: bytes | None, broken: str = "") -> None:
        self.actor = actor
        self.snapshot = snapshot
        self.queue: deque[Queued] = deque()
        self.task: asyncio.Task[None] | None = None
        self.last_used = time.monotonic()
        self.broken = broken


class ShardRunner:
    def __init__(self, lease: Lease, consumer: str, services: TurnServices, settings: WorkerSettings) -> None:
        self.lease = lease
        self.shard = lease.shard
        self.consumer = consumer
        self.services = services
        self.store = services.store
        self.settings = settings
        self.activations: dict[str, Activation] = {}
        self.inflight = 0
        self._room = asyncio.Event()
        self._room.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = asyncio.Event()
        self._commits: list[tuple[TurnRecord, asyncio.Future[bool]]] = []
        self._commit_wakeup = asyncio.Event()
        self._forward_wakeup = asyncio.Event()
        self._actor_tasks: set[asyncio.Task[None]] = set()
        self._actor_failure: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reply_ttl_ms = int(settings.messages.reply_ttl * 1000)

    async def run(self) -> None:
        """Run until cancelled, drained, or an error (which propagates)."""
        try:
            async with asyncio.TaskGroup() as tg:
                committer = tg.create_task(self._commit_loop(), name=f"commit-{self.shard}")
                forwarder = tg.create_task(self._forward_loop(), name=f"forward-{self.shard}")
                watcher = tg.create_task(self._watch_actors(), name=f"actors-{self.shard}")
                await self._read_loop()
                await self._idle.wait()
                for task in (committer, forwarder, watcher):
                    task.cancel()
        finally:
            for task in self._actor_tasks:
                task.cancel()
            await asyncio.gather(*self._actor_tasks, return_exceptions=True)

    async def _watch_actors(self) -> None:
        """Turn a failed actor task (lost lease, Redis error) into the runner's failure."""
        await self._actor_failure

    def _actor_done(self, task: asyncio.Task[None]) -> None:
        self._actor_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and not self._actor_failure.done():
            self._actor_failure.set_exception(task.exception())  # type: ignore[arg-type]

    def drain(self) -> None:
        """Stop reading; ``run`` returns once every read message is committed."""
        self._stopping.set()

    # ---- 1. receive --------------------------------------------------------------
    async def _read_loop(self) -> None:
        s = self.settings
        await self._dispatch(await self.store.claim_pending(self.shard, self.consumer, s.read_count))
        next_chores = time.monotonic() + s.trim_interval
        while not self._stopping.is_set():
            await self._room.wait()
            entries, newest = await self.store.read_new(
                self.shard, self.lease.value, self.consumer, s.read_count
            )
            if entries:
                await self._dispatch(entries)
            elif not await self._wait_for_new(newest):
                return
            if time.monotonic() >= next_chores:
                await self._chores()
                next_chores = time.monotonic() + s.trim_interval

    async def _wait_for_new(self, newest: str) -> bool:
        """Block until the inbox has an entry after ``newest``; False if draining began."""
        waiting = asyncio.ensure_future(self.store.wait_for_new(self.shard, newest, self.settings.block_ms))
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({waiting, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not waiting.done():
                waiting.cancel()
                await asyncio.gather(waiting, return_exceptions=True)
        if waiting.cancelled():
            return False
        waiting.result()  # re-raise a Redis error
        return True

    async def _chores(self) -> None:
        await self.store.trim_inbox(self.shard)
        self._evict_idle()

    def _evict_idle(self) -> None:
        now = time.monotonic()
        idle = [(a.last_used, aid) for aid, a in self.activations.items() if a.task is None and not a.queue]
        excess = len(self.activations) - self.settings.max_activations
        idle.sort()
        for n, (last_used, aid) in enumerate(idle):
            if n < excess or now - last_used > self.settings.idle_timeout:
                del self.activations[aid]

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
                await self._dead_letter(entry_id, raw or b"", reason, detail, env)
        await self._activate({q.envelope.actor_id: q.envelope.actor for q in accepted})
        for queued in accepted:
            act = self.activations[queued.envelope.actor_id]
            act.queue.append(queued)
            if act.task is None:
                act.task = asyncio.create_task(self._drain_actor(act))
                self._actor_tasks.add(act.task)
                act.task.add_done_callback(self._actor_done)

    def _check(self, entry_id: str, raw: bytes | None) -> Queued | tuple[str, str, Envelope | None]:
        """The entry as a queued message, or (reason, detail, envelope if decodable) to dead-letter."""
        if raw is None:
            return "undecodable", "the entry has no 'e' field", None
        try:
            env = decode_envelope(raw)
        except DecodeError as exc:
            return "undecodable", str(exc), None
        limit = self.settings.messages.max_message_bytes
        if len(raw) > limit:
            return "too large", f"{len(raw)} bytes; the limit (max_message_bytes) is {limit}", env
        try:
            handler = self.services.app.actor_type(env.actor).handler_for(env.type)
        except UnknownActorType as exc:
            return "unknown actor type", str(exc), env
        except UnknownMessageType as exc:
            return "unknown message type", str(exc), env
        try:
            message = handler.message.model_validate(env.payload)
        except Exception as exc:  # a user validator may raise anything, not only ValidationError
            return "invalid payload", f"{type(exc).__name__}: {exc}", env
        return Queued(entry_id, raw, env, message)

    async def _activate(self, wanted: dict[str, str]) -> None:
        """Make sure each actor id has an activation, loading snapshots in one call."""
        missing = [aid for aid in wanted if aid not in self.activations]
        if not missing:
            return
        snapshots = await self.store.load_states(self.shard, missing)
        for aid, snapshot in zip(missing, snapshots, strict=True):
            self.activations[aid] = self._restore(wanted[aid], aid, snapshot)

    def _restore(self, actor_type: str, aid: str, snapshot: bytes | None) -> Activation:
        cls = self.services.app.actor_type(actor_type)
        key = aid.partition("/")[2]
        try:
            state = _load_state(cls, snapshot)
        except Exception as exc:  # DecodeError, ValidationError, or whatever a validator raises
            return Activation(
                None, snapshot, broken=f"state snapshot does not load into {cls.__name__}.State: {exc}"
            )
        return Activation(cls(key, state), snapshot)

    # ---- 3. turns --------------------------------------------------------------------
    async def _drain_actor(self, act: Activation) -> None:
        while act.queue:
            queued = act.queue[0]
            if act.actor is None:
                await self._dead_letter(
                    queued.entry_id, queued.raw, "actor state unloadable", act.broken, queued.envelope
                )
            else:
                await self._turn(act, act.actor, queued)
            act.queue.popleft()
            self._finished()
        act.task = None
        act.last_used = time.monotonic()

    async def _turn(self, act: Activation, actor: Actor, queued: Queued) -> None:
        env = queued.envelope
        handler = type(actor).handlers[env.type]
        retry = self.settings.retry
        attempt = 0
        while True:
            attempt += 1
            info = TurnInfo(env.id, env.type, self.shard, self.lease.epoch, self.consumer, attempt)
            ctx = TurnContext(self.services, self.shard, env, info)
            actor._turn = ctx
            try:
                result = await handler.fn(actor, queued.message)
                snapshot = encode_state(actor.state)
                reply = self._reply(env, result)
                break
            except Exception as exc:
                # A failed attempt must leave no trace: back to the committed snapshot
                # (it loaded when the actor was activated, so it loads again).
                actor.state = _load_state(type(actor), act.snapshot)
                if attempt >= retry.max_attempts:
                    detail = "".join(traceback.format_exception(exc))
                    reason = f"handler {type(actor).__name__}.{handler.name} failed {attempt} times: {exc!r}"
                    await self._dead_letter(queued.entry_id, queued.raw, reason, detail, env)
                    return
                await asyncio.sleep(retry.delay(attempt))
            finally:
                actor._turn = None
        record = TurnRecord(
            entry_id=queued.entry_id,
            actor_id=env.actor_id,
            snapshot=None if snapshot == act.snapshot else snapshot,
            local=ctx.local,
            remote=ctx.remote,
            reply_key=self.store.keys.reply(self.shard, env.id) if env.reply_to else None,
            reply_channel=env.reply_to,
            reply=reply,
        )
        if not await self._commit(record):
            raise ShardReset(f"shard {self.shard}: entry {queued.entry_id} was already committed")
        act.snapshot = snapshot

    @staticmethod
    def _reply(env: Envelope, result: Any) -> bytes:
        if not env.reply_to:
            return b""
        if result is not None and not isinstance(result, BaseModel):
            raise TypeError(f"a handler must return a pydantic model or None, not {type(result).__name__}")
        payload = None if result is None else dump_model(result)
        rtype = None if result is None else type(result).__name__
        return encode_reply(Reply(env.id, True, rtype, payload))

    # ---- 4. commit ---------------------------------------------------------------------
    async def _commit(self, record: TurnRecord) -> bool:
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._commits.append((record, fut))
        self._commit_wakeup.set()
        return await fut

    async def _commit_loop(self) -> None:
        """One script in flight at a time; turns that finish meanwhile form the next batch,
        so a busy shard commits in batches and an idle one commits each turn at once."""
        limit = self.settings.commit_batch
        while True:
            await self._commit_wakeup.wait()
            self._commit_wakeup.clear()
            while self._commits:
                batch, self._commits = self._commits[:limit], self._commits[limit:]
                results = await self.store.commit(
                    self.shard, self.lease.value, [r for r, _ in batch], self._reply_ttl_ms
                )
                forwarded = False
                for (record, fut), fresh in zip(batch, results, strict=True):
                    forwarded = forwarded or bool(record.remote)
                    if not fut.done():
                        fut.set_result(fresh)
                if forwarded:
                    self._forward_wakeup.set()

    async def _dead_letter(
        self, entry_id: str, raw: bytes, reason: str, detail: str, env: Envelope | None
    ) -> None:
        reply = None
        if env is not None and env.reply_to:
            error = encode_reply(Reply(env.id, False, None, None, reason, detail))
            reply = (self.store.keys.reply(self.shard, env.id), env.reply_to, error)
        log.warning("shard %s: dead-lettered entry %s: %s", self.shard, entry_id, reason)
        await self.store.dead_letter(
            self.shard, self.lease.value, entry_id, raw, reason, detail, reply, self._reply_ttl_ms
        )

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
        if self.inflight >= self.settings.max_inflight:
            self._room.clear()

    def _finished(self) -> None:
        self.inflight -= 1
        if self.inflight < self.settings.max_inflight:
            self._room.set()
        if self.inflight == 0:
            self._idle.set()


def _load_state(cls: type[Actor], snapshot: bytes | None) -> Any:
    """An actor's state from its committed snapshot (a fresh State if it has none)."""
    return cls.State() if snapshot is None else cls.State.model_validate(decode_state(snapshot))

"""What a shard runner keeps per actor, and small helpers its parts share."""

from __future__ import annotations

import asyncio
import copy
import random
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..actor import Actor
from ..codec import Envelope, Malformed, decode_state, reply_marker_key
from ..definition import Handler
from ..errors import ActorsError, Diverged, LeaseLost
from ..journal import OpenTurn, Record
from ..keys import Keys
from ..messages import Tick
from ..queues import queued_item
from ..store import Deferred
from ..turn import Queued, TurnContext


class ShardReset(ActorsError):
    """Memory may disagree with Redis (a turn was already committed): start afresh."""


RUNNER_ERRORS = (LeaseLost, Diverged, ShardReset)
"""Errors that end a turn's runner rather than fail the turn: they are not the handler's."""


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


def delivery(act: Activation, env: Envelope) -> str:
    """What ``count_delivery`` counts starts of: the message, and for an open turn its
    write number, so that a crash-prone workflow that still makes progress is not poison."""
    return env.id if act.open is None else f"{env.id}@{act.open.write}"


def cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def write_number(raw: bytes) -> int:
    """The write number of an open turn whose body cannot be read (so it can be cancelled)."""
    try:
        return int(raw.partition(b":")[0])
    except ValueError:
        return 0


def queue_of(env: Envelope) -> str | None:
    item = queued_item(env.headers, env.id)
    return None if item is None else item[0]


def handler_for(cls: type[Actor], queued: Queued) -> Handler | None:
    """The method a message goes to: by type, or a tick by its schedule."""
    if isinstance(queued.message, Tick):
        return cls.schedules[queued.message.schedule][1]
    return cls.handlers.get(queued.envelope.type)


def consumed(ctx: TurnContext) -> dict[str, Any]:
    """The write fields that take the messages ``wait_for`` received out of the mailbox."""
    return taken_out(ctx, ctx.consumed)


def taken_out(ctx: TurnContext, items: Sequence[Queued]) -> dict[str, Any]:
    """The write fields that take ``items`` (of ``ctx.consumed``) out of the mailbox: inbox
    entries acked, deferred ones out of the list and their type's index; those a wait
    refused (``ctx.refused``: arrived after its deadline) dead-lettered in the same write."""
    if not items and not ctx.refused:
        return {}  # the common case: a turn that received nothing
    refused = {id(q): (reason, detail) for q, reason, detail in ctx.refused}
    return {
        "acks": [q.entry_id for q in items if q.entry_id is not None],
        "unlists": [Deferred(q.envelope.type, q.arrived, q.raw) for q in items if q.entry_id is None],
        "dead": [(q.raw, q.entry_id or "", *refused[id(q)]) for q in items if id(q) in refused],
    }


def reply_fields(keys: Keys, shard: int, env: Envelope, reply: bytes) -> dict[str, Any]:
    """The write fields that store ``reply`` under the ask's reply key and publish it to the
    asker's channel; none for a message nobody asked. An ask sent under an idempotency key
    names the key's marker: its reply is kept as long as the marker (which sends a retried
    ask to this reply), not just ``reply_ttl``."""
    if not env.reply_to:
        return {}
    idempotency_key = reply_marker_key(env)
    marker = None if idempotency_key is None else keys.idempotency(shard, env.actor_id, idempotency_key)
    return {"reply_key": keys.reply(shard, env.id), "reply_channel": env.reply_to, "reply": reply,
            "reply_marker": marker}  # fmt: skip


def deferral(queued: Queued) -> Deferred:
    """How a write defers an inbox message behind its actor's open turn."""
    return Deferred(queued.envelope.type, queued.entry_id or "", queued.raw)


def copy_records(records: list[Record]) -> list[Record]:
    """Records for a new attempt: a failed one may have changed its own (a wait it received)."""
    return [Record(r.kind, r.name, copy.deepcopy(r.value)) for r in records]


def load_state(cls: type[Actor], snapshot: bytes | None) -> Any:
    """An actor's state from its committed snapshot (a fresh State if it has none)."""
    return cls.State() if snapshot is None else cls.State.model_validate(decode_state(snapshot))


def kept(raw: bytes | Malformed) -> bytes:
    """What the dead letter of an inbox entry keeps: its envelope, or the first of several."""
    return raw.first if isinstance(raw, Malformed) else raw


def spread(seconds: float) -> float:
    """``seconds`` less up to a quarter, at random: the period of a runner's routine looks
    (chores, timer and outbox polls). Runners that started together would otherwise stay in
    step, and a thousand shards' looks would come in one burst every period, holding up every
    message behind them."""
    return seconds * (1 - random.random() / 4)

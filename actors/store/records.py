"""The small typed records the store speaks: writes of the commit script, what reads return."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack  # type: ignore[import-untyped]  # msgpack ships no type information

from ..codec import FIELD, Malformed, entry_envelope

CONFLICT = 2
"""``enqueue_once.lua``'s status for a key accepted for a message with another digest."""

Entry = tuple[str, bytes | Malformed]
"""An inbox entry: its stream id and its envelope bytes (Malformed unless it has exactly one
``e`` field). Every read path builds it from the fields as the server sent them
(``stream_entries``), so none can take another of two ``e`` fields than the others."""

StreamRows = list[tuple[bytes, dict[bytes, bytes]]]
"""What XRANGE returns to our clients. redis-py types replies as ``bytes | str`` (and stream
entries as possibly None) for every client; ours never decode responses (see ``make_client``),
so the casts below state what the replies are."""


@dataclass(frozen=True, slots=True)
class Take:
    """Inbox entries a runner saw with ``read_after``: the ``count`` after the group's last
    delivered one, up to ``newest``, to take into the group as ``consumer``'s."""

    consumer: str
    newest: str
    count: int


@dataclass(frozen=True, slots=True)
class KeyedAppend:
    """A message of a batch sent under an idempotency key (see ``InboxStore.append_many``)."""

    shard: int
    actor_id: str
    key: str
    message_id: str
    envelope: bytes
    ttl_ms: int
    digest: str


@dataclass(frozen=True, slots=True)
class Deferred:
    """A message in an actor's deferred list, as ``commit.lua`` files it: in the list (arrival
    order) and in its type's index (``Keys.deferred_of_type``), with the inbox entry id it
    arrived with."""

    message_type: str
    arrived: str
    """Its inbox entry id: for a deferral, the entry to ack; '' if unknown (not indexed)."""
    envelope: bytes


@dataclass(frozen=True, slots=True)
class Write:
    """One write of the commit script: a turn's outcome or progress (see scripts/commit.lua).

    ``op``: ``c`` commit, ``j`` journal an open turn, ``d`` dead-letter, ``f`` defer,
    ``s`` settle. ``origin`` says where the message lives: ``i`` inbox entry ``ref``,
    ``o`` the actor's open turn, ``q`` head of its deferred list (``ref`` is the
    envelope), ``n`` nowhere (defer and settle).
    """

    op: str
    actor_id: str
    origin: str = "n"
    ref: str | bytes = ""
    snapshot: bytes | None = None
    local: Sequence[bytes] = ()
    remote: Sequence[tuple[int, bytes]] = ()
    reply_key: str | None = None
    reply_channel: str | None = None
    reply: bytes = b""
    reply_marker: str | None = None
    """The idempotency marker the ask was sent under: the reply is kept ``reply_ttl`` past it."""
    open_turn: bytes = b""
    """A ``j`` write's open-turn header (``OpenTurn.header``)."""
    journal_keep: int = 0
    """How many items of the turn's journal list stay (0: the list starts anew)."""
    journal_items: Sequence[bytes] = ()
    """Appended to the turn's journal list after those kept."""
    score: int = 0
    envelope: bytes = b""
    """The message a dead-letter write keeps."""
    reason: str = ""
    detail: str = ""
    acks: Sequence[str] = ()
    """Inbox entries the turn consumed (``wait_for`` matches), acked with it."""
    unlists: Sequence[Deferred] = ()
    """Deferred messages the turn consumed, removed from the actor's list and its type's index."""
    defers: Sequence[Deferred] = ()
    """Inbox messages (``arrived``: the entry id) moved behind the actor's open turn."""
    dead: Sequence[tuple[bytes, str, str, str]] = ()
    """Other messages this write dead-letters, (envelope, inbox entry id or '', reason,
    detail): ones a wait saw arrive after its deadline; ``acks``/``unlists`` take them out."""
    item: tuple[str, str, str] | None = None
    """(limiter, item id, dedup id) of the queued item whose turn this write ends."""
    forget_delivery: bool = False
    """The actor's recovered turn was counted (``count_delivery``): this write ends it."""
    retained: bool = False
    """The actor's type has ``retention``: this write (a ``c`` or ``d``, which ends a piece of
    its work) marks it idle from now in its type's idle set (effect ``I``)."""

    @property
    def uses_deferred(self) -> bool:
        return self.origin in ("o", "q") or self.op in ("f", "s") or bool(self.unlists or self.defers)


def write_bytes(w: Write) -> int:
    """About how many bytes ``w`` adds to the commit script's packed argument: its snapshot,
    open turn, envelopes, reply and texts (not msgpack's few bytes of framing per value)."""
    size = len(w.actor_id) + len(w.ref) + len(w.snapshot or b"") + len(w.open_turn) + len(w.reply)
    size += len(w.envelope) + len(w.reason) + len(w.detail)
    # The rest is empty for most writes: skip the sums (this runs for every write).
    if w.local or w.remote or w.acks:
        size += sum(map(len, w.local)) + sum(len(e) for _, e in w.remote) + sum(map(len, w.acks))
    if w.unlists or w.defers:
        size += sum(len(d.envelope) + len(d.arrived) for d in (*w.unlists, *w.defers))
    if w.dead:
        size += sum(len(env) + len(entry) + len(why) + len(text) for env, entry, why, text in w.dead)
    if w.journal_items:
        size += sum(map(len, w.journal_items))
    return size


RELEASED, QUEUED = "released:", "queued:"
"""Prefixes of the limiter events: a slot was given back, or an item was queued."""

DUPLICATE, DONE, BACKLOG = 0, 1, 2
"""Results of a write: taken before (nothing done); done; done and deferred messages remain."""


@dataclass(frozen=True, slots=True)
class LoadedActor:
    snapshot: bytes | None
    timer: int | None
    """Its score in the timers index (0: needs attention now), None if it has none."""
    open_turn: bytes | None
    journal: list[bytes] | None = None
    """Its open turn's journal list (message, records), if it has an open turn."""


@dataclass(frozen=True, slots=True)
class StoredTurn:
    """An open turn as Redis holds it: its header in ``turns`` and its journal list."""

    actor_id: str
    header: bytes
    journal: list[bytes]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: str
    entry_id: str
    envelope: bytes
    reason: str
    detail: str
    at_ms: int


class Dispatch(NamedTuple):
    """A queued item a dispatcher took (``queue_dispatch.lua``), to append to its actor's inbox."""

    item_id: str
    shard: int
    envelope: bytes
    deadline_ms: int
    """When the dispatch lapses (ms, Redis clock): past it the item may be dispatched again, so
    it must not be appended after it (see ``queues.append_item``)."""


@dataclass(frozen=True, slots=True)
class OutItem:
    """A dispatched queued item with a dedup id (its ``out`` record): where it went."""

    item_id: str
    shard: int
    actor_id: str
    dedup_id: str
    entry_id: str
    """Its inbox entry; '' if unknown (then only its open turn and deferred list are looked at)."""
    envelope: bytes


def out_item(item_id: str, record: bytes) -> OutItem:
    shard, actor_id, dedup_id, entry_id, envelope = msgpack.unpackb(record, raw=True)
    return OutItem(item_id, int(shard), actor_id.decode(), dedup_id.decode(), entry_id.decode(), envelope)


@dataclass(frozen=True, slots=True)
class ShardInfo:
    shard: int
    owner: str | None
    epoch: int
    length: int
    lag: int | None
    pending: int
    dead_letters: int
    read: int = 0
    """Entries ever delivered to the workers' group (handled = read - pending)."""
    open_turns: int = 0


@dataclass(frozen=True, slots=True)
class ShardWork:
    """What a shard has left to do (``WorkStore.shard_work``)."""

    shard: int
    unread: int
    """Inbox entries the workers' group has not delivered yet."""
    pending: int
    """Inbox entries delivered and not acked: their turns run, or wait for a new owner."""
    outbox: int
    """Committed sends to other shards, not forwarded yet."""
    deferred: int
    """Messages in the deferred lists of its actors (-1: not counted)."""
    due: int
    """Actors whose timer is due: a turn running or to recover, a sleep or a wait that ended,
    deferred messages to run."""
    suspended: int
    """Actors whose timer is later: turns sleeping, waiting or parked (not work to do now)."""
    added: int
    """Entries ever added to its inbox and outbox: equal in two looks, nothing moved between."""
    at_ms: int
    """When it was read (Redis's clock)."""

    @property
    def idle(self) -> bool:
        return not (self.unread or self.pending or self.outbox or self.due) and self.deferred <= 0


def stream_entries(rows: Any) -> list[Entry]:
    """Entries given as the server sends them, [[id, [field, value, ...]], ...], by one rule
    (``codec.entry_envelope``) whichever read returned them. A nil row (an entry deleted
    while pending, as some servers report it) has nothing to handle."""
    return [(row[0].decode(), entry_envelope(row[1] or [])) for row in rows if row is not None]


def dead_letter_record(entry_id: bytes, fields: dict[bytes, bytes]) -> DeadLetter:
    return DeadLetter(
        id=entry_id.decode(),
        entry_id=fields.get(b"entry", b"").decode(),
        envelope=fields.get(FIELD, b""),
        reason=fields.get(b"reason", b"").decode(errors="replace"),
        detail=fields.get(b"detail", b"").decode(errors="replace"),
        at_ms=int(fields.get(b"at", b"0")),
    )

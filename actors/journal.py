"""A turn's journal: what its durable primitives did, by position, so a re-run replays them.

A turn's first journal write *opens* it: its message moves from the inbox to
the shard's ``turns`` hash, together with the journal, and stays there until
the turn commits. After a crash, or when a suspended turn (``sleep``,
``wait_for``) is woken, the handler runs again from the top; each primitive
takes the next position and, if the journal has a record there, returns what
was recorded instead of doing its work again. A record of another kind or name
at that position means the code changed under a running turn: the turn is
parked (``JournalMismatch``) rather than mis-replayed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import msgpack  # type: ignore[import-untyped]  # msgpack ships no type information

from .errors import ActorsError, DecodeError

FOREVER_MS = 2**52
"""The timer score of a turn that waits with no timeout, or is parked: never due."""

OPEN_TURN_VERSION = 3
"""3 keeps the message and the records in the turn's journal list, appended to; 2 (everything
in one blob, with ``pending``) and 1 (no pending sends) are still read."""

INLINE_JOURNAL_BYTES = 1024
"""A turn's message and records stay in its header while together at most this: most
suspended turns (a sleep, a wait for approval) then cost no key of their own. Past it
they move to the turn's journal list, appended to from then on."""

Send = tuple[str, int, bytes]
"""A send of a turn not delivered yet: (target actor id, target shard, envelope)."""


class JournalMismatch(ActorsError):
    """A primitive does not match what the journal recorded at its position: the
    handler's code changed while a turn was open. The turn is parked; ``actors
    inspect REF`` shows it and ``actors cancel REF`` ends it."""


class StepFailed(ActorsError):
    """A ``step`` failed on its last attempt. Journaled: a re-run of the turn raises it
    again without calling the function."""

    def __init__(self, name: str, error_type: str, message: str) -> None:
        super().__init__(f"step {name!r} failed: {error_type}: {message}")
        self.name = name
        self.error_type = error_type
        self.message = message


class Suspend(BaseException):
    """Unwinds a handler that must wait (a sleep, or a wait with nothing to receive yet).

    A BaseException so that a handler's ``except Exception`` does not swallow it.
    """

    def __init__(self, due_ms: int, waiting: str | None) -> None:
        super().__init__(due_ms, waiting)
        self.due_ms = due_ms
        self.waiting = waiting


@dataclass(slots=True)
class Record:
    kind: str
    """``step``, ``send``, ``sleep``, ``wait`` or ``ask``."""
    name: str
    value: Any


class Journal:
    """The records of one attempt of a turn, and how far the handler has got through them.

    Records are never changed in place: ``update`` replaces one, and notes the lowest
    position replaced since the last journal write took the records (``changed``), so that
    the write sends the records from there on and no others."""

    __slots__ = ("changed", "mismatch", "position", "records")

    def __init__(self, records: list[Record]) -> None:
        self.records = records
        self.position = 0
        self.changed = len(records)
        self.mismatch: JournalMismatch | None = None
        """Kept even if the handler catches the error, so the turn is parked all the same."""

    def replay(self, kind: str, name: str) -> Record | None:
        """Take the next position: its record if the journal has one, else None (run live)."""
        position = self.position
        self.position += 1
        if position >= len(self.records):
            return None
        record = self.records[position]
        if record.kind != kind or record.name != name:
            self.mismatch = JournalMismatch(
                f"journal position {position} holds {record.kind} {record.name!r}, but the handler "
                f"now calls {kind} {name!r} there: its code changed while this turn was open"
            )
            raise self.mismatch
        return record

    def record(self, kind: str, name: str, value: Any) -> Record:
        """Record the primitive at the position just taken by ``replay``."""
        record = Record(kind, name, value)
        self.records.append(record)
        return record

    def update(self, record: Record, value: Any) -> Record:
        """Replace ``record`` (a recent one: searched from the end) by one holding ``value``."""
        for position in range(len(self.records) - 1, -1, -1):
            if self.records[position] is record:
                self.records[position] = updated = Record(record.kind, record.name, value)
                self.changed = min(self.changed, position)
                return updated
        raise ValueError("the record is not in this journal")

    def taken(self) -> tuple[int, int]:
        """(lowest position changed, number of records) for a write that takes the records
        now; later changes are counted from here."""
        changed, count = min(self.changed, len(self.records)), len(self.records)
        self.changed = count
        return changed, count


@dataclass(slots=True)
class OpenTurn:
    """A turn whose message left the inbox: what ``turns`` (its header) and its journal list
    (its message, then its records) hold for its actor."""

    envelope: bytes
    records: list[Record]
    waiting: str | None = None
    """The message type a suspended ``wait_for`` waits for; None when sleeping or running."""
    due_ms: int = 0
    """0 while running; when suspended, when its timer fires (``FOREVER_MS``: never)."""
    parked: str = ""
    """Why the turn is parked (a journal mismatch); empty if it is not."""
    since_ms: int = 0
    """When it was suspended (Redis clock), for ``actors waits``."""
    write: int = 1
    """How many journal writes made it: each write names the one it follows, so a write
    that is retried after it was applied (a lost reply) is recognised and applies nothing."""
    pending: list[Send] = field(default_factory=list)
    """Sends the turn made and has not delivered yet: they go out when it commits or
    suspends (or, those to an actor it then asks or queues for, with that ask or enqueue),
    never with a mere progress write, so a turn that fails for good sends nothing more."""
    stored: int | None = None
    """How many of ``records`` its journal list in Redis holds; None: it has no list (the
    turn is not written yet, its journal is small enough to live in its header, or it was
    written whole by a version before 3)."""

    @property
    def suspended(self) -> bool:
        return self.due_ms > 0

    def header(self, inline: list[bytes] | None = None) -> bytes:
        """``<write>:`` then msgpack: the commit script reads the write number without msgpack.
        Rewritten by every journal write; it holds the message and the records (``inline``:
        the journal list's items) only while they are small (``INLINE_JOURNAL_BYTES``)."""
        pending = [list(send) for send in self.pending]
        fields = [OPEN_TURN_VERSION, self.waiting, self.due_ms, self.parked, self.since_ms, pending, inline]
        packed: bytes = msgpack.packb(fields, use_bin_type=True)
        return f"{self.write}:".encode() + packed

    @classmethod
    def decode(cls, data: bytes, journal: list[bytes] | None = None) -> OpenTurn:
        """From its header (or, before version 3, its whole blob) and its journal list."""
        try:
            write, _, packed = data.partition(b":")
            version, *fields = msgpack.unpackb(packed, raw=False)
            number = int(write)
            if version == OPEN_TURN_VERSION:
                return cls._from_items(number, fields, journal)
            envelope, records, waiting, due_ms, parked, since_ms, *rest = fields
            pending = _sends(rest[0] if rest else [])
        except DecodeError:
            raise
        except Exception as exc:
            raise DecodeError(f"open turn is not valid: {exc}") from exc
        if version not in (1, 2) or len(rest) != (version == 2):
            raise DecodeError(f"open turn has version {version}, this runtime reads 1 to {OPEN_TURN_VERSION}")
        records_ = [Record(*r) for r in records]
        return cls(envelope, records_, waiting, due_ms, parked, since_ms, number, pending)

    @classmethod
    def _from_items(cls, number: int, fields: list[Any], journal: list[bytes] | None) -> OpenTurn:
        waiting, due_ms, parked, since_ms, pending, inline = fields
        items = inline if inline is not None else journal
        if not items:
            raise DecodeError("open turn has no journal list (its message and records)")
        records = [Record(*msgpack.unpackb(item, raw=False)) for item in items[1:]]
        stored = None if inline is not None else len(records)
        return cls(bytes(items[0]), records, waiting, due_ms, parked, since_ms, number,
                   _sends(pending), stored)  # fmt: skip


def encode_record(record: Record) -> bytes:
    """One item of a turn's journal list."""
    packed: bytes = msgpack.packb([record.kind, record.name, record.value], use_bin_type=True)
    return packed


def _sends(items: list[Any]) -> list[Send]:
    return [(str(a), int(s), bytes(e)) for a, s, e in items]


class RedisClock:
    """Redis's clock (ms) as seen from here, with bounds that account for the round trip.

    Deadlines are set from the upper bound and checked against the lower one,
    so a worker whose own clock is wrong can neither shorten a sleep nor end it early.
    """

    __slots__ = ("_received", "_redis_ms", "_sent")

    def __init__(self) -> None:
        self._redis_ms = 0
        self._sent = self._received = time.monotonic()

    def observe(self, redis_ms: int, sent: float, received: float) -> None:
        """Redis said ``redis_ms`` at some moment between ``sent`` and ``received`` (monotonic)."""
        self._redis_ms, self._sent, self._received = redis_ms, sent, received

    def upper(self) -> int:
        """Redis's time now is at most this."""
        return self._redis_ms + int((time.monotonic() - self._sent) * 1000) + 1

    def lower(self) -> int:
        """Redis's time now is at least this."""
        return self._redis_ms + int((time.monotonic() - self._received) * 1000)

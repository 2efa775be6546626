"""Durable schedules: an actor method that runs every interval or on a cron expression.

    class Monitor(Actor):
        @schedule(every=timedelta(hours=1), keys=["main"])
        async def check(self, tick: Tick) -> None: ...

Each slot fires exactly once across all workers: the owner of the actor's shard
appends a ``Tick`` to the inbox with a fenced script that also records the slot
as fired, and refuses a slot not yet due by Redis's clock. After downtime,
``catch_up`` says what happens to the slots that were missed: ``latest`` (the
default) fires the most recent one, ``all`` fires each in order (at most
``max_catch_up``), ``none`` skips them. The first slot of a new schedule is
the first one after a worker first saw it.

Cron slots are wall-clock times in ``timezone``, and daylight saving time makes
some of them happen twice or not at all. Much as Vixie cron does, an expression
that names its hours (``30 2 * * *``) is a time of day and runs once per matching
day: a repeated time (02:30 on fall-back night) runs at its first occurrence
only, and a skipped time (02:30 on spring-forward night) runs when the gap ends
(03:00 in Europe), once however many of its times the gap held. An expression
whose hour field is ``*`` (``15 * * * *``, ``*/20 * * * *``) follows elapsed
time instead: it runs at each instant whose local time matches, so both 02:15s
of fall-back night run and spring-forward night's nonexistent 02:15 does not.

For recurring work per actor instance (keys not known in advance), loop in a
handler with ``await self.sleep(...)`` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any, Literal
from zoneinfo import ZoneInfo

from croniter import croniter  # type: ignore[import-untyped]  # no stubs here (types-croniter has them)

from .errors import DefinitionError

CatchUp = Literal["latest", "all", "none"]
SCHEDULE_ATTR = "__actors_schedule__"
GRACE_MS = 10_000
"""A slot seen later than this after it was due counts as missed (for ``catch_up``)."""


@dataclass(frozen=True, slots=True)
class Schedule:
    """When a scheduled method runs, and for which actor keys.

    ``every`` slots are multiples of the interval since the Unix epoch. ``cron`` slots
    are wall-clock times in ``timezone``; across a daylight-saving change, one that names
    its hours runs once a day (a repeated time at its first occurrence, a skipped time at
    the gap's end) and one whose hour field is ``*`` runs by elapsed time (see the module
    docstring)."""

    name: str
    keys: tuple[str, ...]
    every: timedelta | None = None
    cron: str | None = None
    timezone: str = "UTC"
    catch_up: CatchUp = "latest"
    max_catch_up: int = 100

    def next_after(self, ms: int) -> int:
        """The first slot strictly after ``ms`` (epoch milliseconds)."""
        if self.every is not None:
            period = int(self.every.total_seconds() * 1000)
            return (ms // period + 1) * period
        assert self.cron is not None
        zone = ZoneInfo(self.timezone)
        if _every_hour(self.cron):
            return _next_elapsed(self.cron, zone, ms)
        return _next_time_of_day(self.cron, zone, ms)

    def due(self, last_ms: int, now_ms: int) -> tuple[list[int], int]:
        """Slots after ``last_ms`` up to ``now_ms`` to fire, by the catch-up policy (oldest
        first), and the newest slot due, which is recorded as done whether it fires or not.

        A slot more than ``GRACE_MS`` old when first seen was missed (the shard had no
        owner): ``latest`` fires only the newest slot due, ``all`` fires every one (at most
        ``max_catch_up``), ``none`` fires only the slots that are not missed.
        """
        slots: list[int] = []
        start = last_ms
        if self.every is not None:  # no need to walk slots that would be dropped anyway
            start = max(last_ms, now_ms - (self.max_catch_up + 1) * int(self.every.total_seconds() * 1000))
        slot = self.next_after(start)
        while slot <= now_ms:
            slots.append(slot)
            if len(slots) > self.max_catch_up:
                slots.pop(0)
            slot = self.next_after(slot)
        if not slots:
            return [], last_ms
        newest = slots[-1]
        if self.catch_up == "latest":
            return [newest], newest
        if self.catch_up == "none":
            return [s for s in slots if now_ms - s <= GRACE_MS], newest
        return slots, newest


def schedule(
    *,
    keys: Sequence[str],
    every: timedelta | float | None = None,
    cron: str | None = None,
    timezone: str = "UTC",
    catch_up: CatchUp = "latest",
    max_catch_up: int = 100,
    name: str | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Run the decorated method (``async def m(self, tick: Tick)``) of the actors ``keys``
    every ``every`` (a timedelta or seconds; slots aligned on the Unix epoch) or on the
    ``cron`` expression (in ``timezone``)."""
    if (every is None) == (cron is None):
        raise DefinitionError("a schedule needs exactly one of every= or cron=")
    if every is not None:
        every = every if isinstance(every, timedelta) else timedelta(seconds=every)
        if every.total_seconds() < 0.01:
            raise DefinitionError(f"a schedule's interval must be at least 10 ms, not {every}")
    if cron is not None and not croniter.is_valid(cron):
        raise DefinitionError(f"{cron!r} is not a valid cron expression")
    if isinstance(keys, str) or not keys or not all(isinstance(k, str) and k for k in keys):
        raise DefinitionError("a schedule's keys must be a non-empty list of actor keys")
    if catch_up not in ("latest", "all", "none"):
        raise DefinitionError(f"catch_up must be 'latest', 'all' or 'none', not {catch_up!r}")
    try:
        ZoneInfo(timezone)
    except Exception as exc:
        raise DefinitionError(f"unknown timezone {timezone!r}") from exc

    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        spec = Schedule(name or fn.__name__, tuple(keys), every, cron, timezone, catch_up, max_catch_up)
        setattr(fn, SCHEDULE_ATTR, spec)
        return fn

    return mark


_EPOCH = datetime(1970, 1, 1)
_PROBE_MS = 6 * 3_600_000
"""Offset changes are looked for this far apart (assumed: no zone changes its offset twice
within 6 hours)."""


@cache
def _every_hour(cron: str) -> bool:
    """Whether the expression matches every hour (its hour field is ``*``, however spelled)."""
    return bool(croniter(cron).expanded[1] == ["*"])


def _next_time_of_day(cron: str, zone: ZoneInfo, ms: int) -> int:
    """The first instant after ``ms`` of the expression's next wall-clock time, each time once."""
    wall = datetime.fromtimestamp(ms / 1000, zone).replace(tzinfo=None)
    times = croniter(cron, wall)
    while True:  # skips the times already run (those of a repeated hour, seen from its second pass)
        slot = _first_instant(times.get_next(datetime), zone)
        if slot > ms:
            return slot


def _first_instant(wall: datetime, zone: ZoneInfo) -> int:
    """When the wall-clock time ``wall`` first happens in ``zone``; the end of the gap for a
    time the clocks skip."""
    first = wall.replace(tzinfo=zone, fold=0)  # fold=0: the earlier of a repeated time
    if first.astimezone(UTC).astimezone(zone).replace(tzinfo=None) == wall:
        return _ms(first)
    # Skipped: fold=0 reads it with the offset before the gap (an instant after the gap's
    # end), fold=1 with the one after (an instant before it); the change lies between.
    before = _ms(wall.replace(tzinfo=zone, fold=1))
    end = _offset_change(before, _ms(first), _offset(before, zone), zone)
    assert end is not None, f"{wall} is skipped in {zone}, so its offset changes"
    return end


def _next_elapsed(cron: str, zone: ZoneInfo, ms: int) -> int:
    """The first instant after ``ms`` whose wall-clock time in ``zone`` matches ``cron``.

    Between offset changes the wall clock runs with UTC, so the next match is the next
    matching wall time shifted by the offset; if the offset changes before that, look again
    from the change with the new offset."""
    start = ms + 1  # the first instant that may be the slot
    offset = _offset(start, zone)
    while True:
        wall = _EPOCH + timedelta(milliseconds=start - 1) + offset  # croniter: strictly after
        slot = _ms(croniter(cron, wall).get_next(datetime) - offset)
        change = _offset_change(start, slot, offset, zone)
        if change is None:
            return slot
        start, offset = change, _offset(change, zone)


def _offset_change(after: int, until: int, offset: timedelta, zone: ZoneInfo) -> int | None:
    """The first instant in (``after``, ``until``] at which ``zone``'s UTC offset is not
    ``offset`` (which it is at ``after``), or None."""
    probe = after
    while probe < until:
        lo, probe = probe, min(probe + _PROBE_MS, until)
        if _offset(probe, zone) != offset:
            while probe - lo > 1:  # lo still has the offset, probe does not
                mid = (lo + probe) // 2
                lo, probe = (mid, probe) if _offset(mid, zone) == offset else (lo, mid)
            return probe
    return None


def _offset(ms: int, zone: ZoneInfo) -> timedelta:
    offset = datetime.fromtimestamp(ms / 1000, zone).utcoffset()
    assert offset is not None
    return offset


def _ms(when: datetime) -> int:
    """Epoch milliseconds of an aware datetime, or of a naive one read as UTC."""
    if when.tzinfo is None:
        return (when - _EPOCH) // timedelta(milliseconds=1)
    return int(when.timestamp() * 1000)


def slot_datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)

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

For recurring work per actor instance (keys not known in advance), loop in a
handler with ``await self.sleep(...)`` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
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
    """When a scheduled method runs, and for which actor keys."""

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
        start = datetime.fromtimestamp(ms / 1000, ZoneInfo(self.timezone))
        nxt = croniter(self.cron, start).get_next(datetime)
        return int(nxt.timestamp() * 1000)

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


def slot_datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)

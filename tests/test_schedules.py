"""Durable schedules: every slot runs exactly once across workers, and missed slots
are caught up by the configured policy."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from pydantic import BaseModel

import actors
from actors import Actor, App, Tick, schedule
from actors.errors import DefinitionError
from actors.routing import shard_of
from actors.schedules import GRACE_MS, Schedule

from .conftest import eventually

PERIOD_MS = 200
DAY_MS = 86_400_000
HANDOVER_KEYS = ["a", "b", "d", "e"]
"""One in each of the 4 shards of ``fast_settings``: whichever shards move, keys move with them."""


class Slots(BaseModel):
    slots: list[int] = []
    late_ms: list[int] = []
    epochs: list[int] = []
    """The lease epoch each tick was handled under: a new one after each handover."""


class Report(BaseModel):
    pass


def _record(actor: Actor, state: Slots, tick: Tick) -> None:
    slot = int(tick.slot.timestamp() * 1000)
    state.slots.append(slot)
    state.late_ms.append(int(datetime.now(UTC).timestamp() * 1000) - slot)
    state.epochs.append(actor.turn.epoch)


class EveryAll(Actor):
    State = Slots

    @schedule(every=timedelta(milliseconds=PERIOD_MS), keys=HANDOVER_KEYS, catch_up="all")
    async def beat(self, tick: Tick) -> None:
        _record(self, self.state, tick)


class DailyAll(Actor):
    State = Slots

    @schedule(every=timedelta(days=1), keys=["k"], catch_up="all")
    async def beat(self, tick: Tick) -> None:
        _record(self, self.state, tick)

    async def on_report(self, msg: Report) -> Slots:
        return self.state


class DailyLatest(DailyAll):
    @schedule(every=timedelta(days=1), keys=["k"], catch_up="latest")
    async def beat(self, tick: Tick) -> None:
        _record(self, self.state, tick)


class DailyNone(DailyAll):
    @schedule(every=timedelta(days=1), keys=["k"], catch_up="none")
    async def beat(self, tick: Tick) -> None:
        _record(self, self.state, tick)


def test_interval_slots_align_on_the_epoch_and_catch_up_by_policy() -> None:
    every = Schedule("s", ("k",), every=timedelta(seconds=10))
    assert every.next_after(0) == 10_000 and every.next_after(10_000) == 20_000
    assert every.next_after(12_345) == 20_000
    assert every.due(10_000, 15_000) == ([], 10_000)
    assert every.due(10_000, 45_000) == ([40_000], 40_000), "latest: only the newest missed slot"
    keep_all = Schedule("s", ("k",), every=timedelta(seconds=10), catch_up="all", max_catch_up=2)
    assert keep_all.due(10_000, 45_000) == ([30_000, 40_000], 40_000), "all, at most max_catch_up"
    skip = Schedule("s", ("k",), every=timedelta(seconds=10), catch_up="none")
    assert skip.due(10_000, 45_000) == ([40_000], 40_000), "20 s and 30 s were missed; 40 s is on time"
    assert skip.due(10_000, 100_000) == ([90_000, 100_000], 100_000)
    assert skip.due(10_000, 100_000 + 9_999) == ([100_000], 100_000)


def test_cron_slots_follow_the_expression_in_its_timezone() -> None:
    cron = Schedule("s", ("k",), cron="30 9 * * 1-5", timezone="Europe/Paris")
    friday_noon = int(datetime(2026, 11, 20, 12, 0, tzinfo=UTC).timestamp() * 1000)
    monday = datetime.fromtimestamp(cron.next_after(friday_noon) / 1000, UTC)
    assert monday == datetime(2026, 11, 23, 8, 30, tzinfo=UTC), "09:30 in Paris is 08:30 UTC in November"


def _utc_ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> int:
    return int(datetime(year, month, day, hour, minute, tzinfo=UTC).timestamp() * 1000)


# Berlin, 2026: on 29 March clocks jump from 02:00 CET to 03:00 CEST (01:00 UTC), so 02:xx does
# not exist; on 25 October they go back from 03:00 CEST to 02:00 CET (01:00 UTC), so 02:xx
# happens twice, first at 00:xx UTC, then at 01:xx UTC.


def test_a_time_of_day_cron_slot_runs_once_on_fall_back_night() -> None:
    daily = Schedule("s", ("k",), cron="30 2 * * *", timezone="Europe/Berlin", catch_up="all")
    assert daily.next_after(_utc_ms(2026, 10, 24, 12)) == _utc_ms(2026, 10, 25, 0, 30), "02:30 CEST"
    assert daily.next_after(_utc_ms(2026, 10, 25, 0, 30)) == _utc_ms(2026, 10, 26, 1, 30), "not 02:30 CET"
    inside_the_repeat = _utc_ms(2026, 10, 25, 1, 10)  # 02:10 CET, after the slot ran at 02:30 CEST
    assert daily.next_after(inside_the_repeat) == _utc_ms(2026, 10, 26, 1, 30)
    assert daily.due(_utc_ms(2026, 10, 24, 12), _utc_ms(2026, 10, 26, 12)) == (
        [_utc_ms(2026, 10, 25, 0, 30), _utc_ms(2026, 10, 26, 1, 30)],
        _utc_ms(2026, 10, 26, 1, 30),
    ), "one slot a night"


def test_a_time_of_day_cron_slot_in_the_spring_gap_runs_when_the_gap_ends() -> None:
    daily = Schedule("s", ("k",), cron="30 2 * * *", timezone="Europe/Berlin", catch_up="all")
    gap_end = _utc_ms(2026, 3, 29, 1)  # 03:00 CEST
    assert daily.next_after(_utc_ms(2026, 3, 28, 12)) == gap_end, "02:30 does not exist: 03:00 CEST"
    assert daily.next_after(gap_end) == _utc_ms(2026, 3, 30, 0, 30), "then 02:30 CEST as usual"
    thrice = Schedule("s", ("k",), cron="0,20,40 2 * * *", timezone="Europe/Berlin", catch_up="all")
    assert thrice.due(_utc_ms(2026, 3, 28, 12), _utc_ms(2026, 3, 29, 12)) == ([gap_end], gap_end), (
        "02:00, 02:20 and 02:40 all fall in the gap: one slot, at its end"
    )


def test_an_every_hour_cron_follows_elapsed_time_across_dst() -> None:
    hourly = Schedule("s", ("k",), cron="15 * * * *", timezone="Europe/Berlin", catch_up="all")
    fall = hourly.due(_utc_ms(2026, 10, 24, 23), _utc_ms(2026, 10, 25, 3))[0]
    assert fall == [_utc_ms(2026, 10, 24, 23, 15)] + [_utc_ms(2026, 10, 25, h, 15) for h in range(3)], (
        "02:15 CEST and 02:15 CET both run: one slot an hour"
    )
    spring = hourly.due(_utc_ms(2026, 3, 28, 23), _utc_ms(2026, 3, 29, 3))[0]
    assert spring == [_utc_ms(2026, 3, 28, 23, 15)] + [_utc_ms(2026, 3, 29, h, 15) for h in range(3)], (
        "01:15 CET, then 03:15 CEST: nothing for the hour that does not exist"
    )


def test_bad_schedules_are_refused_at_definition() -> None:
    with pytest.raises(DefinitionError, match="exactly one of every= or cron="):
        schedule(keys=["k"])
    with pytest.raises(DefinitionError, match="not a valid cron expression"):
        schedule(cron="every tuesday", keys=["k"])
    with pytest.raises(DefinitionError, match="keys"):
        schedule(every=1, keys="k")
    with pytest.raises(DefinitionError, match="unknown timezone"):
        schedule(cron="* * * * *", keys=["k"], timezone="Mars/Olympus")
    with pytest.raises(DefinitionError, match="must be `async def beat"):

        class Wrong(Actor):
            @schedule(every=1, keys=["k"])
            async def beat(self, tick: int) -> None: ...


async def test_each_slot_runs_once_across_workers_and_handovers(connect, start_worker, fast_settings) -> None:
    app = App(EveryAll)
    refs = [EveryAll.ref(key) for key in HANDOVER_KEYS]
    shards = fast_settings.shards
    assert sorted(shard_of(ref.id, shards) for ref in refs) == list(range(shards))
    async with connect(app=app, shards=shards) as client:
        first = await start_worker(app)
        await eventually(lambda: _ran_past(client, refs, 0))
        # 1. No owner for two slots: the second worker fires them from the marks the first left.
        first.stop()
        await eventually(lambda: not first.shards)
        unowned = max(await _marks(client, refs)) + 2 * PERIOD_MS
        await eventually(lambda: _redis_ms_past(client, unowned))
        second = await start_worker(app)
        await eventually(lambda: _ran_past(client, refs, unowned))
        # 2. Live: a third worker takes its share of the shards from the running second.
        third = await start_worker(app)
        await eventually(lambda: len(second.shards) == len(third.shards) == shards // 2)
        moved = {ref.id for ref in refs if shard_of(ref.id, shards) in third.shards}
        handed_over = await _redis_ms(client)
        await eventually(lambda: _ran_past(client, refs, handed_over + PERIOD_MS))
        states: list[Slots] = [await client.state(ref) for ref in refs]
    for ref, state in zip(refs, states, strict=True):
        assert state.slots == sorted(set(state.slots)), f"{ref.id}: no slot twice, in order"
        gaps = {b - a for a, b in zip(state.slots, state.slots[1:], strict=False)}
        assert gaps == {PERIOD_MS}, f"{ref.id}: no slot missed, through both handovers"
        assert min(state.late_ms) >= 0, "never early"
        owners = len(set(state.epochs))
        assert owners >= (3 if ref.id in moved else 2), f"{ref.id}: ticks ran under {owners} leases"


async def test_missed_slots_are_caught_up_by_policy(connect, start_worker, fast_settings) -> None:
    app = App(DailyAll, DailyLatest, DailyNone)
    every, latest, none = DailyAll.ref("k"), DailyLatest.ref("k"), DailyNone.ref("k")
    async with connect(app=app, shards=fast_settings.shards) as client:
        now = await eventually(lambda: _redis_ms_well_inside_a_day(client), timeout=90)
        today = now // DAY_MS * DAY_MS
        # As if the last worker had fired the slot five days ago, then none had run since.
        for ref in (every, latest, none):
            await _set_mark(client, ref, today - 5 * DAY_MS)
        await start_worker(app)
        # Every policy records today's slot as done, in the script that appends the ticks
        # it fires; a message sent after that is handled after those ticks.
        await eventually(lambda: _marks_are(client, [every, latest, none], today))
        ran = {ref.id: (await client.ask(ref, Report(), timeout=10)).slots for ref in (every, latest, none)}
    assert ran[every.id] == [today - n * DAY_MS for n in (4, 3, 2, 1, 0)], "all: each missed slot"
    assert ran[latest.id] == [today], "latest: only the newest missed slot"
    assert ran[none.id] == [], "none: no missed slot"


class Nightly(Actor):
    State = Slots

    @schedule(cron="30 2 25,26 10 *", timezone="Europe/Berlin", keys=["n"], catch_up="all")
    async def beat(self, tick: Tick) -> None:
        _record(self, self.state, tick)


async def test_a_worker_fires_the_repeated_wall_clock_slot_once(connect, start_worker, fast_settings) -> None:
    app = App(Nightly)
    ref = Nightly.ref("n")
    sunday, monday = _utc_ms(2026, 10, 25, 0, 30), _utc_ms(2026, 10, 26, 1, 30)
    async with connect(app=app, shards=fast_settings.shards) as client:
        # As if a worker had last run on the Saturday: the new one catches up both nights.
        await _set_mark(client, ref, _utc_ms(2026, 10, 24))
        await start_worker(app)
        # Both nights are fired by one script call, in order: once Monday's tick has run,
        # any second Sunday tick would have run before it.
        state = await eventually(lambda: _ran(client, ref, monday))
    assert [s for s in state.slots if s <= monday] == [sunday, monday]


Ref = actors.ActorRef[Any]


def _field(client: actors.Client, ref: Ref) -> tuple[str, str]:
    """The schedules hash and field of ``ref``'s schedule named ``beat``."""
    return client.store.keys.schedules(shard_of(ref.id, client.shards)), f"{ref.id}#beat"


async def _set_mark(client: actors.Client, ref: Ref, slot: int) -> None:
    await client.store.redis.hset(*_field(client, ref), slot)


async def _marks(client: actors.Client, refs: list[Ref]) -> list[int]:
    """The newest slot fired of each ref's ``beat`` schedule."""
    return [int(cast(bytes, await client.store.redis.hget(*_field(client, ref)))) for ref in refs]


async def _marks_are(client: actors.Client, refs: list[Ref], slot: int) -> bool:
    return all(mark == slot for mark in await _marks(client, refs))


async def _redis_ms(client: actors.Client) -> int:
    return await client.store.server_time_ms()


async def _redis_ms_past(client: actors.Client, ms: int) -> bool:
    return await _redis_ms(client) > ms


async def _redis_ms_well_inside_a_day(client: actors.Client) -> int | None:
    """Redis's time, unless it is near a UTC midnight: more than ``GRACE_MS`` after one (so
    that day's slot is missed when first seen) and a minute or more before the next (so
    the newest slot due is still that day's when the worker looks)."""
    now = await _redis_ms(client)
    return now if 2 * GRACE_MS < now % DAY_MS < DAY_MS - 60_000 else None


async def _ran_past(client: actors.Client, refs: list[Ref], after: int) -> bool:
    """Whether each ref has handled a slot later than ``after`` (ms)."""
    for ref in refs:
        state = await client.state(ref)
        if state is None or not state.slots or state.slots[-1] <= after:
            return False
    return True


async def _ran(client: actors.Client, ref: Ref, slot: int) -> Slots | None:
    state = await client.state(ref)
    return state if state is not None and slot in state.slots else None

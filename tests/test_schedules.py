"""Durable schedules: every slot runs exactly once across workers, and missed slots
are caught up by the configured policy."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import BaseModel

import actors
from actors import Actor, App, Tick, schedule
from actors.errors import DefinitionError
from actors.routing import shard_of
from actors.schedules import Schedule

from .conftest import eventually

PERIOD_MS = 200


class Slots(BaseModel):
    slots: list[int] = []
    late_ms: list[int] = []


def _record(state: Slots, tick: Tick) -> None:
    slot = int(tick.slot.timestamp() * 1000)
    state.slots.append(slot)
    state.late_ms.append(int(datetime.now(UTC).timestamp() * 1000) - slot)


class EveryAll(Actor):
    State = Slots

    @schedule(every=timedelta(milliseconds=PERIOD_MS), keys=["a", "b", "c"], catch_up="all")
    async def beat(self, tick: Tick) -> None:
        _record(self.state, tick)


class EveryLatest(Actor):
    State = Slots

    @schedule(every=PERIOD_MS / 1000, keys=["x"])
    async def beat(self, tick: Tick) -> None:
        _record(self.state, tick)


class EveryNone(Actor):
    State = Slots

    @schedule(every=PERIOD_MS / 1000, keys=["n"], catch_up="none")
    async def beat(self, tick: Tick) -> None:
        _record(self.state, tick)


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


def _utc_ms(*when: int) -> int:
    return int(datetime(*when, tzinfo=UTC).timestamp() * 1000)  # type: ignore[misc]


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


async def test_each_slot_runs_once_across_workers_and_a_handover(
    connect, start_worker, fast_settings
) -> None:
    app = App(EveryAll)
    first = await start_worker(app)
    second = await start_worker(app)
    await asyncio.sleep(1.5)
    first.stop()  # its shards move to the second worker
    await asyncio.sleep(1.5)
    third = await start_worker(app)
    await asyncio.sleep(1.0)
    async with connect(app=app) as client:
        for key in ("a", "b", "c"):
            state = await client.state(EveryAll.ref(key))
            assert len(state.slots) >= 15, f"{key}: {state.slots}"
            assert state.slots == sorted(set(state.slots)), "no slot twice, in order"
            gaps = {b - a for a, b in zip(state.slots, state.slots[1:], strict=False)}
            assert gaps == {PERIOD_MS}, "no slot missed, even across the handover"
            assert min(state.late_ms) >= 0, "never early"
    assert second.runners or third.runners


async def test_missed_slots_are_caught_up_by_policy(connect, start_worker, monkeypatch) -> None:
    monkeypatch.setattr(actors.schedules, "GRACE_MS", 100)
    app = App(EveryAll, EveryLatest, EveryNone)
    worker = await start_worker(app)
    async with connect(app=app) as client:
        await eventually(lambda: _slots(client, EveryNone.ref("n"), 2))
        worker.stop()
        await asyncio.sleep(0.3)  # let it finish
        before = {ref.id: list((await client.state(ref)).slots) for ref in _refs()}
        await asyncio.sleep(1.2)  # about 6 slots are missed while no worker runs
        restart_ms = int(datetime.now(UTC).timestamp() * 1000)
        await start_worker(app)
        await asyncio.sleep(0.8)
        after = {ref.id: (await client.state(ref)).slots for ref in _refs()}

    def caught_up(aid: str) -> list[int]:
        return [s for s in after[aid][len(before[aid]) :] if s < restart_ms - PERIOD_MS]

    assert len(caught_up("EveryAll/a")) >= 4, "all: every missed slot ran"
    assert len(caught_up("EveryLatest/x")) <= 1, "latest: only the newest missed slot ran"
    assert caught_up("EveryNone/n") == [], "none: missed slots were skipped"
    for aid in after:
        assert after[aid] == sorted(set(after[aid]))
        assert len(after[aid]) > len(before[aid]), f"{aid} carried on after the restart"


class Nightly(Actor):
    State = Slots

    @schedule(cron="30 2 25,26 10 *", timezone="Europe/Berlin", keys=["n"], catch_up="all")
    async def nightly(self, tick: Tick) -> None:
        _record(self.state, tick)


async def test_a_worker_fires_the_repeated_wall_clock_slot_once(connect, start_worker, fast_settings) -> None:
    app = App(Nightly)
    ref = Nightly.ref("n")
    sunday, monday = _utc_ms(2026, 10, 25, 0, 30), _utc_ms(2026, 10, 26, 1, 30)
    async with connect(app=app, shards=fast_settings.shards) as client:
        # As if a worker had last run on the Saturday: the new one catches up both nights.
        schedules = client.store.keys.schedules(shard_of(ref.id, client.shards))
        await client.store.redis.hset(schedules, f"{ref.id}#nightly", _utc_ms(2026, 10, 24))
        await start_worker(app)
        # Both nights are fired by one script call, in order: once Monday's tick has run,
        # any second Sunday tick would have run before it.
        state = await eventually(lambda: _ran(client, ref, monday))
    assert [s for s in state.slots if s <= monday] == [sunday, monday]


def _refs() -> list[actors.ActorRef]:  # type: ignore[type-arg]
    return [EveryAll.ref("a"), EveryLatest.ref("x"), EveryNone.ref("n")]


async def _slots(client: actors.Client, ref: actors.ActorRef, n: int) -> bool:  # type: ignore[type-arg]
    state = await client.state(ref)
    return state is not None and len(state.slots) >= n


async def _ran(client: actors.Client, ref: actors.ActorRef, slot: int) -> Slots | None:  # type: ignore[type-arg]
    state = await client.state(ref)
    return state if state is not None and slot in state.slots else None

"""Fencing of the timer and schedule loops: ``due_timers.lua`` and ``fire_schedule.lua`` refuse
a stale lease value with ``LeaseLost`` and change nothing, as ``commit.lua`` does
(test_fencing.py). In-process, against the store, like test_fencing.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from actors import LeaseLost
from actors.codec import Envelope, encode_envelope
from actors.store import Store

Connect = Callable[..., Any]


async def _take_over(store: Store, shard: int) -> tuple[str, str]:
    """An old owner's lease, then a new owner's after the old one lapsed: (stale, current)."""
    first = await store.acquire_lease(shard, "old", ttl_ms=10_000)
    assert first is not None
    await store.redis.delete(store.keys.lease(shard))  # the old owner paused past its TTL
    second = await store.acquire_lease(shard, "new", ttl_ms=10_000)
    assert second == first + 1
    return f"old|{first}", f"new|{second}"


async def test_due_timers_with_a_stale_lease_is_refused_and_takes_nothing(connect: Connect) -> None:
    async with connect() as client:
        store: Store = client.store
        shard = 1
        timers = store.keys.timers(shard)
        now = await store.server_time_ms()
        await store.redis.zadd(timers, {"Sleeper/due": now - 1_000, "Sleeper/later": now + 60_000})
        stale, current = await _take_over(store, shard)
        before = await store.redis.zrange(timers, 0, -1, withscores=True)

        with pytest.raises(LeaseLost):
            await store.due_timers(shard, stale, 100)
        with pytest.raises(LeaseLost):  # nor a lease value that was never issued
            await store.due_timers(shard, "new|999", 100)
        assert await store.redis.zrange(timers, 0, -1, withscores=True) == before, (
            "a refused call takes no timer: the due one is still due for the owner"
        )

        _, later, due = await store.due_timers(shard, current, 100)
        assert due == ["Sleeper/due"] and later == now + 60_000
        assert await store.redis.zscore(timers, "Sleeper/due") == 0, "taken: set to 0 (now)"

        await store.redis.delete(store.keys.lease(shard))  # the lease expired: no one owns it
        await store.redis.zadd(timers, {"Sleeper/due2": now - 1_000})
        with pytest.raises(LeaseLost):
            await store.due_timers(shard, current, 100)
        assert await store.redis.zscore(timers, "Sleeper/due2") == now - 1_000


async def test_fire_schedule_with_a_stale_lease_is_refused_and_fires_nothing(connect: Connect) -> None:
    async with connect() as client:
        store: Store = client.store
        shard = 2
        field = "Reporter/r#hourly"
        inbox = store.keys.inbox(shard)
        now = await store.server_time_ms()
        mark = now - 10_000
        [recorded] = await store.schedule_marks(shard, [field], mark)
        assert recorded == mark
        slots = [now - 5_000, now - 1_000]
        ticks = [(slot, _tick(field, slot)) for slot in slots]
        stale, current = await _take_over(store, shard)

        with pytest.raises(LeaseLost):
            await store.fire_schedule(shard, stale, field, slots[-1], ticks)
        assert await store.redis.xlen(inbox) == 0, "no tick appended"
        assert await _mark(store, shard, field) == mark, "the mark did not move"

        _, newest = await store.fire_schedule(shard, current, field, slots[-1], ticks)
        assert newest == slots[-1]
        assert await store.redis.xlen(inbox) == 2
        assert await _mark(store, shard, field) == slots[-1]

        # The lease expired: the next slot is not fired by its former holder either.
        await store.redis.delete(store.keys.lease(shard))
        nxt = [(now, ticks[0][1])]
        with pytest.raises(LeaseLost):
            await store.fire_schedule(shard, current, field, now, nxt)
        assert await store.redis.xlen(inbox) == 2
        assert await _mark(store, shard, field) == slots[-1]


def _tick(field: str, slot: int) -> bytes:
    return encode_envelope(Envelope(f"tick:{field}@{slot}", "Reporter", "r", "actors.Tick", {}), 1 << 20)


async def _mark(store: Store, shard: int, field: str) -> int:
    value = await store.redis.hget(store.keys.schedules(shard), field)
    assert value is not None
    return int(value)

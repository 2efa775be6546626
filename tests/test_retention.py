"""Retention: the state of an actor of a type with ``retention=`` is deleted once it has been
idle that long (never before, never while it has work), a type without it keeps its states
for ever, and the dead-letter streams stay within their length and age bounds."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import actors
from actors import LeaseLost, WorkerSettings
from actors.routing import shard_of

from .conftest import eventually, raw_redis_of
from .retention_apps import Add, Flow, Forever, Get, Hold, Kept, Proceed, Waiter, app

SHARDS = 4


def settings(**overrides: Any) -> WorkerSettings:
    # Chores (the retention sweep, the dead-letter age trim) every 0.2 s.
    return WorkerSettings(
        shards=SHARDS,
        lease=actors.LeaseSettings(ttl=1.0, renew_interval=0.2),
        retry=actors.RetrySettings(max_attempts=3, backoff=0.01),
        trim_interval=0.2,
        **overrides,
    )


def key_in(actor_type: str, shard: int, prefix: str) -> str:
    """A key whose actor of ``actor_type`` lives in ``shard``."""
    n = 0
    while shard_of(f"{actor_type}/{prefix}{n}", SHARDS) != shard:
        n += 1
    return f"{prefix}{n}"


async def has_state(client: Any, ref: actors.ActorRef[Any]) -> bool:
    return await client.store.load_state(shard_of(ref.id, SHARDS), ref.id) is not None


async def deleted(client: Any, ref: actors.ActorRef[Any]) -> bool:
    return not await has_state(client, ref)


async def swept_past(client: Any, control: actors.ActorRef[Any]) -> None:
    """Wait until ``control`` (idle, of the same type and shard as the actor under test, and
    committed after it) is deleted: a sweep then ran when that actor was due too."""
    await eventually(lambda: deleted(client, control), timeout=30)


def test_the_settings_bound_dead_letters_by_default() -> None:
    defaults = WorkerSettings()
    assert defaults.dlq_max_len == 100_000
    assert defaults.dlq_max_age == 30 * 24 * 3600.0
    assert (Kept.retention, Waiter.retention, Forever.retention) == (1.0, 1.0, None)


def test_retention_must_be_positive() -> None:
    for bad in (0, -1.0):
        with pytest.raises(actors.DefinitionError, match="retention"):

            class Bad(actors.Actor, retention=bad):
                pass


async def test_an_idle_actor_is_deleted_after_its_retention_and_not_before(
    start_worker, connect, redis_url
) -> None:
    await start_worker(app, settings())
    async with connect(app=app) as client:
        store, ref = client.store, Kept.ref("a")
        shard = shard_of(ref.id, SHARDS)
        await client.ask(ref, Add(by=5))
        mark = await store.redis.zscore(store.keys.idle(shard, "Kept"), ref.id)
        assert mark is not None, "its commit marked it, on Redis's clock"
        due = int(mark) + 1000
        # Redis's clock and the snapshot at one instant, on the server (primary) that holds it.
        node = await raw_redis_of(redis_url, store.keys.state(shard))

        async def gone() -> bool:
            # Present whenever before its due time.
            async with node.pipeline(transaction=True) as pipe:
                pipe.time()
                pipe.hexists(store.keys.state(shard), ref.id)
                (seconds, micros), present = await pipe.execute()
            now = int(seconds) * 1000 + int(micros) // 1000
            assert present or now >= due, f"deleted at {now}, before its due time {due}"
            return not present

        try:
            await eventually(gone, timeout=30, interval=0.02)
        finally:
            await node.aclose()
        assert await store.redis.zscore(store.keys.idle(shard, "Kept"), ref.id) is None
        # The next message starts it afresh, as a new actor (no stale state kept in memory).
        assert (await client.ask(ref, Get())).total == 0
        await client.ask(ref, Add(by=2))
        assert (await client.ask(ref, Get())).total == 2


async def test_not_while_a_turn_of_it_runs(start_worker, connect, monkeypatch) -> None:
    """A turn running in memory (no journal write, so Redis shows nothing open) keeps it."""
    monkeypatch.setattr(Kept, "gate", asyncio.Event())
    monkeypatch.setattr(Kept, "holding", set())
    await start_worker(app, settings())
    async with connect(app=app) as client:
        held = Kept.ref("h")
        control = Kept.ref(key_in("Kept", shard_of(held.id, SHARDS), "c"))
        await client.ask(held, Add())
        await client.send(held, Hold())
        await eventually(lambda: "h" in Kept.holding)
        await client.ask(control, Add())  # committed after held's last commit
        await swept_past(client, control)
        assert await has_state(client, held), "its turn runs: not idle"
        assert Kept.gate is not None
        Kept.gate.set()
        assert (await client.ask(held, Get())).total == 2, "its turn committed on its kept state"
        await eventually(lambda: deleted(client, held), timeout=30)


async def test_not_while_it_has_an_open_turn_or_deferred_messages(start_worker, connect) -> None:
    await start_worker(app, settings())
    async with connect(app=app) as client:
        store, flow = client.store, Waiter.ref("w")
        shard = shard_of(flow.id, SHARDS)
        control = Waiter.ref(key_in("Waiter", shard, "c"))
        await client.ask(flow, Add())
        await client.send(flow, Flow())
        await eventually(lambda: open_turn(store, shard, flow.id))
        await client.send(flow, Add(by=100))  # deferred behind the waiting turn
        await eventually(lambda: deferred(store, shard, flow.id))
        await client.ask(control, Add())
        await swept_past(client, control)

        assert await has_state(client, flow), "a waiting workflow is not idle"
        assert await open_turn(store, shard, flow.id) and await deferred(store, shard, flow.id)
        # Its mark is forgotten; the write that ends its turn marks it again.
        assert await store.redis.zscore(store.keys.idle(shard, "Waiter"), flow.id) is None

        await client.send(flow, Proceed())
        assert (await client.ask(flow, Get())).total == 111, "1, then the flow's 10, then the deferred 100"
        await eventually(lambda: deleted(client, flow), timeout=30)


async def open_turn(store: Any, shard: int, actor_id: str) -> bool:
    turn, _ = await store.open_turn(shard, actor_id)
    return turn is not None


async def deferred(store: Any, shard: int, actor_id: str) -> bool:
    _, count = await store.open_turn(shard, actor_id)
    return bool(count)


async def test_a_type_without_retention_is_never_deleted(start_worker, connect) -> None:
    await start_worker(app, settings())
    async with connect(app=app) as client:
        kept = Forever.ref("f")
        shard = shard_of(kept.id, SHARDS)
        await client.ask(kept, Add())
        control = Kept.ref(key_in("Kept", shard, "c"))
        await client.ask(control, Add())
        await swept_past(client, control)
        assert await has_state(client, kept)
        for s in range(SHARDS):  # and its commits mark nothing: they cost what they did
            assert not await client.store.redis.exists(client.store.keys.idle(s, "Forever"))


async def test_the_sweep_script_keeps_actors_with_work_and_is_fenced(connect) -> None:
    async with connect() as client:
        store, shard = client.store, 0
        epoch = await store.acquire_lease(shard, "w", ttl_ms=10_000)
        assert epoch is not None
        lease, k = f"w|{epoch}", store.keys
        idle = k.idle(shard, "Kept")
        ids = ["Kept/idle", "Kept/backlog", "Kept/open", "Kept/recent", "Kept/gone"]
        for aid in ids[:4]:
            await store.redis.hset(k.state(shard), aid, b"\x80")
        await store.redis.zadd(idle, {aid: 1 for aid in ids[:3]})  # last commits long ago
        await store.redis.zadd(idle, {"Kept/recent": await store.server_time_ms()})
        await store.redis.hset(k.deliveries(shard), "Kept/idle", "m#1")
        await store.redis.zadd(k.timers(shard), {"Kept/backlog": 0})  # deferred messages left
        await store.redis.hset(k.turns(shard), "Kept/open", b"1:")  # an open turn

        with pytest.raises(LeaseLost):
            await store.expire_idle(shard, f"w|{epoch - 1}", "Kept", 60_000, ids)
        assert await store.redis.hlen(k.state(shard)) == 4 and await store.redis.zcard(idle) == 4

        assert await store.expire_idle(shard, lease, "Kept", 60_000, ids) == ["Kept/idle"]
        assert not await store.redis.hexists(k.state(shard), "Kept/idle")
        assert not await store.redis.hexists(k.deliveries(shard), "Kept/idle")
        for aid in ("Kept/backlog", "Kept/open", "Kept/recent"):
            assert await store.redis.hexists(k.state(shard), aid), aid
        # Those with work lose their mark (the write that ends their work marks them again).
        assert [m.decode() for m in await store.redis.zrange(idle, 0, -1)] == ["Kept/recent"]


# ---- dead letters -------------------------------------------------------------------------------------


async def junk(store: Any, shard: int, count: int) -> str:
    """Append ``count`` entries with no ``e`` field (each is dead-lettered as undecodable);
    returns the last one's entry id."""
    async with store.redis.pipeline(transaction=False) as pipe:
        for n in range(count):
            pipe.xadd(store.keys.inbox(shard), {"junk": str(n)})
        ids = await pipe.execute()
    return str(ids[-1].decode())


async def newest_dead_letter_of(store: Any, shard: int) -> str:
    rows = await store.redis.xrevrange(store.keys.dead_letters(shard), count=1)
    return rows[0][1][b"entry"].decode() if rows else ""


async def test_the_dead_letter_stream_stays_within_its_length(start_worker, connect) -> None:
    await start_worker(app, settings(dlq_max_len=20))
    async with connect(app=app) as client:
        store = client.store
        last = await junk(store, 0, 300)
        await eventually(lambda: _equal(newest_dead_letter_of(store, 0), last), timeout=30)
        length = await store.redis.xlen(store.keys.dead_letters(0))
        # Trimmed by whole stream nodes (MAXLEN ~): at most one node (100 entries) over.
        assert 20 <= length <= 20 + 100, length


async def _equal(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def test_the_dead_letter_stream_stays_within_its_age(start_worker, connect, redis_url) -> None:
    await start_worker(app, settings(dlq_max_age=1.0))
    async with connect(app=app) as client:
        store, key = client.store, client.store.keys.dead_letters(1)
        last = await junk(store, 1, 5)
        await eventually(lambda: _equal(newest_dead_letter_of(store, 1), last), timeout=30)
        made = [int(i.decode().partition("-")[0]) for i, _ in await store.redis.xrange(key)]
        assert len(made) == 5
        node = await raw_redis_of(redis_url, key)  # its clock and the stream at one instant

        async def trimmed() -> bool:
            async with node.pipeline(transaction=True) as pipe:
                pipe.time()
                pipe.xrange(key)
                (seconds, micros), rows = await pipe.execute()
            now = int(seconds) * 1000 + int(micros) // 1000
            left = {int(i.decode().partition("-")[0]) for i, _ in rows}
            for at in made:  # none went before its age passed
                assert at in left or now >= at + 1000, f"trimmed at {now}, made at {at}"
            return not left

        try:
            await eventually(trimmed, timeout=30, interval=0.02)
        finally:
            await node.aclose()


async def test_actors_worker_bounds_the_dead_letters_as_told(spawn_worker, connect) -> None:
    worker = spawn_worker("tests.retention_apps:app", "--shards", "4", "--dlq-max-len", "10",
                          "--dlq-max-age", "3600")  # fmt: skip
    async with connect(app=app, shards=SHARDS) as client:
        store = client.store
        last = await junk(store, 2, 250)
        await eventually(lambda: _equal(newest_dead_letter_of(store, 2), last), timeout=60)
        assert await store.redis.xlen(store.keys.dead_letters(2)) <= 10 + 100
    assert worker.stop() == 0

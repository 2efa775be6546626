"""``send_many`` with idempotency keys (a batch that can be retried safely), and ``actors dlq
list`` that says when a shard holds more than it shows and never prints megabyte lines
(issue #15 item 10)."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Callable
from typing import Any

import pytest

import actors
from actors import MessageSettings, RedisSettings, Worker, WorkerSettings
from actors.codec import Envelope, encode_envelope
from actors.routing import shard_of

from .apps import Add, Counter, Get, Total, app
from .conftest import eventually
from .test_cli import actors_cli, ok


async def test_a_keyed_batch_retried_has_one_effect(
    start_worker: Callable[..., Any], connect: Callable[..., Any]
) -> None:
    await start_worker(app)
    async with connect(app=app) as client:
        batch = [(Counter.ref(f"b{n % 5}"), Add(by=1), f"order-{n}") for n in range(20)]
        first = await client.send_many(batch)
        again = await client.send_many(batch)  # as after an error whose outcome was unknown
        assert again == first and len(set(first)) == 20
        for n in range(5):
            assert await client.ask(Counter.ref(f"b{n}"), Get(), timeout=10) == Total(total=4)


async def test_keyed_and_plain_items_keep_their_order_per_target(
    start_worker: Callable[..., Any], connect: Callable[..., Any]
) -> None:
    await start_worker(app)
    async with connect(app=app) as client:
        ref = Counter.ref("ordered")
        items: list[Any] = [
            (ref, Add(sender="s", seq=n), f"k{n}") if n % 2 else (ref, Add(sender="s", seq=n))
            for n in range(10)
        ]
        await client.send_many(items)
        await eventually(lambda: _seqs(client, ref, 10))
        state = await client.state(ref)
        assert state.seqs["s"] == list(range(10))


async def test_a_conflicting_key_raises_after_the_batch_and_a_bad_key_before_it(
    connect: Callable[..., Any],
) -> None:
    async with connect(app=app) as client:
        ref = Counter.ref("c")
        first = await client.send(ref, Add(by=1), idempotency_key="used")
        with pytest.raises(actors.IdempotencyConflict) as conflict:
            await client.send_many([(ref, Add(by=2), "used"), (Counter.ref("d"), Add(by=1), "fresh")])
        assert conflict.value.message_id == first
        shard_c, shard_d = shard_of("Counter/c", client.shards), shard_of("Counter/d", client.shards)
        assert (await client.store.shard_info(shard_d)).length == 1, "the batch is not atomic: the other went"

        before = (await client.store.shard_info(shard_c)).length
        for bad in (5, "", "k" * 257):
            with pytest.raises(actors.InvalidIdempotencyKey):
                await client.send_many([(ref, Add(by=1)), (ref, Add(by=1), bad)])
        with pytest.raises(TypeError, match="send_many takes"):
            await client.send_many([(ref,)])  # type: ignore[list-item]
        assert (await client.store.shard_info(shard_c)).length == before, "nothing was written"


async def _seqs(client: actors.Client, ref: Any, n: int) -> bool:
    state = await client.state(ref)
    return state is not None and len(state.seqs.get("s", [])) == n


# ---- dlq list ------------------------------------------------------------------------------------


async def test_dlq_list_says_when_a_shard_holds_more(
    redis_url: str, namespace: str, connect: Callable[..., Any], start_worker: Callable[..., Any]
) -> None:
    await start_worker(app)
    async with connect(app=app) as client:
        for n in range(5):
            await client.store.append(0, f"junk {n}".encode())
        await eventually(lambda: _dead(client, 0, 5))
    where = ["--redis", redis_url, "--namespace", namespace]
    result = await actors_cli("dlq", "list", "--count", "2", *where)
    assert len(ok(result).splitlines()) == 2
    assert "showing 2 of 5 dead letters" in result.stderr and "--count" in result.stderr, result.stderr
    assert "shard 0 (5)" in result.stderr
    everything = await actors_cli("dlq", "list", *where)
    assert len(ok(everything).splitlines()) == 5 and everything.stderr == ""


async def test_dlq_list_clips_an_oversize_entry(
    redis_url: str, namespace: str, connect: Callable[..., Any]
) -> None:
    """A 2 MB actor key in a message refused as too large: its line stays short."""
    settings = WorkerSettings(shards=4, messages=MessageSettings(max_message_bytes=100_000))
    worker = Worker(app, RedisSettings(url=redis_url, namespace=namespace), settings)
    key = "k" * 2_000_000
    async with connect(app=app, shards=4) as client:
        env = Envelope(id=uuid.uuid4().hex, actor="Counter", key=key, type="Add", payload={"by": 1})
        shard = shard_of(env.actor_id, 4)
        await client.store.append(shard, encode_envelope(env, sys.maxsize))
        running = asyncio.create_task(worker.run())
        try:
            await eventually(lambda: _dead(client, shard, 1))
        finally:
            worker.stop()
            await running
    result = await actors_cli("dlq", "list", "--redis", redis_url, "--namespace", namespace)
    [line] = ok(result).splitlines()
    assert len(line) < 500 and "too large" in line and line.count("k") > 50, line[:600]


async def _dead(client: actors.Client, shard: int, n: int) -> bool:
    return len(await client.store.dead_letters(shard, 100)) >= n

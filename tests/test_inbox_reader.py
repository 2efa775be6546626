"""The inbox reader (``actors/store/reader.py``): many runners' blocking reads in one ``XREAD``
on a few connections, each runner seeing every entry after what it has seen once, in order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from actors.store import InboxFeed, InboxReader, Store
from actors.store.reader import GROUP_STREAMS, READER_CONNECTIONS
from tests.conftest import eventually

SHARED_CALL = (
    "the one-server InboxReader's shared XREAD over many shards (a cluster refuses it: CROSSSLOT; "
    "its ClusterInboxReader reads each shard alone) and CLIENT LIST of one server"
)

LONG_BLOCK_MS = 60_000
"""Longer than any deadline below: a read that waited for it would fail the test."""


@pytest.fixture
async def store(connect: Callable[..., Any]) -> AsyncIterator[Store]:
    async with connect() as client:
        yield client.store


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(redis_url)
    yield r
    await r.aclose()


async def append(store: Store, shard: int, n: int) -> list[str]:
    return [await store.append(shard, f"m{i}".encode()) for i in range(n)]


async def blocked_xreads(r: aioredis.Redis) -> int:
    return sum(1 for c in await r.client_list() if c["cmd"] == "xread" and "b" in str(c["flags"]))


@pytest.mark.single(SHARED_CALL)
async def test_many_runners_wait_in_one_xread_on_a_few_connections(store: Store, raw: aioredis.Redis) -> None:
    reader = InboxReader(store, count=10, block_ms=LONG_BLOCK_MS)
    try:
        feeds = [reader.open(shard) for shard in range(300)]
        waits = [asyncio.create_task(feed.read_after("0-0")) for feed in feeds]
        await eventually(lambda: blocked_xreads(raw))
        assert await blocked_xreads(raw) <= READER_CONNECTIONS
        ids = [await store.append(shard, f"to {shard}".encode()) for shard in range(300)]
        async with asyncio.timeout(20):
            got = await asyncio.gather(*waits)
        assert got == [[(ids[s], f"to {s}".encode())] for s in range(300)]
        assert await blocked_xreads(raw) <= READER_CONNECTIONS
    finally:
        await reader.close()


async def test_a_runner_that_takes_nothing_has_a_bounded_buffer_and_then_every_entry_once(
    store: Store,
) -> None:
    """Its reading paused (``max_inflight``), a runner does not call; the reader reads it
    ahead only while its buffer holds fewer than ``count``."""
    reader = store.inbox_reader(count=10, block_ms=50)
    try:
        feed = reader.open(0)
        other = reader.open(1)  # keeps the main call going out
        assert await feed.read_after("0-0") == []
        other_wait = asyncio.create_task(other.read_after("0-0"))
        ids = await append(store, 0, 100)
        await eventually(lambda: len(feed.buffer) >= 10)
        await asyncio.sleep(0.3)  # several more calls: none may read this feed ahead now
        assert len(feed.buffer) < 3 * 10
        seen: list[str] = []
        while len(seen) < 100:
            batch = await feed.read_after(seen[-1] if seen else "0-0")
            assert batch and len(batch) <= 10
            seen += [entry_id for entry_id, _ in batch]
        assert seen == ids, "in order, none twice, none skipped"
        other_wait.cancel()
    finally:
        await reader.close()


async def test_what_the_runner_read_elsewhere_is_not_delivered_again(store: Store) -> None:
    """After the fenced read (``read_new``) the runner waits after a newer id than the
    reader's cursor: buffered entries up to it are dropped, the rest follow in order."""
    reader = store.inbox_reader(count=100, block_ms=LONG_BLOCK_MS)
    try:
        feed = reader.open(0)
        wait = asyncio.create_task(feed.read_after("0-0"))
        ids = await append(store, 0, 1)
        assert [i for i, _ in await wait] == ids
        ids += await append(store, 0, 4)
        await eventually(lambda: len(feed.buffer) == 4)
        assert [i for i, _ in await feed.read_after(ids[2])] == ids[3:]
        wait = asyncio.create_task(feed.read_after(ids[4]))
        ids += await append(store, 0, 1)
        async with asyncio.timeout(20):
            assert [i for i, _ in await wait] == ids[5:]
    finally:
        await reader.close()


async def test_a_runner_ahead_of_what_the_reader_read_waits_after_its_own_id(store: Store) -> None:
    """The fenced read took more than the reader had buffered (its buffer was full): the
    cursor moves to the runner's id, and nothing up to it comes again."""
    reader = store.inbox_reader(count=2, block_ms=LONG_BLOCK_MS)
    try:
        feed = reader.open(0)
        wait = asyncio.create_task(feed.read_after("0-0"))
        ids = await append(store, 0, 1)
        assert [i for i, _ in await wait] == ids
        ids += await append(store, 0, 5)
        await eventually(lambda: len(feed.buffer) >= 2)
        wait = asyncio.create_task(feed.read_after(ids[5]))
        ids += await append(store, 0, 1)
        async with asyncio.timeout(20):
            assert [i for i, _ in await wait] == ids[6:]
    finally:
        await reader.close()


@pytest.mark.single(SHARED_CALL)
async def test_a_runner_left_out_of_the_blocked_call_does_not_wait_for_its_timeout(
    store: Store, raw: aioredis.Redis
) -> None:
    """The main call blocks for a minute without shard 1; a runner that starts waiting on it
    meanwhile gets a catch-up call of its own."""
    reader = InboxReader(store, count=10, block_ms=LONG_BLOCK_MS)
    try:
        first = asyncio.create_task(reader.open(0).read_after("0-0"))
        await eventually(lambda: blocked_xreads(raw))  # the main call, covering shard 0 only
        late = asyncio.create_task(reader.open(1).read_after("0-0"))
        [entry_id] = await append(store, 1, 1)
        async with asyncio.timeout(20):
            assert [i for i, _ in await late] == [entry_id]
        assert not first.done()
        first.cancel()
    finally:
        await reader.close()


@pytest.mark.single(SHARED_CALL)
async def test_cancelling_one_wait_leaves_the_others_and_the_shared_call(
    store: Store, raw: aioredis.Redis
) -> None:
    reader = InboxReader(store, count=10, block_ms=LONG_BLOCK_MS)
    try:
        a, b = reader.open(0), reader.open(1)
        wait_a = asyncio.create_task(a.read_after("0-0"))
        wait_b = asyncio.create_task(b.read_after("0-0"))
        await eventually(lambda: blocked_xreads(raw))
        wait_a.cancel()  # draining: the runner stops waiting
        [to_b] = await append(store, 1, 1)
        async with asyncio.timeout(20):
            assert [i for i, _ in await wait_b] == [to_b]
        [to_a] = await append(store, 0, 1)
        async with asyncio.timeout(20):
            assert [i for i, _ in await a.read_after("0-0")] == [to_a]
        a.close()
        b.close()
        assert reader.feeds == 0
    finally:
        await reader.close()


async def test_two_runners_of_one_shard_each_see_every_entry_after_their_own_cursor(store: Store) -> None:
    """A shard's old runner may still wait while its new one starts: both read one stream."""
    reader = store.inbox_reader(count=10, block_ms=LONG_BLOCK_MS)
    try:
        ids = await append(store, 0, 3)
        old, new = reader.open(0), reader.open(0)
        got_old = await old.read_after("0-0")
        got_new = await new.read_after(ids[1])
        assert [i for i, _ in got_old] == ids and [i for i, _ in got_new] == ids[2:]
        waits = [asyncio.create_task(f.read_after(ids[2])) for f in (old, new)]
        ids += await append(store, 0, 1)
        async with asyncio.timeout(20):
            assert [[i for i, _ in got] for got in await asyncio.gather(*waits)] == [ids[3:], ids[3:]]
    finally:
        await reader.close()


@pytest.mark.single(SHARED_CALL)
async def test_a_read_the_server_refuses_fails_the_waits_it_covered(
    store: Store, raw: aioredis.Redis
) -> None:
    """Its runners restart, as when each read alone; once the bad one is gone, reading goes on."""
    reader = InboxReader(store, count=10, block_ms=LONG_BLOCK_MS)
    try:
        await raw.set(store.keys.inbox(7), "not a stream")
        bad: InboxFeed = reader.open(7)
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            async with asyncio.timeout(20):
                await bad.read_after("0-0")
        bad.close()
        good = reader.open(0)
        wait = asyncio.create_task(good.read_after("0-0"))
        [entry_id] = await append(store, 0, 1)
        async with asyncio.timeout(20):
            assert [i for i, _ in await wait] == [entry_id]
    finally:
        await reader.close()


async def test_streams_are_read_in_groups_and_an_entry_ends_only_the_call_of_its_group(
    store: Store, raw: aioredis.Redis
) -> None:
    """A call costs the server and the worker in proportion to the streams it names, and an
    entry on any of them ends it: one call naming thousands of idle streams made every
    message cost milliseconds. Each group of at most ``GROUP_STREAMS`` has a call of its own,
    and an entry for one stream sends only its group's call again."""
    reader = InboxReader(store, count=10, block_ms=LONG_BLOCK_MS)
    shards = 2 * GROUP_STREAMS + 10
    try:
        feeds = [reader.open(shard) for shard in range(shards)]
        waits = [asyncio.create_task(feed.read_after("0-0")) for feed in feeds]
        assert reader.groups == 3
        await eventually(lambda: _blocked(raw, 3))
        before = await xread_bytes_in(raw)
        [entry_id] = await append(store, 0, 1)
        async with asyncio.timeout(20):
            assert await waits[0] == [(entry_id, b"m0")]
        waits[0] = asyncio.create_task(feeds[0].read_after(entry_id))
        await eventually(lambda: _blocked(raw, 3))  # its group's call is out again
        after = await xread_bytes_in(raw)
        sent_again = [client for client, size in after.items() if size != before.get(client)]
        assert len(sent_again) == 1, f"bytes each reader connection was sent: {before} then {after}"
        assert not any(wait.done() for wait in waits)
        for wait in waits:
            wait.cancel()
    finally:
        await reader.close()


async def _blocked(r: aioredis.Redis, n: int) -> bool:
    return await blocked_xreads(r) == n


async def xread_bytes_in(r: aioredis.Redis) -> dict[int, int]:
    """The bytes each connection blocked in an XREAD has sent the server (``tot-net-in``)."""
    return {
        int(c["id"]): int(c["tot-net-in"])
        for c in await r.client_list()
        if c["cmd"] == "xread" and "b" in str(c["flags"])
    }

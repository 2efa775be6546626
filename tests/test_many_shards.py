"""Many shards in one worker process (issue #14): every shard is served, and the connections
the process holds do not grow with the number of shards it holds.

Each idle shard runner used to wait in an ``XREAD BLOCK`` of its own on the shared pool: past
about 250 shards the pool (256 connections) was starved, messages waited seconds or more, and
the process held hundreds of connections. Now the runners wait on the worker's inbox reader
(``actors/store/reader.py``): one ``XREAD`` for many shards, on a few connections of its own.
"""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from actors.routing import shard_of
from actors.store.connection import POOL_CONNECTIONS
from actors.store.reader import READER_CONNECTIONS
from benchmarks.shards import connections_of
from tests.apps import Add, Counter, Get, app

SHARDS = 1024
CONNECTION_BOUND = 2 * POOL_CONNECTIONS + READER_CONNECTIONS + 1
"""What a worker process may hold, whatever its shard count: the two pools of its store (one
that retries, one that does not), its inbox reader's connections, and the lease keeper's.
(Its pub/sub listeners take theirs from the first pool.)"""
DEADLINE_S = 60.0
"""Generous: the whole test takes a few seconds; starved, it took minutes."""


def key_per_shard(shards: int) -> list[str]:
    keys: dict[int, str] = {}
    i = 0
    while len(keys) < shards:
        keys.setdefault(shard_of(f"Counter/k{i}", shards), f"k{i}")
        i += 1
    return [keys[s] for s in range(shards)]


@pytest.mark.single(
    "CLIENT LIST of one server, and the one-server bound: on a cluster a worker holds a blocked "
    "XREAD per shard (ClusterInboxReader), spread over the primaries"
)
async def test_a_worker_holding_1024_shards_serves_each_with_a_bounded_number_of_connections(
    spawn_worker, connect, redis_url
) -> None:
    r = aioredis.Redis.from_url(redis_url)
    try:
        async with connect(app=app, shards=SHARDS) as client:
            # The default lease timing: the fixture's short one is for tests of failover.
            worker = spawn_worker(
                "tests.apps:app", "--shards", str(SHARDS), "--lease-ttl", "2", "--renew-interval", "0.5"
            )
            leases = [client.store.keys.lease(s) for s in range(SHARDS)]
            async with asyncio.timeout(DEADLINE_S):
                while not all(await r.mget(leases)):
                    assert worker.proc is not None and worker.proc.poll() is None, "the worker exited"
                    await asyncio.sleep(0.1)
            held: list[int] = []

            async def bounded() -> None:
                held.append(await connections_of(r, worker.pid))
                assert held[-1] <= CONNECTION_BOUND, f"connections held over time: {held}"

            await bounded()

            async def served(key: str) -> int:
                await client.send(Counter.ref(key), Add(by=2))
                return (await client.ask(Counter.ref(key), Get(), timeout=DEADLINE_S)).total

            keys = key_per_shard(SHARDS)
            async with asyncio.timeout(DEADLINE_S):
                totals: list[int] = []
                for first in range(0, SHARDS, 128):
                    totals += await asyncio.gather(*(served(k) for k in keys[first : first + 128]))
                    await bounded()
            assert totals == [2] * SHARDS, "every shard handled its message, once"
            await asyncio.sleep(1.5)  # past a block_ms: every runner has woken from an idle wait
            await bounded()
    finally:
        await r.aclose()

"""Many shards in one worker process (issue #14): every shard is served, the connections the
process holds are bounded whatever the number of shards it holds, and an idle worker of
4,096 shards makes few calls beside its lease renewals.

Each idle shard runner used to wait in an ``XREAD BLOCK`` of its own on the shared pool: past
about 250 shards the pool (256 connections) was starved, messages waited seconds or more, and
the process held hundreds of connections. Now the runners wait on the worker's inbox reader
(``actors/store/reader.py``): one ``XREAD`` for many shards, on a few connections of its own.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import redis.asyncio as aioredis

import actors
from actors import EmbeddedServer, WorkerSettings
from actors.routing import shard_of
from actors.store.connection import POOL_CONNECTIONS
from actors.store.reader import reader_connections
from benchmarks.shards import connections_of
from tests.apps import Add, Counter, Get, app
from tests.conftest import eventually

SHARDS = 1024
CONNECTION_BOUND = 2 * POOL_CONNECTIONS + reader_connections(SHARDS) + 1
"""What a worker process of 1,024 shards may hold: the two pools of its store (one that
retries, one that does not), its inbox reader's connections (a main call per group of
``GROUP_STREAMS`` shards, and the catch-up calls), and the lease keeper's. (Its pub/sub
listeners take theirs from the first pool.) At most ``MAX_SHARDS``, the bound of any process:
``READER_CONNECTIONS`` for the reader."""
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


IDLE_SHARDS = 4096
"""The most shards a namespace may have (``MAX_SHARDS``), all held by one worker."""
IDLE_WINDOW_S = 6.0
"""Longer than any routine period of a runner (``trim_interval``, the timer and outbox polls,
``block_ms``: 5 s at most), so a window sees each of them at least once."""
IDLE_CALLS_PER_S = 200
"""What an idle worker may cost the server, whatever its shard count, beside the renewals of
its leases: its supervisor's heartbeats and a few blocked reads. (Each idle shard runner
used to make about four calls a second of its own: about 15,000 a second at 4,096 shards.)"""


async def idle_calls(r: aioredis.Redis, seconds: float) -> float:
    """Commands per second the server ran in the next ``seconds``, those of lease renewals
    (``renew_lease.lua``: an EVALSHA running GET and PEXPIRE, one per held lease per renew
    interval, however idle the worker) left out: every other script call counts (EVALSHA
    beyond the PEXPIREs), and so does each command a script runs, GET aside."""

    async def counts() -> dict[str, int]:
        stats = await r.info("commandstats")
        return {name.removeprefix("cmdstat_"): int(row["calls"]) for name, row in stats.items()}

    before = await counts()
    await asyncio.sleep(seconds)
    after = await counts()
    delta = {name: calls - before.get(name, 0) for name, calls in after.items()}
    renewals = delta.get("pexpire", 0)
    others = sum(calls for name, calls in delta.items() if name not in ("evalsha", "get", "pexpire"))
    return (others + max(0, delta.get("evalsha", 0) - renewals)) / seconds


async def test_an_idle_worker_holding_4096_shards_makes_few_calls_and_serves_every_shard(
    start_worker, namespace, tmp_path
) -> None:
    """Held shards cost no calls of their own while idle: what the worker asks of the server
    stays under a figure that does not grow with the shards it holds (lease renewals aside,
    which must be one per shard). A message to any of them is then handled as before."""
    server = EmbeddedServer(tmp_path / "redis").start()  # its own, so that every call counted is ours
    r = aioredis.Redis.from_url(server.url)
    try:
        # Default chores; leases long enough that a machine busy with other tests (4,096 runners
        # start at once here) does not let them lapse: the churn would be counted as calls.
        lease = actors.LeaseSettings(ttl=10.0, renew_interval=2.0)
        settings = WorkerSettings(shards=IDLE_SHARDS, lease=lease)
        async with actors.connect(server.url, namespace=namespace, app=app, shards=IDLE_SHARDS) as client:
            worker = await start_worker(app, settings, url=server.url)
            await eventually(lambda: len(worker.runners) == IDLE_SHARDS, timeout=DEADLINE_S)
            rates: list[float] = []

            async def quiet() -> bool:
                rates.append(await idle_calls(r, IDLE_WINDOW_S))
                return rates[-1] <= IDLE_CALLS_PER_S

            # Once the runners have started (each reads its inbox, timers and outbox once).
            with contextlib.suppress(AssertionError):
                await eventually(quiet, timeout=DEADLINE_S / 2, interval=0)
            assert rates[-1] <= IDLE_CALLS_PER_S, f"calls a second while idle, window by window: {rates}"
            epochs = await r.mget([client.store.keys.epoch(s) for s in range(IDLE_SHARDS)])
            assert set(epochs) == {b"1"}, "every lease held throughout: none lost and taken again"

            keys = key_per_shard(IDLE_SHARDS)[::64]  # a spread of 64 shards

            async def served(key: str) -> int:
                await client.send(Counter.ref(key), Add(by=3))
                return (await client.ask(Counter.ref(key), Get(), timeout=DEADLINE_S)).total

            async with asyncio.timeout(DEADLINE_S):
                assert await asyncio.gather(*(served(k) for k in keys)) == [3] * len(keys)
    finally:
        await r.aclose()
        server.stop()

"""Exactly-once under real crashes: a worker process SIGKILLed at random moments."""

from __future__ import annotations

import asyncio
import random
import signal

import pytest

from .apps import Add, Counter, Mirror, Tally, app
from .conftest import eventually

pytestmark = pytest.mark.chaos


async def test_exactly_once_increments_across_sigkills(spawn_worker, connect) -> None:
    """10,000 increments over 500 counters (and 2,000 forwarded via Mirror -> Tally) while the
    only worker is SIGKILLed at random moments and restarted: totals come out exact."""
    rng = random.Random(7)
    worker = spawn_worker()
    counters, increments = 500, 10_000
    expected = [0] * counters
    mirrors = 2_000
    async with connect(app=app) as client:
        stop_killing = asyncio.Event()

        async def killer() -> int:
            kills = 0
            nonlocal worker
            while not stop_killing.is_set() or kills < 6:
                await asyncio.sleep(rng.uniform(0.3, 1.0))
                worker.signal(signal.SIGKILL)
                worker.proc.wait()
                kills += 1
                worker = spawn_worker()
            return kills

        killing = asyncio.create_task(killer())
        batch: list = []
        for _i in range(increments):
            k = rng.randrange(counters)
            expected[k] += 1
            batch.append((Counter.ref(f"c-{k}"), Add(by=1)))
            if len(batch) == 100:
                await client.send_many(batch)
                batch.clear()
                await asyncio.sleep(0.03)
        await client.send_many((Mirror.ref(f"m-{i}"), Add(by=1)) for i in range(mirrors))
        await asyncio.sleep(1.0)
        stop_killing.set()
        kills = await killing
        assert kills >= 6

        async def all_done() -> bool:
            totals = await asyncio.gather(*(client.state(Counter.ref(f"c-{k}")) for k in range(counters)))
            tallies = await asyncio.gather(*(client.state(Tally.ref(f"tally-{t}")) for t in range(7)))
            return (
                sum(s.total for s in totals if s) == increments
                and sum(s.total for s in tallies if s) == mirrors
            )

        await eventually(all_done, timeout=60, interval=0.25)
        await asyncio.sleep(0.5)  # anything applied twice would show up now
        totals = await asyncio.gather(*(client.state(Counter.ref(f"c-{k}")) for k in range(counters)))
        assert [s.total if s else 0 for s in totals] == expected
        tallies = await asyncio.gather(*(client.state(Tally.ref(f"tally-{t}")) for t in range(7)))
        assert sum(s.total for s in tallies) == mirrors
        mirrored = await asyncio.gather(*(client.state(Mirror.ref(f"m-{i}")) for i in range(mirrors)))
        assert all(s is not None and s.total == 1 for s in mirrored)

        async def nothing_pending() -> bool:
            infos = [await client.store.shard_info(s) for s in range(client.shards)]
            return all(i.pending == 0 and i.dead_letters == 0 for i in infos)

        await eventually(nothing_pending, timeout=10)

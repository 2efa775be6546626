"""SIGTERM drains a worker and hands its shards over at once, not after the lease TTL."""

from __future__ import annotations

import signal
import time

import pytest

import actors

from .apps import Add, Counter, Get, app
from .conftest import eventually

pytestmark = pytest.mark.chaos


async def test_sigterm_hands_shards_over_before_the_ttl(spawn_worker, redis_url, namespace) -> None:
    ttl = ["--shards", "4", "--lease-ttl", "6", "--renew-interval", "0.2"]
    leaving = spawn_worker("tests.apps:app", *ttl)
    staying = spawn_worker("tests.apps:app", *ttl)
    async with actors.connect(redis_url, namespace=namespace, app=app, shards=4) as client:

        async def owners() -> set[str]:
            return {(await client.store.shard_info(s)).owner or "-" for s in range(4)}

        await eventually(lambda: _two_owners(owners))
        await client.send_many((Counter.ref(f"g-{i}"), Add()) for i in range(200))
        started = time.monotonic()
        leaving.signal(signal.SIGTERM)
        await eventually(lambda: _only(owners, staying.pid), timeout=5.5)
        handover = time.monotonic() - started
        assert leaving.proc.wait(10) == 0, "a drained worker exits cleanly"
        assert handover < 6, f"handed over after {handover:.2f}s: the leases were released, not expired"
        totals = [await client.ask(Counter.ref(f"g-{i}"), Get(), timeout=10) for i in range(200)]
        assert all(t.total == 1 for t in totals)


async def _two_owners(owners) -> bool:
    held = await owners()
    return "-" not in held and len(held) == 2


async def _only(owners, pid: int) -> bool:
    held = await owners()
    return len(held) == 1 and f"-{pid}-" in next(iter(held))

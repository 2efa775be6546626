"""A worker whose event loop is busy for longer than a lease's TTL keeps its shards (the
LeaseKeeper thread renews them), but not once the loop has been stuck past stall_limit."""

from __future__ import annotations

import asyncio
import time

from pydantic import BaseModel

import actors
from actors.lease import Lease
from actors.store import Store

from .conftest import eventually


class Block(BaseModel):
    seconds: float


_blocked: set[float] = set()
"""Each stall happens once: a turn re-run after losing its lease goes through."""


class Hog(actors.Actor):
    class State(BaseModel):
        runs: int = 0

    async def on_block(self, msg: Block) -> None:
        if msg.seconds not in _blocked:
            _blocked.add(msg.seconds)
            time.sleep(msg.seconds)  # noqa: ASYNC251 -- blocks the loop, as a burst of turns would
        self.state.runs += 1


app = actors.App(Hog)


async def _epoch(client: actors.Client) -> int:
    return int(await client.store.redis.get(client.store.keys.epoch(0)) or 0)


async def _run_blocking_turn(
    start_worker, connect, fast_settings, stall_limit: float, block: float
) -> tuple[int, int]:
    lease = actors.LeaseSettings(ttl=1.0, renew_interval=0.2, stall_limit=stall_limit)
    worker = await start_worker(app, fast_settings.model_copy(update={"shards": 1, "lease": lease}))
    async with connect(app=app, shards=1) as client:
        await eventually(lambda: worker.shards == [0])
        before = await _epoch(client)
        await client.ask(Hog.ref("h"), Block(seconds=block), timeout=60)
        await eventually(lambda: worker.shards == [0], timeout=10)
        assert (await client.state(Hog.ref("h"))).runs == 1
        return before, await _epoch(client)


async def test_a_busy_loop_keeps_its_leases(start_worker, connect, fast_settings) -> None:
    before, after = await _run_blocking_turn(start_worker, connect, fast_settings, stall_limit=10, block=2.5)
    assert after == before, "the lease outlived a 2.5 s stall of a 1 s TTL: no change of owner"


async def test_a_stuck_loop_lets_its_leases_go(start_worker, connect, fast_settings) -> None:
    before, after = await _run_blocking_turn(start_worker, connect, fast_settings, stall_limit=1.0, block=3.5)
    assert after > before, (
        "past stall_limit the keeper stopped renewing: the lease expired and was taken anew"
    )


async def test_the_keeper_renews_after_the_server_forgot_its_scripts(redis_url, namespace) -> None:
    """It sends its renewals packed, by script SHA: after a restart (or ``SCRIPT FLUSH``) it
    loads the script again and renews, and a lease held by another is reported lost."""
    store = Store.from_url(redis_url, namespace)
    try:
        keys, now = store.keys, time.monotonic()
        for shard in (0, 1, 2):
            await store.redis.set(keys.lease(shard), f"w|{shard + 1}", px=300)
        await store.redis.set(keys.lease(1), "other|9", px=300)
        leases = {shard: Lease.taken(shard, "w", shard + 1, 5.0, now - 4.9) for shard in (0, 1, 2)}
        lost: list[dict[int, Lease]] = []
        keeper = store.lease_keeper("w", 5000, 0.2, 10.0, lambda: leases, time.monotonic, lost.append)
        assert keeper is not None
        await store.redis.script_flush()
        await asyncio.to_thread(keeper._keep, leases, [], True)
        ttls = [await store.redis.pttl(keys.lease(shard)) for shard in (0, 1, 2)]
        assert ttls[0] > 1000 and ttls[2] > 1000 and ttls[1] <= 300, ttls
        assert [list(found) for found in lost] == [[1]]
        assert leases[0].remaining() > 1.0, "its deadline moved on (it was 0.1 s away)"
    finally:
        await store.close()

"""The journal is append-only: what a turn writes per step is that step's record (and a
small header), not the whole journal again, and nothing of it outlives the turn."""

from __future__ import annotations

import msgpack  # type: ignore[import-untyped]
import redis.asyncio as aioredis
from pydantic import BaseModel

import actors
from actors.keys import Keys
from actors.routing import route
from actors.store.cluster import each_primary
from tests.conftest import eventually, raw_redis

STEPS = 300
RESULT = 2048


class Loop(BaseModel):
    steps: int


class Looped(BaseModel):
    steps: int


async def tool_call(i: int) -> str:
    return f"{i:08d}" + "x" * (RESULT - 8)


class Agent(actors.Actor):
    class State(BaseModel):
        done: int = 0

    async def on_loop(self, msg: Loop) -> Looped:
        for i in range(msg.steps):
            result = await self.step(tool_call, i, name="tool")
            assert result.startswith(f"{i:08d}")
        self.state.done += 1
        return Looped(steps=msg.steps)


class Legacy(actors.Actor):
    class State(BaseModel):
        results: list[str] = []

    async def on_loop(self, msg: Loop) -> None:
        result = await self.step(tool_call, 0, name="tool")
        await self.sleep(0.01)
        self.state.results.append(result)


class Napper(actors.Actor):
    class State(BaseModel):
        results: list[str] = []

    async def on_loop(self, msg: Loop) -> None:
        results = [await self.step(small_call, i, name="small") for i in range(msg.steps)]
        await self.sleep(1.0)
        self.state.results = results


async def small_call(i: int) -> str:
    return f"r{i}"


app = actors.App(Agent, Legacy, Napper)


async def _input_bytes(r: aioredis.Redis) -> int:
    """Bytes the server (every primary of a cluster) has read from its clients."""
    return sum(int(stats["total_net_input_bytes"]) for stats in await each_primary(r, "INFO", "stats"))


async def test_bytes_written_per_step_are_that_steps_record(
    redis_url, namespace, connect, start_worker
) -> None:
    await start_worker(app)
    r = raw_redis(redis_url)
    try:
        async with connect(app=app) as client:
            await client.ask(Agent.ref("warm"), Loop(steps=1), timeout=20)
            before = await _input_bytes(r)
            done = await client.ask(Agent.ref("a"), Loop(steps=STEPS), timeout=60)
            written = await _input_bytes(r) - before
        assert done.steps == STEPS
        results = STEPS * RESULT
        # Rewriting the whole journal at every write sends ~STEPS/2 times the results
        # (about 90 MB here); appending sends each record once, plus a small header.
        assert written < 3 * results + 1_000_000, f"{written:,} bytes written for {results:,} of results"
        leftovers = [k async for k in r.scan_iter(f"{namespace}:*journal*")]
        assert leftovers == [], "a committed turn leaves no journal behind"
    finally:
        await r.aclose()


async def test_a_turn_written_whole_by_an_older_version_resumes(
    redis_url, namespace, connect, start_worker, fast_settings
) -> None:
    """An open turn in the one-blob form (version 2, before journal lists) is read, resumed
    and committed: its journaled step is replayed, not run, and it leaves no key behind."""
    shards = fast_settings.shards
    routed = route(app, Legacy.ref("old"), Loop(steps=1), shards, 1 << 20)
    aid, k = routed.envelope.actor_id, Keys(namespace)
    record = ["step", "tool", ["ok", "from the old journal"]]
    blob = msgpack.packb([2, routed.data, [record], None, 1, "", 1, []], use_bin_type=True)
    r = raw_redis(redis_url)
    try:
        await r.hset(k.turns(routed.shard), aid, b"1:" + blob)
        await r.zadd(k.timers(routed.shard), {aid: 1})  # its sleep is long due
        await start_worker(app)
        async with connect(app=app) as client:

            async def committed() -> bool:
                state = await client.state(Legacy.ref("old"))
                return state is not None and state.results == ["from the old journal"]

            await eventually(committed)
            assert (await client.inspect(Legacy.ref("old"))).turn is None
        assert [key async for key in r.scan_iter(f"{namespace}:*journal*")] == []
        assert not await r.hexists(k.turns(routed.shard), aid)
    finally:
        await r.aclose()


async def test_a_small_journal_lives_in_its_header_and_a_long_one_in_its_list(
    redis_url, namespace, connect, start_worker
) -> None:
    """A suspended turn with a few small records costs no key of its own (most sleeping or
    waiting workflows); one whose journal outgrows the header moves to its list."""
    await start_worker(app)
    k = Keys(namespace)
    r = raw_redis(redis_url)
    try:
        async with connect(app=app) as client:
            short, long = Napper.ref("short"), Napper.ref("long")
            await client.send(short, Loop(steps=3))
            await client.send(long, Loop(steps=200))
            for ref, listed in ((short, False), (long, True)):

                async def sleeping(ref: actors.ActorRef = ref) -> bool:
                    view = await client.inspect(ref)
                    return view.turn is not None and view.turn.status == "sleeping"

                await eventually(sleeping)
                view = await client.inspect(ref)
                assert view.turn is not None and view.turn.journal[-1] == "sleep"
                shard = view.shard
                assert bool(await r.exists(k.journal(shard, ref.id))) is listed
            for ref, steps in ((short, 3), (long, 200)):

                async def done(ref: actors.ActorRef = ref, steps: int = steps) -> bool:
                    state = await client.state(ref)
                    return state is not None and state.results == [f"r{i}" for i in range(steps)]

                await eventually(done)
        assert [key async for key in r.scan_iter(f"{namespace}:*journal*")] == []
    finally:
        await r.aclose()

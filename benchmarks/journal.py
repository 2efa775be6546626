"""``python -m benchmarks.journal``: the cost of a long turn's journal (issue #14).

One turn runs ``--steps`` journaled steps (default 10,000), each returning ``--result-bytes``
(default 2,048), in an in-process worker on a private server. It prints the bytes sent to
Redis per step (``total_net_input_bytes``, everything the server received during the turn,
divided by the steps) beside the step's own result size, and the time per step among the
first and the last 500 steps (the target is flat: a step's cost must not grow with the
journal). The floor, measured in the same run: one ``RPUSH`` of the same bytes per step,
awaited, which is what an append-only journal cannot beat.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel

import actors
from benchmarks.common import argument_parser, private_server, write_json


class Loop(BaseModel):
    steps: int
    result_bytes: int


class Timings(BaseModel):
    per_step_ms: list[float]


async def tool_call(i: int, size: int) -> str:
    return f"{i:08d}".ljust(size, "x")


class Agent(actors.Actor):
    async def on_loop(self, msg: Loop) -> Timings:
        times: list[float] = []
        for i in range(msg.steps):
            started = time.perf_counter()
            result: str = await self.step(tool_call, i, msg.result_bytes, name="tool")
            assert len(result) == msg.result_bytes
            times.append((time.perf_counter() - started) * 1000)
        return Timings(per_step_ms=times)


app = actors.App(Agent)


async def _input_bytes(r: aioredis.Redis) -> int:
    return int((await r.info("stats"))["total_net_input_bytes"])


async def floor(url: str, steps: int, size: int) -> dict[str, float]:
    """One awaited RPUSH of a step's bytes per step."""
    r = aioredis.from_url(url)
    key, value = f"floor:{uuid.uuid4().hex}", b"x" * size
    try:
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            await r.rpush(key, value)
            times.append((time.perf_counter() - started) * 1000)
        await r.delete(key)
    finally:
        await r.aclose()
    return {"ms_per_step": statistics.fmean(times)}


async def ours(url: str, steps: int, size: int, window: int) -> dict[str, Any]:
    namespace = f"bench{uuid.uuid4().hex[:8]}"
    redis = actors.RedisSettings(url=url, namespace=namespace)
    worker = actors.Worker(app, redis, actors.WorkerSettings(shards=1))
    task = asyncio.create_task(worker.run())
    r = aioredis.from_url(url)
    try:
        await asyncio.wait_for(worker.ready.wait(), 30)
        async with actors.connect(url, namespace=namespace, app=app, shards=1) as client:
            before = await _input_bytes(r)
            started = time.perf_counter()
            done = await client.ask(Agent.ref("a"), Loop(steps=steps, result_bytes=size), timeout=3600)
            elapsed = time.perf_counter() - started
            written = await _input_bytes(r) - before
    finally:
        worker.stop()
        await task
        await r.aclose()
    times = done.per_step_ms
    return {
        "bytes_per_step": written / steps,
        "result_bytes": size,
        "first_ms": statistics.median(times[:window]),
        "last_ms": statistics.median(times[-window:]),
        "ms_per_step": elapsed * 1000 / steps,
    }


async def main(args: argparse.Namespace) -> None:
    window = min(500, max(1, args.steps // 10))
    with private_server("journal") as run:
        base = await floor(run.url, args.steps, args.result_bytes)
        result = await ours(run.url, args.steps, args.result_bytes, window)
        header = run.machine_line()
    lines = [
        header,
        f"one turn of {args.steps:,} steps, each returning {args.result_bytes:,} bytes",
        f"  bytes sent to Redis per step: {result['bytes_per_step']:,.0f} "
        f"({result['bytes_per_step'] / args.result_bytes:.2f}x the step's result)",
        f"  median ms per step, first {window}: {result['first_ms']:.3f}; "
        f"last {window}: {result['last_ms']:.3f}",
        f"  mean ms per step: {result['ms_per_step']:.3f}; floor (one awaited RPUSH of the bytes): "
        f"{base['ms_per_step']:.3f} ({result['ms_per_step'] / base['ms_per_step']:.1f}x floor)",
    ]
    print("\n".join(lines))
    if args.json:
        write_json(args.json, {"header": lines, "results": {"ours": result, "floor": base}})


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argument_parser(__doc__)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--result-bytes", type=int, default=2048)
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))

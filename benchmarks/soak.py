"""``python -m benchmarks.soak``: many workflows run to the end with retention on (issue #14).

Each workflow is an ``Order`` actor of its own: a journaled step, a short durable sleep, a
wait for an approval (sent by the driver with the order), then its state is committed and
a ``Tally`` actor counts it. ``Order`` has a short retention (``--retention``), so the
state of every finished order is deleted once it has been idle that long. The driver keeps
at most ``--window`` orders unfinished, samples Redis's ``used_memory`` and each worker's
RSS as it goes, and at the end waits for retention to have deleted every finished order.

It prints Redis memory before (the workers running, idle), at its peak and after retention,
and the worker RSS over time: the targets are memory back to the starting level and an RSS
that is a flat line, not a ramp. The floor, measured in the same run: pipelined ``XADD`` of the same envelopes
(the rate Redis takes the orders' messages at, with no work done).

The default (1,000,000 workflows) fits in about 30 minutes on 2 cores; the suite's smoke
run uses ``--workflows 200``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel

import actors
from benchmarks.common import (
    SHARDS,
    Workers,
    argument_parser,
    private_server,
    wait_balanced,
    worker_argv,
    write_json,
)

RETENTION_S = float(os.environ.get("SOAK_RETENTION", "2.0"))
"""Read at import, so the worker processes (which import this module) see ``--retention``."""
TALLIES = 16


class Start(BaseModel):
    n: int


class Finished(BaseModel):
    pass


async def reserve(n: int) -> str:
    return f"reservation-{n}"


class Order(actors.Actor, retention=RETENTION_S):
    class State(BaseModel):
        reservation: str = ""
        approved: bool = False

    async def on_start(self, msg: Start) -> None:
        self.state.reservation = await self.step(reserve, msg.n)
        await self.sleep(0.05)
        approval = await self.wait_for(actors.Approval, timeout=600)
        self.state.approved = approval is not None and approval.approved
        await self.send(Tally.ref(str(msg.n % TALLIES)), Finished())


class Tally(actors.Actor):
    class State(BaseModel):
        finished: int = 0

    async def on_finished(self, msg: Finished) -> None:
        self.state.finished += 1


app = actors.App(Order, Tally)
APP_SPEC = "benchmarks.soak:app"


async def finished(client: actors.Client) -> int:
    states = [await client.state(Tally.ref(str(i))) for i in range(TALLIES)]
    return sum(s.finished for s in states if s is not None)


async def used_memory(r: aioredis.Redis) -> int:
    return int((await r.info("memory"))["used_memory"])


async def floor(url: str, n: int) -> float:
    """Pipelined XADD of ``n`` order envelopes, in batches of 500: msgs/s."""
    routed = actors.routing.route(app, Order.ref("floor"), Start(n=1), SHARDS, 1 << 20)
    r = aioredis.from_url(url)
    key = f"floor:{uuid.uuid4().hex}"
    try:
        started = time.perf_counter()
        for first in range(0, n, 500):
            async with r.pipeline(transaction=False) as pipe:
                for _ in range(min(500, n - first)):
                    pipe.xadd(key, {"e": routed.data})
                await pipe.execute()
        elapsed = time.perf_counter() - started
        await r.delete(key)
    finally:
        await r.aclose()
    return n / elapsed


class Samples:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.started = time.monotonic()

    async def take(self, r: aioredis.Redis, workers: Workers, done: int) -> dict[str, Any]:
        row = {"t": time.monotonic() - self.started, "done": done, "used_memory": await used_memory(r),
               "rss_mib": workers.rss_mib()}  # fmt: skip
        self.rows.append(row)
        return row


async def run(url: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    namespace = f"soak{uuid.uuid4().hex[:6]}"
    r = aioredis.from_url(url)
    env = {"SOAK_RETENTION": str(args.retention)}
    async with actors.connect(url, namespace=namespace, app=app, shards=SHARDS) as client:
        argv = worker_argv(APP_SPEC, url, namespace)
        workers = Workers.spawn(argv, args.processes, tmp / "workers.log", env=env)
        await wait_balanced(client, workers)
        before = await used_memory(r)  # the level to come back to: the workers running, idle
        samples = Samples()
        try:
            sent, done, next_sample = 0, 0, 0.0
            started = time.perf_counter()
            while done < args.workflows:
                workers.check_alive()
                room = min(args.window - (sent - done), args.workflows - sent, 1000)
                if room > 0:
                    batch: list[tuple[Any, BaseModel]] = []
                    for n in range(sent, sent + room):
                        ref = Order.ref(f"o{n}")
                        approval = actors.Approval(request_id=f"o{n}", approved=True)
                        batch += [(ref, Start(n=n)), (ref, approval)]
                    await client.send_many(batch)
                    sent += room
                else:
                    await asyncio.sleep(0.05)
                done = await finished(client)
                if time.monotonic() >= next_sample:
                    row = await samples.take(r, workers, done)
                    print(f"  .. {done:,} finished, used_memory {row['used_memory'] / 2**20:.1f} MiB, "
                          f"RSS {', '.join(f'{m:.0f}' for m in row['rss_mib'])} MiB", flush=True)  # fmt: skip
                    next_sample = time.monotonic() + args.sample_every
            elapsed = time.perf_counter() - started
            await samples.take(r, workers, done)
            retained = await wait_retained(r, namespace, args)
            await wait_trimmed(r, namespace)
            final = await samples.take(r, workers, done)
            leftovers = await key_kinds(r, namespace)
        finally:
            workers.stop()
        await r.aclose()
    memory = [row["used_memory"] for row in samples.rows]
    return {
        "workflows": args.workflows,
        "workflows_per_s": args.workflows / elapsed,
        "elapsed_s": elapsed,
        "used_memory_before": before,
        "used_memory_peak": max(memory),
        "used_memory_after": final["used_memory"],
        "retention_wait_s": retained,
        "rss_by_quarter_mib": rss_by_quarter(samples.rows, args.workflows),
        "keys_left": leftovers,
        "samples": samples.rows,
    }


def rss_by_quarter(rows: list[dict[str, Any]], n: int) -> list[float]:
    """The workers' summed RSS at the first sample past each quarter of the workflows."""
    marks = []
    for quarter in (0.25, 0.5, 0.75, 1.0):
        row = next((row for row in rows if row["done"] >= quarter * n), rows[-1])
        marks.append(sum(row["rss_mib"]))
    return marks


async def key_kinds(r: aioredis.Redis, namespace: str) -> dict[str, int]:
    """The namespace's keys left, counted by kind (the name after the shard's tag)."""
    kinds: dict[str, int] = {}
    async for key in r.scan_iter(f"{namespace}:*", count=1000):
        name = key.decode().split(":", 1)[1]
        kind = name.split("}:", 1)[1].split(":", 1)[0] if "}:" in name else name.split(":", 1)[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    return dict(sorted(kinds.items()))


async def wait_trimmed(r: aioredis.Redis, namespace: str, timeout: float = 30.0) -> None:
    """Until the inboxes are trimmed (the workers trim acked entries every few seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lengths = [await r.xlen(f"{namespace}:{{{s}}}:inbox") for s in range(SHARDS)]
        if max(lengths) <= 100:
            return
        await asyncio.sleep(0.5)


async def wait_retained(r: aioredis.Redis, namespace: str, args: argparse.Namespace) -> float:
    """Until no finished order keeps a state (retention ran everywhere); seconds waited."""
    started = time.monotonic()
    deadline = started + args.retention + 120
    while time.monotonic() < deadline:
        left = 0
        for s in range(SHARDS):
            left += await r.hlen(f"{namespace}:{{{s}}}:state")
        if left <= TALLIES:  # the tallies stay: they have no retention
            return time.monotonic() - started
        await asyncio.sleep(1.0)
    raise RuntimeError(f"retention did not delete the finished orders within {deadline - started:.0f} s")


async def main(args: argparse.Namespace) -> None:
    with private_server("soak") as server:
        floor_rate = await floor(server.url, min(args.workflows * 2, 100_000))
        result = await run(server.url, args, server.tmp)
        header = server.machine_line()
    mib = 2**20
    lines = [
        header,
        f"{args.workflows:,} workflows (a step, a 50 ms sleep, an approval), {args.processes} worker "
        f"processes, {SHARDS} shards, retention {args.retention:g} s, at most {args.window:,} unfinished",
        f"  {result['workflows_per_s']:,.0f} workflows/s ({2 * result['workflows_per_s']:,.0f} msgs/s sent); "
        f"floor: pipelined XADD of the messages {floor_rate:,.0f} msgs/s",
        f"  Redis used_memory: before {result['used_memory_before'] / mib:.1f} MiB, peak "
        f"{result['used_memory_peak'] / mib:.1f} MiB, "
        f"after retention {result['used_memory_after'] / mib:.1f} MiB "
        f"(retention done {result['retention_wait_s']:.0f} s after the last workflow)",
        "  worker RSS (sum) after each quarter of the workflows: "
        + " / ".join(f"{m:.0f}" for m in result["rss_by_quarter_mib"])
        + " MiB",
        "  keys left by kind: " + ", ".join(f"{k} {n:,}" for k, n in result["keys_left"].items()),
    ]
    print("\n".join(lines))
    if args.json:
        write_json(args.json, {"header": lines, "results": {**result, "floor_msgs_per_s": floor_rate}})


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argument_parser(__doc__)
    parser.add_argument("--workflows", type=int, default=1_000_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--window", type=int, default=5_000, help="unfinished workflows at most")
    parser.add_argument("--retention", type=float, default=2.0, help="seconds an order's state is kept")
    parser.add_argument("--sample-every", type=float, default=5.0)
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))

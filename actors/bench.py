"""``actors bench``: measure a deployment's Redis with real worker processes.

A fresh namespace (deleted afterwards), ``--actors`` counters and ``--messages``
increments: the producer sends in pipelined batches while ``--processes`` worker
processes drain them, exactly once; then sequential asks give latency percentiles.
Redis commands per message come from ``INFO commandstats`` before and after.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import BaseModel

from .actor import Actor, App
from .client import Client, connect
from .errors import ConfigurationError
from .settings import URL_ENV

BATCH = 1_000


class Inc(BaseModel):
    pass


class Read(BaseModel):
    pass


class Total(BaseModel):
    total: int


class BenchCounter(Actor):
    class State(BaseModel):
        total: int = 0

    async def on_inc(self, msg: Inc) -> None:
        self.state.total += 1

    async def on_read(self, msg: Read) -> Total:
        return Total(total=self.state.total)


app = App(BenchCounter)


@dataclass(frozen=True, slots=True)
class Result:
    messages: int
    actors: int
    processes: int
    seconds: float
    msgs_per_s: float
    send_msgs_per_s: float
    commands_per_message: float
    ask_p50_ms: float
    ask_p90_ms: float
    ask_p99_ms: float
    ask_p999_ms: float
    exactly_once: bool


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(url: str, actors: int, messages: int, processes: int, asks: int, progress: bool) -> Result:
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    workers = [_spawn(url, namespace) for _ in range(processes)]
    try:
        async with connect(url, namespace=namespace, app=app) as client:
            if processes > client.shards:
                raise ConfigurationError(f"--processes {processes} is more than the {client.shards} shards")
            await _wait_for_workers(client, processes, workers)
            before = await _commands(client)
            started = time.perf_counter()
            for first in range(0, messages, BATCH):
                count = min(BATCH, messages - first)
                await client.send_many(
                    [(BenchCounter.ref(f"c{(first + i) % actors}"), Inc()) for i in range(count)]
                )
            sent = time.perf_counter()
            await _until_handled(client, messages, started, progress)
            seconds = time.perf_counter() - started
            commands = await _commands(client) - before
            totals = [s.total if s else 0 for s in await _states(client, actors)]
            latencies = await _asks(client, actors, asks)
    finally:
        for proc in workers:
            proc.terminate()
        for proc in workers:
            proc.wait(timeout=30)
        # Only once the workers are gone: a worker still running would write keys again.
        async with connect(url, namespace=namespace, record_shards=False) as cleaner:
            await cleaner.store.drop_namespace()
    p50, p90, p99, p999 = (round(percentile(latencies, q), 3) for q in (0.5, 0.9, 0.99, 0.999))
    return Result(
        messages, actors, processes, round(seconds, 3), round(messages / seconds),
        round(messages / (sent - started)), round(commands / messages, 2),
        p50, p90, p99, p999,
        exactly_once=sum(totals) == messages,
    )  # fmt: skip


def _spawn(url: str, namespace: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "actors.cli", "--log-level", "WARNING", "worker", "actors.bench:app",
            "--namespace", namespace]  # fmt: skip
    # The URL (its password) in the environment: a command line is readable by every local user.
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, env={**os.environ, URL_ENV: url})


async def _wait_for_workers(client: Client, processes: int, workers: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 60
    while True:
        owners = {(await client.store.shard_info(s)).owner for s in range(client.shards)}
        if None not in owners and len(owners) == processes:
            return
        exited = [p.returncode for p in workers if p.poll() is not None]
        if exited or time.monotonic() > deadline:
            raise ConfigurationError(
                f"the worker processes did not start (exit codes {exited})"
                if exited
                else f"{processes} workers did not share the shards within 60 s"
            )
        await asyncio.sleep(0.1)


async def _until_handled(client: Client, messages: int, started: float, progress: bool) -> None:
    while True:
        infos = [await client.store.shard_info(s) for s in range(client.shards)]
        done = sum(i.read - i.pending for i in infos)
        if progress:
            bar = "#" * int(40 * min(done, messages) / messages)
            rate = done / max(time.perf_counter() - started, 1e-9)
            print(f"\r[{bar:<40}] {done:>{len(str(messages))}}/{messages} {rate:,.0f} msgs/s",
                  end="", file=sys.stderr, flush=True)  # fmt: skip
        if done >= messages and all(i.pending == 0 and not i.lag for i in infos):
            if progress:
                print(file=sys.stderr)
            return
        await asyncio.sleep(0.2)


async def _commands(client: Client) -> int:
    stats: dict[str, Any] = await client.store.redis.info("commandstats")
    return sum(int(v["calls"]) for v in stats.values())


async def _states(client: Client, actors: int) -> list[Any]:
    return list(await asyncio.gather(*(client.state(BenchCounter.ref(f"c{n}")) for n in range(actors))))


async def _asks(client: Client, actors: int, asks: int) -> list[float]:
    samples = []
    for n in range(asks):
        began = time.perf_counter()
        await client.ask(BenchCounter.ref(f"c{n % actors}"), Read(), timeout=30)
        samples.append((time.perf_counter() - began) * 1000)
    return sorted(samples)


def report(result: Result, as_json: bool) -> str:
    if as_json:
        return json.dumps(asdict(result), indent=2)
    rows = [
        ("messages", f"{result.messages:,} to {result.actors:,} actors, {result.processes} worker processes"),
        ("throughput", f"{result.msgs_per_s:,.0f} msgs/s end to end ({result.seconds:.2f} s)"),
        ("producer", f"{result.send_msgs_per_s:,.0f} msgs/s (send_many, batches of {BATCH})"),
        ("redis commands", f"{result.commands_per_message:.2f} per message (INFO commandstats)"),
        ("ask round trip", f"p50 {result.ask_p50_ms:.2f} ms  p90 {result.ask_p90_ms:.2f}  "
                           f"p99 {result.ask_p99_ms:.2f}  p99.9 {result.ask_p999_ms:.2f}"),
        ("exactly once", "yes: every increment counted once" if result.exactly_once else "NO: totals differ"),
    ]  # fmt: skip
    return "\n".join(f"{name:<16} {value}" for name, value in rows)

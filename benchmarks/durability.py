"""The cost of each durability level, beside the raw Redis floor measured in the same run.

    python -m benchmarks.durability [--messages 20000] [--actors 1000] [--sends 2000]
                                    [--asks 500] [--rounds 1] [--json PATH]

Each level runs on servers of its own, started on free loopback ports in a temporary
directory and stopped at the end:

* ``everysec`` one server, AOF with ``appendfsync everysec`` (the default level, today's);
* ``fsync`` one server with ``appendfsync always``, which the level needs (``DurabilityStore``
  refuses ``everysec``: there WAITAOF is answered before the fsync);
* ``replica`` an ``everysec`` primary and one replica of it, on this same machine.

Per level, in fresh namespaces recorded with the level, with ``--shards 16`` and one real
worker process (``python -m actors.cli worker``):

* ``floor`` plain redis-py: ``--sends`` awaited ``XADD``s one at a time, alone, and each in one
  pipeline with the level's wait (``WAITAOF 1 0`` for fsync, ``WAIT 1`` for replica): msgs/s and
  the p50 / p99 of one;
* ``drain`` a backlog of ``--messages`` increments to ``--actors`` Count actors (written with
  ``send_many`` while no worker runs), timed from the worker's first lease until committed;
* ``send_many`` the worker running, one producer sending chunks of 500, timed until committed;
* ``send`` ``--sends`` awaited ``client.send`` one at a time: p50 / p99 of one;
* ``ask`` ``--asks`` awaited ``client.ask`` one at a time (a turn's commit and its reply):
  p50 / p99 of one round trip.

Also measured: what WAITAOF does with ``appendfsync everysec`` on the everysec server (its
latency: the next server cron tick, when its AOF is fsynced once a second).

After each level every actor's total must be the increments sent to it (exactly-once). With
``--rounds R`` rates are medians of R runs (each run's beside it) and latencies are taken over
all R runs' samples.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

import actors

from .common import (
    SHARDS,
    Workers,
    argument_parser,
    lease_owners,
    load_average,
    median_of,
    scratch_dir,
    worker_argv,
)
from .common import write_json as write_json_file
from .latency import percentile
from .throughput import (
    APP_SPEC,
    BODY_BYTES,
    Count,
    Inc,
    all_leased,
    app,
    poll_until,
    send_chunks,
    wait_committed,
)

LEVELS = ("everysec", "fsync", "replica")
CHUNK = 500
STALL_S = 60.0
EVERYSEC_WAITAOF_SAMPLES = 20
"""WAITAOFs timed on the everysec server: each takes about a server cron period (100 ms)."""


@dataclass
class Figures:
    """One level's figures over the rounds."""

    rates: dict[str, list[float]] = field(default_factory=dict)
    """msgs/s per measurement, one per round."""
    latencies: dict[str, list[float]] = field(default_factory=dict)
    """ms per operation, every sample of every round."""

    def rate(self, key: str, value: float) -> None:
        self.rates.setdefault(key, []).append(value)

    def samples(self, key: str, values: Sequence[float]) -> None:
        self.latencies.setdefault(key, []).extend(values)

    def summary(self) -> dict[str, Any]:
        rates = {k: {"msgs_per_s": median_of(v, float)[0], "runs": v} for k, v in self.rates.items()}
        lat = {}
        for key, values in self.latencies.items():
            ordered = sorted(values)
            lat[key] = {
                "p50_ms": percentile(ordered, 50),
                "p99_ms": percentile(ordered, 99),
                "n": len(values),
            }
        return {"rates": rates, "latency": lat}


# ---- servers ---------------------------------------------------------------------------------
@dataclass
class Deployment:
    """The servers of one level: where clients and workers connect, and the wait it adds."""

    level: str
    url: str
    servers: list[actors.EmbeddedServer]

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()


async def start_deployment(level: str, tmp: Path) -> Deployment:
    if level == "fsync":
        server = actors.EmbeddedServer(tmp / "fsync", appendfsync="always").start()
        return Deployment(level, server.url, [server])
    primary = actors.EmbeddedServer(tmp / f"{level}-primary").start()
    if level == "everysec":
        return Deployment(level, primary.url, [primary])
    deployment = Deployment(level, primary.url, [primary])
    try:
        deployment.servers.append(actors.EmbeddedServer(tmp / f"{level}-replica").start())
        await follow(deployment.servers[1], primary)
    except BaseException:
        deployment.stop()
        raise
    return deployment


async def follow(replica: actors.EmbeddedServer, primary: actors.EmbeddedServer) -> None:
    """Make ``replica`` a replica of ``primary`` and wait until it has synced."""
    p, r = aioredis.Redis.from_url(primary.url), aioredis.Redis.from_url(replica.url)
    try:
        await p.config_set("repl-diskless-sync-delay", 0)
        await r.config_set("masterauth", primary.password)
        await r.replicaof("127.0.0.1", primary.port)
        deadline = time.monotonic() + 60
        while (await r.info("replication")).get("master_link_status") != "up":
            if time.monotonic() > deadline:
                raise RuntimeError("the replica did not sync within 60 s")
            await asyncio.sleep(0.05)
    finally:
        await p.aclose()
        await r.aclose()


# ---- the floor -----------------------------------------------------------------------------------
def wait_command(level: str) -> tuple[Any, ...] | None:
    return {"fsync": ("WAITAOF", 1, 0, 5000), "replica": ("WAIT", 1, 5000)}.get(level)


async def floor(url: str, level: str, n: int, figures: Figures, stream: str | None = None) -> None:
    """Awaited XADDs alone, then each with the level's wait in one pipeline, to ``stream`` (a
    new key by default) on the one server at ``url``."""
    r = aioredis.Redis.from_url(url)
    body = b"x" * BODY_BYTES
    try:
        for key, command in (("floor_xadd", None), ("floor_xadd_wait", wait_command(level))):
            if key == "floor_xadd_wait" and command is None:
                continue
            times = await _timed_xadds(r, stream or f"floor:{uuid.uuid4().hex[:6]}", body, n, command)
            figures.samples(key, times)
            figures.rate(key, n / (sum(times) / 1000))
    finally:
        await r.aclose()


async def _timed_xadds(
    r: aioredis.Redis, key: str, body: bytes, n: int, wait: tuple[Any, ...] | None
) -> list[float]:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        if wait is None:
            await r.xadd(key, {"e": body})
        else:
            async with r.pipeline(transaction=False) as pipe:
                pipe.xadd(key, {"e": body})
                pipe.execute_command(*wait)
                _, acknowledged = await pipe.execute()
            if (acknowledged[0] if isinstance(acknowledged, list) else acknowledged) < 1:
                raise RuntimeError(f"{wait[0]} was not acknowledged: {acknowledged}")
        times.append((time.perf_counter() - started) * 1000)
    return times


async def everysec_waitaof(url: str) -> dict[str, float]:
    """What WAITAOF 1 0 does on a server with ``appendfsync everysec``: its latency, one at a time."""
    r = aioredis.Redis.from_url(url)
    try:
        times = []
        for _ in range(EVERYSEC_WAITAOF_SAMPLES):
            started = time.perf_counter()
            async with r.pipeline(transaction=False) as pipe:
                pipe.xadd("floor:everysec-waitaof", {"e": b"x"})
                pipe.execute_command("WAITAOF", 1, 0, 5000)
                await pipe.execute()
            times.append((time.perf_counter() - started) * 1000)
        hz = (await r.config_get("hz")).get("hz")
    finally:
        await r.aclose()
    ordered = sorted(times)
    return {"p50_ms": percentile(ordered, 50), "max_ms": ordered[-1], "hz": float(hz or 0)}


# ---- ours ----------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def namespace(url: str, level: str) -> AsyncIterator[actors.Client]:
    ns = f"dur-{level}-{uuid.uuid4().hex[:6]}"
    async with actors.connect(url, namespace=ns, app=app, shards=SHARDS, durability=level) as client:
        yield client


async def drain(url: str, level: str, tmp: Path, n: int, actor_count: int, figures: Figures) -> None:
    async with namespace(url, level) as client:
        await send_chunks(client, n, actor_count, 1_000)
        ns = client.store.keys.namespace
        workers = Workers.spawn(worker_argv(APP_SPEC, url, ns), 1, tmp / f"{ns}.log")
        try:

            async def any_lease() -> bool:
                return any(await lease_owners(client))

            first = await poll_until(any_lease, workers, 60, "a first lease")
            done = await wait_committed(client, workers, STALL_S)
            await check_sum(client, n, actor_count)
        finally:
            workers.stop()
    figures.rate("drain", n / (done - first))


async def live(url: str, level: str, tmp: Path, args: argparse.Namespace, figures: Figures) -> None:
    """send_many, then awaited sends, then asks, with one worker running."""
    n, actor_count = args.messages, args.actors
    async with namespace(url, level) as client:
        ns = client.store.keys.namespace
        workers = Workers.spawn(worker_argv(APP_SPEC, url, ns), 1, tmp / f"{ns}.log")
        try:
            await all_leased(client, workers)
            started = time.perf_counter()
            await send_chunks(client, n, actor_count, CHUNK)
            done = await wait_committed(client, workers, STALL_S)
            figures.rate("send_many", n / (done - started))
            figures.samples(
                "send", await timed(args.sends, lambda i: client.send(ref(i, actor_count), Inc()))
            )
            figures.samples(
                "ask", await timed(args.asks, lambda i: client.ask(ref(i, actor_count), Inc(), timeout=30))
            )
            await wait_committed(client, workers, STALL_S)
            await check_sum(client, n + args.sends + args.asks, actor_count)
        finally:
            workers.stop()


def ref(i: int, actor_count: int) -> actors.ActorRef[Any]:
    return Count.ref(f"c{i % actor_count}")


async def timed(n: int, call: Any) -> list[float]:
    times = []
    for i in range(n):
        started = time.perf_counter()
        await call(i)
        times.append((time.perf_counter() - started) * 1000)
    return times


async def check_sum(client: actors.Client, expected: int, actor_count: int) -> None:
    """Exactly once: the actors' totals add up to the increments sent, and nothing was dead-lettered."""
    total = 0
    for first in range(0, actor_count, 200):
        refs = [Count.ref(f"c{i}") for i in range(first, min(actor_count, first + 200))]
        total += sum(s.total for s in await asyncio.gather(*map(client.state, refs)) if s is not None)
    dead = sum([(await client.store.shard_info(s)).dead_letters for s in range(SHARDS)])
    if total != expected or dead:
        raise RuntimeError(f"exactly-once check FAILED: totals {total} != {expected}, {dead} dead letters")


async def rounds(
    url: str, level: str, tmp: Path, args: argparse.Namespace, floor_at: tuple[str, str | None] | None = None
) -> Figures:
    """``args.rounds`` times the floor, drain and live runs of one level at ``url``. The floor
    runs on the server at ``url``, or at ``floor_at``'s URL on its stream (on a cluster: a
    primary and a key it serves)."""
    figures = Figures()
    floor_url, stream = floor_at or (url, None)
    for _ in range(args.rounds):
        await floor(floor_url, level, args.sends, figures, stream)
        await drain(url, level, tmp, args.messages, args.actors, figures)
        await live(url, level, tmp, args, figures)
    return figures


async def measure(level: str, tmp: Path, args: argparse.Namespace) -> tuple[Figures, dict[str, float] | None]:
    deployment = await start_deployment(level, tmp)
    waitaof = None
    try:
        figures = await rounds(deployment.url, level, tmp, args)
        if level == "everysec":
            waitaof = await everysec_waitaof(deployment.url)
    finally:
        deployment.stop()
    return figures, waitaof


# ---- report ---------------------------------------------------------------------------------------
def server_version() -> str:
    from actors.server_files import find_binary, version_of

    return version_of(find_binary()).split(" sha=")[0]


def table(results: dict[str, dict[str, Any]]) -> list[str]:
    def lat(level: str, key: str) -> str:
        found = results[level]["latency"].get(key)
        return f"{found['p50_ms']:.2f} / {found['p99_ms']:.2f}" if found else "-"

    def rate(level: str, key: str) -> str:
        found = results[level]["rates"].get(key)
        if not found:
            return "-"
        runs = found["runs"]
        spread = f" ({' / '.join(f'{v:,.0f}' for v in sorted(runs))})" if len(runs) > 1 else ""
        return f"{found['msgs_per_s']:,.0f}{spread}"

    head = f"{'level':<9} {'floor XADD':>15} {'floor +wait':>15} {'send':>15} {'ask':>15}"
    lines = [head + f" {'send_many msgs/s':>18} {'drain msgs/s':>14}", "-" * 108]
    for level in results:
        cells = [lat(level, k) for k in ("floor_xadd", "floor_xadd_wait", "send", "ask")]
        lines.append(
            f"{level:<9} " + " ".join(f"{c:>15}" for c in cells)
            + f" {rate(level, 'send_many'):>18} {rate(level, 'drain'):>14}"
        )  # fmt: skip
    lines.append("(latencies: p50 / p99 ms of one operation, awaited one at a time)")
    return lines


async def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--messages", type=int, default=20_000, help="N for drain and send_many")
    parser.add_argument("--actors", type=int, default=1_000, help="Count actors the messages go to")
    parser.add_argument("--sends", type=int, default=2_000, help="awaited sends (and floor XADDs) timed")
    parser.add_argument("--asks", type=int, default=500, help="awaited asks timed")
    parser.add_argument("--rounds", type=int, default=1, help="repeat each level; rates are medians")
    parser.add_argument("--levels", nargs="*", default=list(LEVELS), choices=LEVELS)
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)

    load_before = load_average()
    results: dict[str, dict[str, Any]] = {}
    waitaof: dict[str, float] | None = None
    with scratch_dir("durability") as tmp:
        for level in args.levels:
            figures, found = await measure(level, tmp, args)
            results[level] = figures.summary()
            waitaof = found or waitaof

    header = [
        f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, {server_version()}, loopback, "
        f"one worker process, {SHARDS} shards; load average before {load_before}, after {load_average()}",
        f"{args.actors} Count actors; {args.messages} messages for drain and send_many, {args.sends} sends, "
        f"{args.asks} asks; rounds: {args.rounds}; exactly-once checked after each",
        "servers: everysec = appendfsync everysec; fsync = appendfsync always (+ WAITAOF 1 0); "
        "replica = everysec primary + 1 replica on this machine (+ WAIT 1)",
    ]
    lines = [*header, "", *table(results)]
    if waitaof is not None:
        lines += [
            "",
            f"WAITAOF 1 0 on the everysec server (hz {waitaof['hz']:.0f}): p50 {waitaof['p50_ms']:.1f} ms, "
            f"max {waitaof['max_ms']:.1f} ms: answered at the next server cron tick, not after an fsync "
            "(fsynced once a second)",
        ]
    print("\n".join(lines))
    if args.json:
        write_json_file(args.json, {"header": header, "results": results, "everysec_waitaof": waitaof})


if __name__ == "__main__":
    asyncio.run(main())

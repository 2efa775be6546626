"""Failover: time from SIGKILL (or SIGTERM) of a worker to the first completed turn of one
of its actors on a survivor. Prints p50/p99/max with the lease settings used.

    python -m benchmarks.failover [--kills 20] [--lease-ttl 2.0] [--renew-interval 0.5]

Runs on a private server it starts and stops itself, with two real worker processes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import actors
from actors.routing import shard_of
from tests.apps import Counter, Get, app

from .common import Workers, lease_owners, private_server, wait_balanced, worker_argv, write_json

SHARDS = 8


def spawn(url: str, ns: str, args: argparse.Namespace, log: Path, count: int = 1) -> Workers:
    extra = ["--lease-ttl", str(args.lease_ttl), "--renew-interval", str(args.renew_interval)]
    return Workers.spawn(worker_argv("tests.apps:app", url, ns, shards=SHARDS, extra_args=extra), count, log)


async def one_failover(client: actors.Client, workers: Workers, n: int, sig: signal.Signals,
                       spawn_again: Callable[[], Workers], balance_timeout: float) -> float:  # fmt: skip
    procs = workers.procs
    victim = procs[n % 2]
    held = await lease_owners(client, SHARDS)
    shard = next(s for s, o in enumerate(held) if o and f"-{victim.pid}-" in o)
    key = next(k for k in (f"f{n}-{i}" for i in range(10_000)) if shard_of(f"Counter/{k}", SHARDS) == shard)
    await client.ask(Counter.ref(key), Get(), timeout=10)  # activate it on the victim
    started = time.perf_counter()
    victim.send_signal(sig)
    await client.ask(Counter.ref(key), Get(), timeout=30)
    elapsed = time.perf_counter() - started
    victim.wait()
    procs[n % 2] = spawn_again().procs[0]
    await wait_balanced(client, workers, shards=SHARDS, timeout=balance_timeout)
    return elapsed


def summary(name: str, samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return (f"{name:<10} n={len(samples):<3} p50={statistics.median(samples) * 1000:7.0f} ms  "
            f"p99={p99 * 1000:7.0f} ms  max={ordered[-1] * 1000:7.0f} ms")  # fmt: skip


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--terms", type=int, default=10)
    parser.add_argument("--lease-ttl", type=float, default=actors.LeaseSettings().ttl)
    parser.add_argument("--renew-interval", type=float, default=actors.LeaseSettings().renew_interval)
    parser.add_argument("--json", type=Path, help="also write the samples (seconds) as JSON here")
    args = parser.parse_args(argv)
    ns = "failover"
    with private_server("failover") as run:
        log = run.tmp / "w.log"
        workers = spawn(run.url, ns, args, log, count=2)
        # A replacement gets its share once the victim's lease and membership have expired.
        timeout = 60 + 10 * args.lease_ttl
        try:
            async with actors.connect(run.url, namespace=ns, app=app, shards=SHARDS) as client:
                await wait_balanced(client, workers, shards=SHARDS, timeout=timeout)
                kills = [await one_failover(client, workers, n, signal.SIGKILL,
                                            lambda: spawn(run.url, ns, args, log), timeout)
                         for n in range(args.kills)]  # fmt: skip
                terms = [await one_failover(client, workers, n, signal.SIGTERM,
                                            lambda: spawn(run.url, ns, args, log), timeout)
                         for n in range(args.terms)]  # fmt: skip
        finally:
            for p in workers.procs:
                p.kill()
    print(f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{run.name}, AOF everysec")  # fmt: skip
    print(f"lease ttl {args.lease_ttl}s, renew every {args.renew_interval}s, {SHARDS} shards, 2 workers")
    print(summary("SIGKILL", kills))
    print(summary("SIGTERM", terms))
    if args.json:
        settings = {"lease_ttl": args.lease_ttl, "renew_interval": args.renew_interval, "shards": SHARDS}
        write_json(args.json, {"settings": settings, "sigkill_s": kills, "sigterm_s": terms}, announce=False)


if __name__ == "__main__":
    asyncio.run(main())

"""Failover: time from SIGKILL (or SIGTERM) of a worker to the first completed turn of one
of its actors on a survivor. Prints p50/p99/max with the lease settings used.

    python -m benchmarks.failover [--kills 20] [--lease-ttl 2.0] [--renew-interval 0.5]

Runs on a private server it starts and stops itself, with two real worker processes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import actors
from actors.routing import shard_of
from tests.apps import Counter, Get, app

ROOT = Path(__file__).resolve().parent.parent
SHARDS = 8


def spawn(url: str, ns: str, args: argparse.Namespace, log: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "actors.cli", "--log-level", "WARNING", "worker", "tests.apps:app",
            "--redis", url, "--namespace", ns, "--shards", str(SHARDS),
            "--lease-ttl", str(args.lease_ttl), "--renew-interval", str(args.renew_interval)]  # fmt: skip
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=out, stderr=out
        )


async def owners(client: actors.Client) -> dict[int, str]:
    return {s: (await client.store.shard_info(s)).owner or "" for s in range(SHARDS)}


async def balanced(client: actors.Client, procs: list[subprocess.Popen[bytes]]) -> None:
    while True:
        held = await owners(client)
        if all(any(f"-{p.pid}-" in o for o in held.values()) for p in procs) and all(held.values()):
            return
        await asyncio.sleep(0.05)


async def one_failover(client: actors.Client, procs: list[subprocess.Popen[bytes]], n: int,
                       sig: signal.Signals, spawn_again: object) -> float:  # fmt: skip
    victim = procs[n % 2]
    held = await owners(client)
    shard = next(s for s, o in held.items() if f"-{victim.pid}-" in o)
    key = next(k for k in (f"f{n}-{i}" for i in range(10_000)) if shard_of(f"Counter/{k}", SHARDS) == shard)
    await client.ask(Counter.ref(key), Get(), timeout=10)  # activate it on the victim
    started = time.perf_counter()
    victim.send_signal(sig)
    await client.ask(Counter.ref(key), Get(), timeout=30)
    elapsed = time.perf_counter() - started
    victim.wait()
    procs[n % 2] = spawn_again()  # type: ignore[operator]
    await balanced(client, procs)
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
    tmp = Path(tempfile.mkdtemp(prefix="actors-failover-"))
    server = actors.EmbeddedServer(tmp / "redis").start()
    ns = "failover"
    procs = [spawn(server.url, ns, args, tmp / "w.log") for _ in range(2)]
    try:
        async with actors.connect(server.url, namespace=ns, app=app, shards=SHARDS) as client:
            await balanced(client, procs)
            kills = [await one_failover(client, procs, n, signal.SIGKILL,
                                        lambda: spawn(server.url, ns, args, tmp / "w.log"))
                     for n in range(args.kills)]  # fmt: skip
            terms = [await one_failover(client, procs, n, signal.SIGTERM,
                                        lambda: spawn(server.url, ns, args, tmp / "w.log"))
                     for n in range(args.terms)]  # fmt: skip
    finally:
        for p in procs:
            p.kill()
        server.stop()
    print(f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"server {Path(server.binary or 'valkey-server').name}, AOF everysec")  # fmt: skip
    print(f"lease ttl {args.lease_ttl}s, renew every {args.renew_interval}s, {SHARDS} shards, 2 workers")
    print(summary("SIGKILL", kills))
    print(summary("SIGTERM", terms))
    if args.json:
        settings = {"lease_ttl": args.lease_ttl, "renew_interval": args.renew_interval, "shards": SHARDS}
        args.json.write_text(
            json.dumps({"settings": settings, "sigkill_s": kills, "sigterm_s": terms}, indent=2)
        )


if __name__ == "__main__":
    asyncio.run(main())

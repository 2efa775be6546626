"""Throughput: our messages per second next to the raw Redis floor, measured in the same run
on the same server.

    python -m benchmarks.throughput [--messages 50000] [--actors 1000] [--awaited-messages 5000]
                                    [--drain-processes 1,2] [--e2e-processes 1] [--rounds 3]
                                    [--json PATH]

Everything runs on a private server (AOF on, fsync every second) that this command starts on a
free loopback port in a temporary directory and stops at the end. Each measurement of ours uses
a fresh namespace, ``--shards 16`` and real worker processes (``python -m actors.cli worker``).

The floor is plain redis-py asyncio (hiredis parser) on keys of its own, with bodies the size
of one of our envelopes:

* ``floor 1a`` one awaited ``XADD`` at a time;
* ``floor 1b`` ``XADD`` in pipelines of 100;
* ``floor 1c`` ``XREADGROUP COUNT 100`` from a full stream, then per message one ``EVALSHA``
  of a script that does ``XACK`` and, if it acked, ``HSET`` of the actor's new total;
* ``floor 1d`` the same with one ``EVALSHA`` per batch of 100 messages.
* ``floor 1e`` end to end, the floor of ``e2e awaited``: one awaited ``XADD`` at a time
  (``--awaited-messages``) while a consumer *process* does 1d's work as the entries come
  (``XREADGROUP COUNT 100 BLOCK``, one ``EVALSHA`` per batch); timed from the first ``XADD``
  until the consumer has acked the last entry. Like ours, it shares the cores with its
  consumer, which 1a does not.

Ours:

* ``drain`` the backlog of ``--messages`` increments to ``--actors`` Count actors, written
  with ``send_many`` (chunks of 1,000) while no worker runs; timed from the first shard lease
  a worker takes (so process start-up is left out; it is printed separately) until every
  inbox has no lag and nothing pending. With 1 and with 2 worker processes started together
  (``--drain-processes``, e.g. ``1,2,3``); the note gives the shards each held at the end.
* ``e2e pipelined`` workers running, one producer sending ``send_many`` chunks of 500;
  timed from the first send until all are committed.
* ``e2e awaited`` the same with one awaited ``client.send`` at a time (``--awaited-messages``);
  compared with 1e (the issue's "producer-bound rate" of the floor) and with 1a.

After each run of ours every actor's state is read back and must hold exactly the number of
increments sent to it (exactly-once); the floor consumers are checked the same way.

``--rounds R`` (default 3) repeats everything R times and reports each measurement's median
run with every run's figure beside it (the spread; all samples go to ``--json``): on a shared
machine single runs vary by 2x or more.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import redis.asyncio as aioredis
from pydantic import BaseModel

import actors
from actors.keys import GROUP

from .common import (
    ROOT,
    SHARDS,
    Workers,
    argument_parser,
    child_env,
    lease_owners,
    median_of,
    private_server,
    worker_argv,
    write_json,
)

BODY_BYTES = 58
"""The size of one encoded ``Inc`` envelope to a ``Count`` actor: the floor writes as much."""
PREFILL_CHUNK = 1_000
E2E_CHUNK = 500
FLOOR_BATCH = 100
FLOOR_CONSUMER_CMD = "_floor_consumer"
POLL_S = 0.02
STALL_S = 30.0
"""Give up when nothing commits for this long."""


# ---- the actor the workers run --------------------------------------------------------
class Inc(BaseModel):
    by: int = 1


class Count(actors.Actor):
    class State(BaseModel):
        total: int = 0

    async def on_inc(self, msg: Inc) -> None:
        self.state.total += msg.by


app = actors.App(Count)
APP_SPEC = "benchmarks.throughput:app"


# ---- results --------------------------------------------------------------------------
@dataclass(frozen=True)
class Result:
    key: str
    name: str
    messages: int
    seconds: float
    note: str = ""

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else float("inf")


def expected_totals(messages: int, actor_count: int) -> list[int]:
    """Message i goes to actor i % actor_count."""
    return [messages // actor_count + (1 if i < messages % actor_count else 0) for i in range(actor_count)]


# ---- the raw floor ----------------------------------------------------------------------
ACK_ONE = """
-- KEYS: state hash, stream. ARGV: group, entry id, field, value.
if redis.call('XACK', KEYS[2], ARGV[1], ARGV[2]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
  return 1
end
return 0
"""

ACK_MANY = """
-- KEYS: state hash, stream. ARGV: group, then (entry id, field, value) per message.
local acked = 0
for i = 2, #ARGV, 3 do
  if redis.call('XACK', KEYS[2], ARGV[1], ARGV[i]) == 1 then
    redis.call('HSET', KEYS[1], ARGV[i + 1], ARGV[i + 2])
    acked = acked + 1
  end
end
return acked
"""


def floor_body(i: int, actor_count: int) -> bytes:
    return f"c{i % actor_count}|".encode().ljust(BODY_BYTES, b".")


async def floor_produce(r: aioredis.Redis, key: str, n: int, actor_count: int) -> float:
    started = time.perf_counter()
    for i in range(n):
        await r.xadd(key, {"e": floor_body(i, actor_count)})
    return time.perf_counter() - started


async def floor_produce_pipelined(
    r: aioredis.Redis, key: str | Sequence[str], n: int, actor_count: int
) -> float:
    """``n`` XADDs in pipelines of FLOOR_BATCH; to ``key``, or entry i to ``key[i % len(key)]``."""
    keys = [key] if isinstance(key, str) else key
    started = time.perf_counter()
    for first in range(0, n, FLOOR_BATCH):
        async with r.pipeline(transaction=False) as pipe:
            for i in range(first, min(n, first + FLOOR_BATCH)):
                pipe.xadd(keys[i % len(keys)], {"e": floor_body(i, actor_count)})
            await pipe.execute()
    return time.perf_counter() - started


async def floor_consume(
    r: aioredis.Redis, stream: str, state: str, n: int, batched: bool, block_ms: int | None = None
) -> float:
    """Consume ``n`` entries (group ``GROUP``, made by the caller) of a full stream, or with
    ``block_ms`` of a stream still being written; returns the seconds taken."""
    sha = await r.script_load(ACK_MANY if batched else ACK_ONE)
    totals: dict[bytes, int] = {}
    done = 0
    started = time.perf_counter()
    while done < n:
        # RESP2: [[stream, [(entry id, {field: value}), ...]]] (redis-py declares a RESP3 shape)
        reply: Any = await r.xreadgroup(GROUP, "c", {stream: ">"}, count=FLOOR_BATCH, block=block_ms)
        if not reply and block_ms is not None:
            continue
        if not reply:
            raise RuntimeError(f"floor consumer: stream {stream} ran dry after {done} of {n}")
        args: list[bytes | str | int] = [GROUP]
        for entry_id, fields in reply[0][1]:
            actor = fields[b"e"].partition(b"|")[0]
            totals[actor] = totals.get(actor, 0) + 1
            if batched:
                args += [entry_id, actor, totals[actor]]
            else:
                await r.evalsha(sha, 2, state, stream, GROUP, entry_id, actor, totals[actor])
            done += 1
        if batched:
            await r.evalsha(sha, 2, state, stream, *args)
    return time.perf_counter() - started


async def floor_check(r: aioredis.Redis, stream: str, state: str, n: int) -> None:
    total = sum(int(v) for v in await r.hvals(state))
    pending = (await r.xpending(stream, GROUP))["pending"]
    if total != n or pending:
        raise RuntimeError(f"floor check failed on {stream}: totals {total} != {n} or {pending} pending")


async def floor_consumer_process(url: str, stream: str, state: str, n: int) -> None:
    """``python -m benchmarks.throughput _floor_consumer URL STREAM STATE N``: 1e's consumer.
    Prints ``ready`` once its group exists, ``done`` once it acked ``n`` entries."""
    r = aioredis.Redis.from_url(url)
    try:
        await r.xgroup_create(stream, GROUP, id="0", mkstream=True)
        print("ready", flush=True)
        await floor_consume(r, stream, state, n, batched=True, block_ms=1000)
        print("done", flush=True)
    finally:
        await r.aclose()


async def floor_awaited_live(url: str, prefix: str, n: int, actor_count: int) -> Result:
    """Floor 1e: awaited XADDs while a consumer process drains them."""
    stream, state = f"{prefix}:1e:stream", f"{prefix}:1e:state"
    r = aioredis.Redis.from_url(url)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.throughput", FLOOR_CONSUMER_CMD, url, stream, state, str(n),
        cwd=ROOT, env=child_env(), stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        if (await asyncio.wait_for(proc.stdout.readline(), 60)).strip() != b"ready":
            raise RuntimeError("floor 1e consumer did not start")
        started = time.perf_counter()
        for i in range(n):
            await r.xadd(stream, {"e": floor_body(i, actor_count)})
        sent = time.perf_counter()
        if (await asyncio.wait_for(proc.stdout.readline(), STALL_S)).strip() != b"done":
            raise RuntimeError(f"floor 1e consumer exited with {await proc.wait()}")
        seconds = time.perf_counter() - started
        await asyncio.wait_for(proc.wait(), 30)
        await floor_check(r, stream, state, n)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await r.aclose()
    label = "floor 1e: awaited XADD, consumer process (e2e)"
    return Result("floor_1e", label, n, seconds, f"totals ok; sending took {sent - started:.2f}s")


async def run_floor(url: str, prefix: str, n: int, actor_count: int) -> list[Result]:
    r = aioredis.Redis.from_url(url)
    try:
        a = await floor_produce(r, f"{prefix}:1a", n, actor_count)
        b = await floor_produce_pipelined(r, f"{prefix}:1b", n, actor_count)
        results = [
            Result("floor_1a", "floor 1a: XADD, one awaited at a time", n, a),
            Result("floor_1b", f"floor 1b: XADD, pipelines of {FLOOR_BATCH}", n, b),
        ]
        for key, batched, label in (
            ("floor_1c", False, "floor 1c: XREADGROUP + EVALSHA(XACK+HSET) per msg"),
            ("floor_1d", True, f"floor 1d: XREADGROUP + EVALSHA per {FLOOR_BATCH} msgs"),
        ):
            stream, state = f"{prefix}:{key}:stream", f"{prefix}:{key}:state"
            await floor_produce_pipelined(r, stream, n, actor_count)
            await r.xgroup_create(stream, GROUP, id="0")
            seconds = await floor_consume(r, stream, state, n, batched)
            await floor_check(r, stream, state, n)
            results.append(Result(key, label, n, seconds, "totals ok"))
        return results
    finally:
        await r.aclose()


# ---- waiting on the workers ---------------------------------------------------------------
async def poll_until(
    check: Callable[[], Awaitable[bool]], workers: Workers, timeout: float, what: str
) -> float:
    """Poll ``check`` every POLL_S; returns the perf_counter time it first held."""
    deadline = time.perf_counter() + timeout
    while True:
        if await check():
            return time.perf_counter()
        workers.check_alive()
        if time.perf_counter() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(POLL_S)


async def all_leased(client: actors.Client, workers: Workers) -> None:
    async def check() -> bool:
        return all(await lease_owners(client))

    await poll_until(check, workers, 60, "every shard to be leased")


async def outstanding(client: actors.Client, shards: int = SHARDS) -> int | None:
    """Messages not yet committed over all shards (lag + pending of each inbox group), or None
    while some shard with messages has no consumer group yet (no worker has leased it)."""
    keys = client.store.keys
    async with client.store.redis.pipeline(transaction=False) as pipe:
        for s in range(shards):
            pipe.xinfo_groups(keys.inbox(s))
        replies = await pipe.execute(raise_on_error=False)
    total = 0
    for s, groups in enumerate(replies):
        if isinstance(groups, Exception):  # no stream: nothing was ever sent to this shard
            continue
        group = next((g for g in groups if g["name"] == GROUP.encode()), None)
        if group is None:
            return None
        lag = group.get("lag")
        if lag is None:  # Redis cannot tell (e.g. after deletions): compare ids instead
            stream = await client.store.redis.xinfo_stream(keys.inbox(s))
            lag = int(stream["last-generated-id"] != group["last-delivered-id"])
        total += int(lag) + int(group["pending"])
    return total


async def wait_committed(
    client: actors.Client, workers: Workers, stall: float, shards: int = SHARDS
) -> float:
    """Poll until nothing is outstanding; returns the perf_counter time it was first seen.

    Fails if a worker exits, or if the outstanding count does not move for ``stall`` seconds.
    """
    last: int | None = None
    moved = time.perf_counter()
    while True:
        left = await outstanding(client, shards)
        now = time.perf_counter()
        if left == 0:
            return now
        workers.check_alive()
        if left != last:
            last, moved = left, now
        elif now - moved > stall:
            raise RuntimeError(
                f"no progress for {stall:.0f}s ({left} messages outstanding); "
                f"{workers.log}:\n{workers.log_tail()}"
            )
        await asyncio.sleep(POLL_S)


async def check_totals(client: actors.Client, messages: int, actor_count: int) -> str:
    """Every actor must hold exactly the increments sent to it; returns a one-line verdict."""
    refs = [Count.ref(f"c{i}") for i in range(actor_count)]
    states: list[Any] = []
    for first in range(0, actor_count, 200):
        states += await asyncio.gather(*(client.state(ref) for ref in refs[first : first + 200]))
    totals = [s.total if s is not None else 0 for s in states]
    wrong = sum(t != e for t, e in zip(totals, expected_totals(messages, actor_count), strict=True))
    dead = sum([(await client.store.shard_info(s)).dead_letters for s in range(SHARDS)])
    if wrong or dead or sum(totals) != messages:
        raise RuntimeError(
            f"exactly-once check FAILED: totals sum {sum(totals)} != {messages}, "
            f"{wrong} actors wrong, {dead} dead letters"
        )
    return f"totals sum {sum(totals)} == N"


def increments(first: int, last: int, actor_count: int) -> list[tuple[actors.ActorRef[Any], BaseModel]]:
    return [(Count.ref(f"c{i % actor_count}"), Inc()) for i in range(first, last)]


async def send_chunks(client: actors.Client, n: int, actor_count: int, chunk: int) -> None:
    for first in range(0, n, chunk):
        await client.send_many(increments(first, min(n, first + chunk), actor_count))


# ---- ours --------------------------------------------------------------------------------
class Window(Protocol):
    """Told when a run's timed window opens and closes, the workers running (``benchmarks.cluster``
    reads the servers' counters and the workers' CPU there)."""

    async def open(self, workers: Workers) -> None: ...

    async def close(self, workers: Workers) -> None: ...


async def run_drain(
    url: str, tmp: Path, processes: int, n: int, actor_count: int, window: Window | None = None
) -> Result:
    ns = f"drain{processes}-{uuid.uuid4().hex[:6]}"
    async with actors.connect(url, namespace=ns, app=app, shards=SHARDS) as client:
        await send_chunks(client, n, actor_count, PREFILL_CHUNK)
        workers = Workers.spawn(worker_argv(APP_SPEC, url, ns), processes, tmp / f"{ns}.log")
        try:

            async def any_lease() -> bool:
                return any(await lease_owners(client))

            first_lease = await poll_until(any_lease, workers, 60, "a first lease")
            if window is not None:
                await window.open(workers)
            done = await wait_committed(client, workers, STALL_S)
            if window is not None:
                await window.close(workers)
            owners = await lease_owners(client)
            verdict = await check_totals(client, n, actor_count)
        finally:
            workers.stop()
    startup = first_lease - workers.spawned_at
    held = sorted(sum(1 for o in owners if o and f"-{p.pid}-" in o) for p in workers.procs)
    note = (
        f"{verdict}; start-up {startup:.2f}s excluded (spawn->done {done - workers.spawned_at:.2f}s); "
        f"shards held at end {held}"
    )
    label = f"ours: drain backlog, {processes} worker proc{'s' if processes > 1 else ''}"
    return Result(f"drain_{processes}p", label, n, done - first_lease, note)


async def run_e2e(
    url: str, tmp: Path, processes: int, n: int, actor_count: int, awaited: bool, window: Window | None = None
) -> Result:
    ns = f"e2e{'a' if awaited else 'p'}-{uuid.uuid4().hex[:6]}"
    async with actors.connect(url, namespace=ns, app=app, shards=SHARDS) as client:
        workers = Workers.spawn(worker_argv(APP_SPEC, url, ns), processes, tmp / f"{ns}.log")
        try:
            await all_leased(client, workers)
            if window is not None:
                await window.open(workers)
            started = time.perf_counter()
            if awaited:
                for i in range(n):
                    await client.send(Count.ref(f"c{i % actor_count}"), Inc())
            else:
                await send_chunks(client, n, actor_count, E2E_CHUNK)
            sent = time.perf_counter()
            done = await wait_committed(client, workers, STALL_S)
            if window is not None:
                await window.close(workers)
            verdict = await check_totals(client, n, actor_count)
        finally:
            workers.stop()
    how = "one awaited send at a time" if awaited else f"send_many chunks of {E2E_CHUNK}"
    label = f"ours: e2e, {how}"
    note = f"{verdict}; sending took {sent - started:.2f}s; {processes} worker proc(s)"
    return Result(f"e2e_{'awaited' if awaited else 'pipelined'}", label, n, done - started, note)


# ---- report ----------------------------------------------------------------------------
RATIOS: Sequence[tuple[str, str, str]] = (
    ("drain_1p", "floor_1c", "ours drain (1 proc) / floor 1c (per-message script)"),
    ("drain_1p", "floor_1d", "ours drain (1 proc) / floor 1d (batched script)"),
    ("drain_2p", "floor_1d", "ours drain (2 procs) / floor 1d (batched script)"),
    ("drain_3p", "floor_1d", "ours drain (3 procs) / floor 1d (batched script)"),
    ("e2e_awaited", "floor_1e", "ours e2e awaited send / floor 1e (awaited XADD, e2e)"),
    ("e2e_awaited", "floor_1a", "ours e2e awaited send / floor 1a (awaited XADD)"),
    ("e2e_pipelined", "floor_1b", "ours e2e send_many / floor 1b (pipelined XADD)"),
)


def ratios(results: dict[str, Result]) -> dict[str, float]:
    return {
        label: results[ours].rate / results[floor].rate
        for ours, floor, label in RATIOS
        if ours in results and floor in results
    }


def print_report(header: Sequence[str], results: dict[str, Result], rel: dict[str, float]) -> None:
    for line in header:
        print(line)
    print()
    print(f"{'measurement':<54} {'N':>7} {'seconds':>8} {'msgs/s':>9}  note")
    print("-" * 110)
    for r in results.values():
        print(f"{r.name:<54} {r.messages:>7} {r.seconds:>8.2f} {r.rate:>9,.0f}  {r.note}")
    print()
    for label, value in rel.items():
        print(f"{label:<54} {value:>6.2f}")


async def run_round(url: str, tmp: Path, args: argparse.Namespace, round_no: int) -> list[Result]:
    n, actor_count = args.messages, args.actors
    results = await run_floor(url, f"floor{round_no}", n, actor_count)
    results.append(await floor_awaited_live(url, f"floor{round_no}", args.awaited_messages, actor_count))
    for processes in args.drain_processes:
        results.append(await run_drain(url, tmp, processes, n, actor_count))
    for awaited, size in ((False, n), (True, args.awaited_messages)):
        results.append(await run_e2e(url, tmp, args.e2e_processes, size, actor_count, awaited))
    return results


def process_counts(text: str) -> tuple[int, ...]:
    """``--drain-processes``: e.g. ``1,2,3``."""
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of counts: {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"process counts must be 1 or more: {text!r}")
    return counts


def medians(samples: dict[str, list[Result]]) -> dict[str, Result]:
    """The median sample of each measurement, its note giving every sample (the spread)."""
    out: dict[str, Result] = {}
    for key, runs in samples.items():
        middle, spread = median_of(runs, lambda r: r.rate)
        out[key] = replace(middle, note=f"{spread}; {middle.note}".strip("; ")) if spread else middle
    return out


async def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--messages", type=int, default=50_000, help="N for the floor, drain and e2e")
    parser.add_argument("--actors", type=int, default=1_000, help="Count actors the messages go to")
    parser.add_argument("--awaited-messages", type=int, default=5_000, help="N for e2e awaited send")
    parser.add_argument("--drain-processes", type=process_counts, default=(1, 2),
                        help="worker processes for the drains, comma-separated (default 1,2)")  # fmt: skip
    parser.add_argument("--e2e-processes", type=int, default=1, help="worker processes for e2e runs")
    parser.add_argument("--rounds", type=int, default=3, help="repeat everything; report medians")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)

    samples: dict[str, list[Result]] = {}
    with private_server("throughput") as run:
        for round_no in range(args.rounds):
            for r in await run_round(run.url, run.tmp, args, round_no):
                samples.setdefault(r.key, []).append(r)

    header = [
        run.machine_line(),
        f"{args.actors} Count actors, {SHARDS} shards, body {BODY_BYTES} bytes; "
        f"floor: redis-py asyncio + hiredis, one connection; rounds: {args.rounds}",
    ]
    results = medians(samples)
    rel = ratios(results)
    print_report(header, results, rel)
    if args.json:
        payload = {
            "header": header,
            "results": {k: {**asdict(r), "msgs_per_s": r.rate} for k, r in results.items()},
            "samples": {k: [r.rate for r in runs] for k, runs in samples.items()},
            "ratios": rel,
        }
        write_json(args.json, payload)


if __name__ == "__main__":
    if sys.argv[1:2] == [FLOOR_CONSUMER_CMD]:
        url, stream, state, count = sys.argv[2:6]
        asyncio.run(floor_consumer_process(url, stream, state, int(count)))
    else:
        asyncio.run(main())

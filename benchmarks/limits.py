"""Limiters: what one acquire costs in Redis calls and time next to the raw floor, how many calls a
slot costs under contention, and how exactly a rate and a concurrency cap hold across real worker
processes, measured in one run on one server.

    python -m benchmarks.limits [--acquires 20000] [--tasks 50] [--cap 5] [--hold-ms 5]
                                [--contended 2000] [--rate 50] [--burst 1] [--seconds 10]
                                [--slot-hold-ms 100] [--processes 3] [--only overhead|contention|accuracy ...]
                                [--json PATH]

Everything runs on a private server (AOF on, fsync every second) that this command starts on a
free loopback port in a temporary directory and stops at the end.

1. ``overhead``: ``--acquires`` N sequential ``async with limits.hold(name): pass`` on an
   ``actors.limits.Limits`` built directly over a ``Store`` (as ``Worker.run`` builds it, lease
   2 s), for a rate-only limiter with plenty of capacity (1,000,000/s, burst 1,000: it never
   waits) and a concurrency-only one (cap 1,000), after 500 warm-up holds. In the same run, on
   the same server: the raw floor (redis-py asyncio + hiredis: one ``GET`` per iteration, one
   ``EVALSHA`` of ``return 1`` per iteration) and the ``Store`` methods the limiter calls, called
   directly (``limiter_acquire``, and ``limiter_release`` for the cap). Redis calls are counted
   exactly twice over: on the server, ``INFO commandstats`` after minus before (every command it
   ran, those inside scripts included); on the client, every command the connections sent (a
   counting ``Connection`` class; ``EVALSHA`` named by the script its SHA is). Each ``Limits``
   runs its background tasks (pub/sub listener, lease renewal, queue dispatcher) meanwhile, so
   what they cost is in the figures.
2. ``contention``: ``--tasks`` K tasks loop on ``hold`` of a limiter with ``--cap`` C slots,
   holding each for ``--hold-ms`` H (``asyncio.sleep``), until ``--contended`` slots were
   acquired; once with one ``Limits`` (one process) and once with the K tasks spread over three
   ``Limits``, each with its own ``Store`` and subscription (three processes would be so).
   Reported: Redis calls per acquired slot, and acquisitions per second against the
   theoretical C / H.
3. ``accuracy``: ``--processes`` real worker processes (``python -m actors.cli worker
   benchmarks.limits:app``, 16 shards) run actors whose handler does ``await self.step(
   record_time, ...)`` under a limiter; ``record_time`` appends its ``time.time()`` at start and
   end to a file per process in a temporary directory. Rate: limiter ``api`` of ``--rate`` R per
   second, ``--burst`` B, with R x ``--seconds`` + 1 messages sent at once (more work than
   capacity all along). Reported: the achieved rate (calls - 1) / (last start - first start),
   since n calls span n - 1 intervals; its ratio to R; the most calls that started in any
   1-second window (GCRA allows R + B - 1 in a half-open window; the check is <= R + B, as the
   limiter tests check); the smallest gap between two starts; how late each call started against
   the schedule first + k / R (every token is reserved back to back at once, so that schedule is
   the limiter's; a call later than its neighbours by d lets up to d x R more calls into the window
   that starts with it). Concurrency: limiter ``pool`` of
   ``--cap`` C, each call sleeping ``--slot-hold-ms``, with C x ``--seconds`` / hold messages.
   Reported: the most calls running at once (must be <= C), the average number in flight
   (sum of call durations / span) and the utilisation (that / C), and the average time a slot
   stood free between one holder's end and the next one's start. Both parts also report calls
   made beyond those sent (a step run twice) and the workers' ERROR and WARNING log lines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import itertools
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

import actors
from actors.keys import Keys
from actors.limiter import Limiter
from actors.limits import Limits
from actors.store import Store

from .common import SHARDS, Workers, argument_parser, private_server, wait_balanced, worker_argv, write_json

APP_SPEC = "benchmarks.limits:app"
LEASE_MS = 2_000
"""The slot lease ``Limits`` gets, as a worker with the default ``lease.ttl`` gives it."""
WARMUP = 500
SETTLE_S = 0.2
POLL_S = 0.05
STALL_S = 30.0
"""Give up when no limited call starts for this long."""
DIR_ENV = "ACTORS_BENCH_LIMITS_DIR"
RATE_ENV, BURST_ENV, CAP_ENV = "ACTORS_BENCH_RATE", "ACTORS_BENCH_BURST", "ACTORS_BENCH_CAP"


# ---- the app the worker processes run --------------------------------------------------------
# Its limiters come from the environment the benchmark gives its workers (the defaults otherwise).
class Hit(BaseModel):
    kind: str
    seconds: float = 0.0


def _log_call(kind: str, start: float, end: float) -> None:
    directory = Path(os.environ.get(DIR_ENV) or ".")
    with open(directory / f"{kind}-{os.getpid()}.log", "a") as out:
        out.write(f"{start:.6f} {end:.6f}\n")


async def record_time(kind: str, seconds: float) -> float:
    """The limited call: note when it started and ended (after ``seconds``); returns the start."""
    start = time.time()
    if seconds > 0:
        await asyncio.sleep(seconds)
    _log_call(kind, start, time.time())
    return start


class RateCaller(actors.Actor):
    class State(BaseModel):
        calls: int = 0
        last_start: float = 0.0

    async def on_hit(self, msg: Hit) -> None:
        self.state.last_start = await self.step(record_time, msg.kind, msg.seconds, limiter="api", retries=0)
        self.state.calls += 1


class SlotCaller(actors.Actor):
    class State(BaseModel):
        calls: int = 0
        last_start: float = 0.0

    async def on_hit(self, msg: Hit) -> None:
        self.state.last_start = await self.step(record_time, msg.kind, msg.seconds, limiter="pool", retries=0)
        self.state.calls += 1


app = actors.App(
    RateCaller,
    SlotCaller,
    limiters=[
        Limiter("api", rate=float(os.environ.get(RATE_ENV, "50")), burst=int(os.environ.get(BURST_ENV, "1"))),
        Limiter("pool", concurrency=int(os.environ.get(CAP_ENV, "5"))),
    ],
)


# ---- counting Redis calls --------------------------------------------------------------------
SENT: Counter[str] = Counter()
"""Commands sent by this process's counting connections, by name (``EVALSHA <script>``)."""
ROUND_TRIPS = "(round trips)"
SCRIPTS: dict[str, str] = {}
"""SHA1 -> script name, for every script of the runtime and the floor's."""
FLOOR_SCRIPT = "return 1"


def _register_scripts() -> None:
    folder = resources.files("actors").joinpath("scripts")
    for entry in folder.iterdir():
        if entry.name.endswith(".lua"):
            SCRIPTS[hashlib.sha1(entry.read_text().encode()).hexdigest()] = entry.name.removesuffix(".lua")
    SCRIPTS[hashlib.sha1(FLOOR_SCRIPT.encode()).hexdigest()] = "floor 'return 1'"


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class CountingConnection(aioredis.Connection):
    """A connection that counts every command it sends, and every write (a round trip)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        name = _text(args[0]).upper() if args else "?"
        if name == "EVALSHA" and len(args) > 1:
            name = f"EVALSHA {SCRIPTS.get(_text(args[1]), _text(args[1])[:8])}"
        SENT[name] += 1
        return super().pack_command(*args)

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        SENT[ROUND_TRIPS] += 1
        await super().send_packed_command(command, check_health)


def counting_client(url: str, retries: int = 3) -> aioredis.Redis:
    """A client configured as ``actors.store`` configures its own, with the counting connection."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        connection_class=CountingConnection,
        max_connections=256,
        timeout=30,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries),
        socket_connect_timeout=5,
        socket_timeout=None,
        socket_keepalive=True,
        health_check_interval=30,
    )
    return aioredis.Redis.from_pool(pool)


async def command_stats(r: aioredis.Redis) -> dict[str, int]:
    info = await r.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}


def delta(after: dict[str, int], before: dict[str, int], skip: Sequence[str] = ()) -> dict[str, int]:
    changed = {k: v - before.get(k, 0) for k, v in after.items() if k not in skip}
    return {k: v for k, v in sorted(changed.items(), key=lambda kv: -kv[1]) if v}


@dataclass
class Calls:
    """One measured window: its operations, seconds and Redis calls (client and server side)."""

    key: str
    name: str
    ops: int
    seconds: float
    sent: dict[str, int]
    """Commands sent by the client, by name (``EVALSHA <script>``), and ``(round trips)``."""
    server: dict[str, int]
    """``INFO commandstats`` calls after minus before (inside scripts too), INFO left out."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def us_per_op(self) -> float:
        return self.seconds / self.ops * 1e6

    @property
    def sent_per_op(self) -> float:
        return sum(v for k, v in self.sent.items() if k != ROUND_TRIPS) / self.ops

    @property
    def round_trips_per_op(self) -> float:
        return self.sent.get(ROUND_TRIPS, 0) / self.ops

    @property
    def server_per_op(self) -> float:
        return sum(self.server.values()) / self.ops

    def breakdown(self, counts: dict[str, int]) -> str:
        return ", ".join(f"{k} {v / self.ops:.3g}" for k, v in counts.items() if k != ROUND_TRIPS)

    def check(self) -> str:
        """Every EVALSHA the client sent must be one the server ran (nothing else talks to it)."""
        client = sum(v for k, v in self.sent.items() if k.startswith("EVALSHA"))
        server = self.server.get("evalsha", 0)
        return "" if client == server else f"EVALSHA sent {client} != run {server}!"


async def measure(key: str, name: str, info: aioredis.Redis, body: Callable[[], Awaitable[int]]) -> Calls:
    """Run ``body`` (it returns how many operations it did) between two looks at the counters.

    Each look waits ``SETTLE_S`` first (not timed), so that the calls background tasks make in
    answer to the last operations (a dispatcher woken by a release) fall on the same side of
    both counters.
    """
    await asyncio.sleep(SETTLE_S)
    server_before, sent_before = await command_stats(info), dict(SENT)
    started = time.perf_counter()
    ops = await body()
    seconds = time.perf_counter() - started
    await asyncio.sleep(SETTLE_S)
    sent = delta(dict(SENT), sent_before)
    server = delta(await command_stats(info), server_before, skip=("info",))
    return Calls(key, name, ops, seconds, sent, server)


@contextlib.asynccontextmanager
async def running_limits(url: str, ns: str, limiters: Sequence[Limiter]) -> AsyncIterator[Limits]:
    """A ``Limits`` over its own ``Store``, started as ``Worker.run`` starts it."""
    store = Store(counting_client(url), Keys(ns), appender=counting_client(url, retries=0))
    limits = Limits(store, {lim.name: lim for lim in limiters}, LEASE_MS, 24 * 3600 * 1000)
    await limits.start()
    try:
        yield limits
    finally:
        await limits.stop()
        await store.close()


# ---- 1. overhead of an acquire ---------------------------------------------------------------
FAST = Limiter("fast", rate=1_000_000, burst=1_000)
WIDE = Limiter("wide", concurrency=1_000)


async def holds(limits: Limits, name: str, n: int) -> int:
    for _ in range(n):
        async with limits.hold(name):
            pass
    return n


async def run_overhead(url: str, info: aioredis.Redis, n: int) -> list[Calls]:
    ns = f"overhead-{uuid.uuid4().hex[:6]}"
    results: list[Calls] = []
    floor = aioredis.Redis.from_url(url, connection_class=CountingConnection)
    try:
        sha = await floor.script_load(FLOOR_SCRIPT)
        await floor.set(f"{ns}:floor", b"x" * 16)

        async def gets() -> int:
            for _ in range(n):
                await floor.get(f"{ns}:floor")
            return n

        async def evalshas() -> int:
            for _ in range(n):
                await floor.evalsha(sha, 0)
            return n

        results.append(await measure("floor_get", "floor: GET", info, gets))
        results.append(await measure("floor_evalsha", "floor: EVALSHA 'return 1'", info, evalshas))
    finally:
        await floor.aclose()

    store = Store(counting_client(url), Keys(ns), appender=counting_client(url, retries=0))
    try:

        async def store_rate(count: int = n) -> int:
            for i in range(count):
                await store.limiter_acquire(
                    "srate", f"h{i}", LEASE_MS, 0, FAST.interval_ms, FAST.tolerance_ms
                )
            return count

        async def store_cap(count: int = n) -> int:
            for i in range(count):
                await store.limiter_acquire("scap", f"h{i}", LEASE_MS, WIDE.concurrency or 0, 0, 0)
                await store.limiter_release("scap", f"h{i}")
            return count

        await store_rate(WARMUP)
        await store_cap(WARMUP)
        label = "Store.limiter_acquire, rate only"
        results.append(await measure("store_rate", label, info, store_rate))
        label = "Store.limiter_acquire + _release, cap"
        results.append(await measure("store_cap", label, info, store_cap))
    finally:
        await store.close()

    for key, limiter, label in (
        ("hold_rate", FAST, "Limits.hold, rate only (1e6/s, burst 1000)"),
        ("hold_cap", WIDE, "Limits.hold, concurrency only (cap 1000)"),
    ):
        async with running_limits(url, ns, [limiter]) as limits:
            await holds(limits, limiter.name, WARMUP)
            results.append(await measure(key, label, info, functools.partial(holds, limits, limiter.name, n)))
    return results


# ---- 2. contention ----------------------------------------------------------------------------
async def contend(groups: Sequence[Limits], name: str, tasks: int, hold: float, total: int) -> dict[str, Any]:
    """``tasks`` tasks (spread over ``groups``) loop on ``hold(name)`` until ``total`` slots were taken."""
    acquired = in_flight = most = 0
    held = 0.0

    async def one(limits: Limits) -> None:
        nonlocal acquired, in_flight, most, held
        while acquired < total:
            async with limits.hold(name):
                acquired += 1
                in_flight += 1
                most = max(most, in_flight)
                started = time.perf_counter()
                await asyncio.sleep(hold)
                held += time.perf_counter() - started
                in_flight -= 1

    await asyncio.gather(*(one(groups[i % len(groups)]) for i in range(tasks)))
    return {"acquired": acquired, "max_in_flight": most, "held_seconds": held}


async def run_contention(url: str, info: aioredis.Redis, args: argparse.Namespace) -> list[Calls]:
    results: list[Calls] = []
    hold = args.hold_ms / 1000
    limiter = Limiter("pool", concurrency=args.cap)
    for instances in (1, 3):
        ns = f"contend{instances}-{uuid.uuid4().hex[:6]}"
        async with contextlib.AsyncExitStack() as stack:
            groups = [
                await stack.enter_async_context(running_limits(url, ns, [limiter])) for _ in range(instances)
            ]
            await contend(groups, limiter.name, args.tasks, hold, 4 * args.cap)  # warm-up
            outcome: dict[str, Any] = {}

            async def body(groups: list[Limits] = groups, outcome: dict[str, Any] = outcome) -> int:
                outcome.update(await contend(groups, limiter.name, args.tasks, hold, args.contended))
                return int(outcome["acquired"])

            where = "one Limits" if instances == 1 else f"{instances} Limits (as {instances} processes)"
            label = f"{args.tasks} tasks, cap {args.cap}, hold {args.hold_ms:g} ms, {where}"
            calls = await measure(f"contend_{instances}", label, info, body)
        calls.extra = {
            **outcome,
            "instances": instances,
            "per_s": calls.ops / calls.seconds,
            "theoretical_per_s": args.cap / hold,
            "utilisation": outcome["held_seconds"] / (args.cap * calls.seconds),
        }
        results.append(calls)
    return results


# ---- 3. accuracy in worker processes ------------------------------------------------------------
class AccuracyWorkers(Workers):
    def problems(self) -> list[str]:
        """The log's ERROR and WARNING lines so far (the workers log at WARNING)."""
        if not self.log.exists():
            return []
        lines = self.log.read_text(errors="replace").splitlines()
        return [line for line in lines if " ERROR " in line or " WARNING " in line]


def spawn_workers(
    url: str, ns: str, count: int, calls_dir: Path, args: argparse.Namespace
) -> AccuracyWorkers:
    """Workers whose limiters are the ones ``args`` says, recording their calls in ``calls_dir``."""
    env = {DIR_ENV: str(calls_dir), RATE_ENV: str(args.rate), BURST_ENV: str(args.burst),
           CAP_ENV: str(args.cap)}  # fmt: skip
    return AccuracyWorkers.spawn(worker_argv(APP_SPEC, url, ns), count, calls_dir / "workers.log", env=env)


def read_calls(directory: Path, kind: str) -> list[tuple[int, float, float]]:
    """(pid, start, end) of every recorded call of ``kind``."""
    calls = []
    for path in directory.glob(f"{kind}-*.log"):
        pid = int(path.stem.rpartition("-")[2])
        for line in path.read_text().splitlines():
            start, end = line.split()
            calls.append((pid, float(start), float(end)))
    return sorted(calls, key=lambda c: c[1])


async def wait_calls(directory: Path, kind: str, n: int, workers: Workers) -> list[tuple[int, float, float]]:
    last, moved = -1, time.perf_counter()
    while True:
        calls = read_calls(directory, kind)
        if len(calls) >= n:
            await asyncio.sleep(0.5)  # a duplicate would show up now
            return read_calls(directory, kind)
        workers.check_alive()
        if len(calls) != last:
            last, moved = len(calls), time.perf_counter()
        elif time.perf_counter() - moved > STALL_S:
            raise RuntimeError(f"{kind}: {len(calls)} of {n} calls after {STALL_S:.0f}s without progress")
        await asyncio.sleep(POLL_S)


def max_in_window(times: Sequence[float], window: float) -> int:
    """The most times in any half-open window [t, t + window)."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def max_overlap(intervals: Sequence[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = current = 0
    for _, change in events:
        current += change
        best = max(best, current)
    return best


async def run_accuracy(url: str, info: aioredis.Redis, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    ns = f"accuracy-{uuid.uuid4().hex[:6]}"
    calls_dir = tmp / ns
    calls_dir.mkdir()
    out: dict[str, Any] = {}
    async with actors.connect(url, namespace=ns, app=app, shards=SHARDS) as client:
        workers = spawn_workers(url, ns, args.processes, calls_dir, args)
        try:
            await wait_balanced(client, workers)
            # rate
            noted = len(workers.problems())
            n = round(args.rate * args.seconds) + 1
            before = await command_stats(info)
            sent_at = time.time()
            await client.send_many([(RateCaller.ref(f"r{i}"), Hit(kind="rate")) for i in range(n)])
            calls = await wait_calls(calls_dir, "rate", n, workers)
            server = delta(await command_stats(info), before, skip=("info",))
            starts = [s for _, s, _ in calls]
            span = starts[-1] - starts[0]
            gaps = [b - a for a, b in itertools.pairwise(starts)]
            interval = 1 / args.rate
            # Every token was reserved back to back within the first moments (a reservation costs
            # one call however long it waits), so call k is due at first + k * interval: how late
            # each started against that schedule, anchored at the earliest call relative to it.
            offsets = [s - k * interval for k, s in enumerate(starts)]
            late = sorted(o - min(offsets) for o in offsets)
            out["rate"] = {
                "limit_per_s": args.rate,
                "burst": args.burst,
                "sent": n,
                "calls": len(calls),
                "first_call_after_send_s": starts[0] - sent_at,
                "span_s": span,
                "calls_per_span": len(calls) / span,
                "achieved_per_s": (len(calls) - 1) / span,
                "ratio": (len(calls) - 1) / span / args.rate,
                "max_in_1s": max_in_window(starts, 1.0),
                "bound_1s": args.rate + args.burst,
                "min_gap_ms": min(gaps) * 1000,
                "gaps_under_half_interval": sum(g < interval / 2 for g in gaps),
                "interval_ms": interval * 1000,
                "late_p50_ms": late[len(late) // 2] * 1000,
                "late_p99_ms": late[min(len(late) - 1, round(0.99 * (len(late) - 1)))] * 1000,
                "late_max_ms": late[-1] * 1000,
                "per_process": dict(sorted(Counter(str(p) for p, _, _ in calls).items())),
                "server_commands_per_call": sum(server.values()) / len(calls),
                "server_evalsha_per_call": server.get("evalsha", 0) / len(calls),
                "worker_log_problems": workers.problems()[noted:],
            }
            # concurrency
            hold = args.slot_hold_ms / 1000
            noted = len(workers.problems())
            n = round(args.cap * args.seconds / hold)
            before = await command_stats(info)
            sent_at = time.time()
            messages = [(SlotCaller.ref(f"s{i}"), Hit(kind="slot", seconds=hold)) for i in range(n)]
            await client.send_many(messages)
            calls = await wait_calls(calls_dir, "slot", n, workers)
            server = delta(await command_stats(info), before, skip=("info",))
            intervals = [(s, e) for _, s, e in calls]
            span = max(e for _, e in intervals) - min(s for s, _ in intervals)
            busy = sum(e - s for s, e in intervals)
            in_flight = busy / span
            out["slots"] = {
                "cap": args.cap,
                "hold_ms": args.slot_hold_ms,
                "sent": n,
                "calls": len(calls),
                "first_call_after_send_s": intervals[0][0] - sent_at,
                "span_s": span,
                "max_concurrency": max_overlap(intervals),
                "avg_in_flight": in_flight,
                "utilisation": in_flight / args.cap,
                "mean_call_ms": busy / len(calls) * 1000,
                "calls_per_s": len(calls) / span,
                "theoretical_per_s": args.cap / hold,
                "idle_per_handover_ms": (args.cap * span - busy) / max(1, len(calls) - args.cap) * 1000,
                "per_process": dict(sorted(Counter(str(p) for p, _, _ in calls).items())),
                "server_commands_per_call": sum(server.values()) / len(calls),
                "server_evalsha_per_call": server.get("evalsha", 0) / len(calls),
                "server_publish_per_call": server.get("publish", 0) / len(calls),
                "worker_log_problems": workers.problems()[noted:],
            }
        finally:
            workers.stop()
    return out


# ---- report ----------------------------------------------------------------------------------
def print_overhead(results: list[Calls]) -> None:
    print(f"{'acquire (sequential, one task)':<46} {'N':>6} {'us/op':>7} {'x GET':>6} {'x EVALSHA':>9} "
          f"{'round trips':>11} {'cmds sent':>9} {'cmds run':>8}")  # fmt: skip
    print("-" * 110)
    by_key = {c.key: c for c in results}
    get, ev = by_key.get("floor_get"), by_key.get("floor_evalsha")
    for c in results:
        x_get = f"{c.us_per_op / get.us_per_op:6.2f}" if get else "     -"
        x_ev = f"{c.us_per_op / ev.us_per_op:9.2f}" if ev else "        -"
        print(f"{c.name:<46} {c.ops:>6} {c.us_per_op:>7.1f} {x_get} {x_ev} {c.round_trips_per_op:>11.3f} "
              f"{c.sent_per_op:>9.3f} {c.server_per_op:>8.3f}  {c.check()}")  # fmt: skip
    print("\nper op, sent by the client:")
    for c in results:
        print(f"  {c.name:<46} {c.breakdown(c.sent)}")
    print("per op, run by the server (INFO commandstats, inside scripts too):")
    for c in results:
        print(f"  {c.name:<46} {c.breakdown(c.server)}")


def print_contention(results: list[Calls]) -> None:
    print(f"{'contention':<60} {'slots':>6} {'seconds':>7} {'slots/s':>8} {'max/s':>6} {'ratio':>6} "
          f"{'busy':>5} {'in flight':>9} {'trips/slot':>10} {'sent/slot':>9} {'run/slot':>8}")  # fmt: skip
    print("-" * 140)
    for c in results:
        e = c.extra
        ratio = e["per_s"] / e["theoretical_per_s"]
        print(f"{c.name:<60} {c.ops:>6} {c.seconds:>7.2f} {e['per_s']:>8.0f} {e['theoretical_per_s']:>6.0f} "
              f"{ratio:>6.2f} {e['utilisation']:>5.2f} {e['max_in_flight']:>9} {c.round_trips_per_op:>10.3f} "
              f"{c.sent_per_op:>9.3f} {c.server_per_op:>8.3f}  {c.check()}")  # fmt: skip
    print("\nper acquired slot, sent by the client:")
    for c in results:
        print(f"  {c.name:<60} {c.breakdown(c.sent)}")
    print("per acquired slot, run by the server:")
    for c in results:
        print(f"  {c.name:<60} {c.breakdown(c.server)}")


def made(part: dict[str, Any]) -> str:
    twice = part["calls"] - part["sent"]
    return f"{part['calls']} (sent {part['sent']}" + (f"; {twice} MORE THAN SENT)" if twice else ")")


def log_row(part: dict[str, Any]) -> tuple[str, str]:
    problems = part["worker_log_problems"]
    return "worker log", f"{len(problems)} ERROR/WARNING lines" + (
        f", first: {problems[0][:120]}" if problems else ""
    )


def print_accuracy(acc: dict[str, Any], processes: int) -> None:
    r = acc["rate"]
    verdict = "ok" if r["max_in_1s"] <= r["bound_1s"] else "EXCEEDED"
    print(f"rate limiter 'api': {r['limit_per_s']:g}/s, burst {r['burst']}, {processes} worker processes, "
          f"{r['sent']} calls sent at once")  # fmt: skip
    rows = [
        ("calls made", made(r)),
        ("first call after the send", f"{r['first_call_after_send_s'] * 1000:.0f} ms"),
        ("span, first to last start", f"{r['span_s']:.2f} s"),
        ("calls / span", f"{r['calls_per_span']:.2f} /s"),
        ("achieved rate, (calls - 1) / span", f"{r['achieved_per_s']:.2f} /s"),
        ("achieved / limit", f"{r['ratio']:.4f}"),
        ("most starts in any 1 s window", f"{r['max_in_1s']} (R + burst = {r['bound_1s']:g}: {verdict})"),
        ("smallest gap between starts", f"{r['min_gap_ms']:.2f} ms (interval {r['interval_ms']:.2f} ms; "
                                        f"{r['gaps_under_half_interval']} gaps under half of it)"),
        ("start vs schedule first + k/R", f"late by p50 {r['late_p50_ms']:.1f} ms, "
                                          f"p99 {r['late_p99_ms']:.1f} ms, max {r['late_max_ms']:.1f} ms"),
        ("calls per process", ", ".join(f"{v}" for v in r["per_process"].values())),
        ("Redis commands run per call", f"{r['server_commands_per_call']:.1f} (whole runtime: turn, journal, "
                                        f"limiter; {r['server_evalsha_per_call']:.2f} EVALSHA)"),
        log_row(r),
    ]  # fmt: skip
    for label, value in rows:
        print(f"  {label:<36} {value}")
    s = acc["slots"]
    verdict = "ok" if s["max_concurrency"] <= s["cap"] else "EXCEEDED"
    print(f"\nconcurrency limiter 'pool': cap {s['cap']}, each call holds {s['hold_ms']:g} ms, "
          f"{processes} worker processes, {s['sent']} calls sent at once")  # fmt: skip
    rows = [
        ("calls made", made(s)),
        ("first call after the send", f"{s['first_call_after_send_s'] * 1000:.0f} ms"),
        ("span, first start to last end", f"{s['span_s']:.2f} s"),
        ("most running at once", f"{s['max_concurrency']} (cap {s['cap']}: {verdict})"),
        ("average in flight", f"{s['avg_in_flight']:.2f}"),
        ("utilisation (in flight / cap)", f"{s['utilisation']:.3f}"),
        ("calls per second", f"{s['calls_per_s']:.1f} (cap / hold = {s['theoretical_per_s']:.1f}; "
                             f"mean call {s['mean_call_ms']:.1f} ms)"),
        ("slot idle per hand-over", f"{s['idle_per_handover_ms']:.1f} ms"),
        ("calls per process", ", ".join(f"{v}" for v in s["per_process"].values())),
        ("Redis commands run per call", f"{s['server_commands_per_call']:.1f} (whole runtime; "
                                        f"{s['server_evalsha_per_call']:.2f} EVALSHA, "
                                        f"{s['server_publish_per_call']:.2f} PUBLISH)"),
        log_row(s),
    ]  # fmt: skip
    for label, value in rows:
        print(f"  {label:<36} {value}")


PARTS = ("overhead", "contention", "accuracy")


async def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--acquires", type=int, default=20_000, help="N sequential holds per measurement")
    parser.add_argument("--tasks", type=int, default=50, help="K tasks competing for the cap")
    parser.add_argument("--cap", type=int, default=5, help="concurrency cap (contention and accuracy)")
    parser.add_argument("--hold-ms", type=float, default=5.0, help="how long a contending task holds a slot")
    parser.add_argument("--contended", type=int, default=2_000, help="slots acquired per contention run")
    parser.add_argument("--rate", type=float, default=50.0, help="the accuracy rate limiter, per second")
    parser.add_argument("--burst", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0, help="work per accuracy run, in seconds")
    parser.add_argument("--slot-hold-ms", type=float, default=100.0, help="each capped call's duration")
    parser.add_argument("--processes", type=int, default=3, help="worker processes for accuracy")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)

    _register_scripts()
    overhead: list[Calls] = []
    contention: list[Calls] = []
    accuracy: dict[str, Any] = {}
    with private_server("limits", kept="server data and logs") as run:
        info = aioredis.Redis.from_url(run.url)
        try:
            if "overhead" in args.only:
                overhead = await run_overhead(run.url, info, args.acquires)
            if "contention" in args.only:
                contention = await run_contention(run.url, info, args)
            if "accuracy" in args.only:
                accuracy = await run_accuracy(run.url, info, run.tmp, args)
        finally:
            await info.aclose()

    header = [
        run.machine_line(),
        "client: redis-py asyncio + hiredis; 'cmds sent' = commands the client sent (counted per "
        "connection), 'cmds run' = INFO commandstats delta (inside scripts too)",
    ]
    for line in header:
        print(line)
    if overhead:
        print(f"\n1. overhead of one acquire ({args.acquires:,} sequential, lease {LEASE_MS} ms)\n")
        print_overhead(overhead)
    if contention:
        print(f"\n2. contention: {args.tasks} tasks, cap {args.cap}, hold {args.hold_ms:g} ms, "
              f"{args.contended:,} slots per run\n")  # fmt: skip
        print_contention(contention)
    if accuracy:
        print(f"\n3. accuracy across {args.processes} worker processes ({SHARDS} shards)\n")
        print_accuracy(accuracy, args.processes)
    if args.json:
        payload = {
            "header": header,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "overhead": [{**asdict(c), "us_per_op": c.us_per_op, "round_trips_per_op": c.round_trips_per_op,
                          "sent_per_op": c.sent_per_op, "server_per_op": c.server_per_op} for c in overhead],
            "contention": [{**asdict(c), "round_trips_per_slot": c.round_trips_per_op,
                            "sent_per_slot": c.sent_per_op, "server_per_slot": c.server_per_op}
                           for c in contention],
            "accuracy": accuracy,
        }  # fmt: skip
        write_json(args.json, payload)


if __name__ == "__main__":
    asyncio.run(main())

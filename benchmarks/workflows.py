"""Durable workflows: what a sleeping actor costs in Redis, how fast and how late timers fire,
and what a journaled step costs, measured in one run on one server.

    python -m benchmarks.workflows [--sleepers 100000] [--timers 20000] [--steps 10]
                                   [--step-messages 2000] [--step-actors 200] [--serial 100]
                                   [--idle-actors 100000] [--processes 2]
                                   [--only sleepers|timers|steps|idle ...] [--json PATH]

Everything runs on a private server (AOF on, fsync every second) that this command starts on a
free loopback port in a temporary directory and stops at the end. Each part uses a fresh
namespace, ``--shards 16`` and ``--processes`` real worker processes (1 for ``idle``)
(``python -m actors.cli worker benchmarks.workflows:app``), started before the part and stopped
after it.

1. ``sleepers``: ``--sleepers`` N Sleeper actors each get one message whose handler does
   ``await self.sleep(timedelta(days=30))``; they are sent with ``send_many`` in chunks of 1,000
   (at most ``WINDOW`` not yet suspended at a time) until the shards' ``timers`` zsets hold N
   members. A suspended turn lives in the shard's ``turns`` hash (its message and journal) and
   ``timers`` zset (its due time). Reported: Redis ``used_memory`` after minus before, divided
   by N, just after the last suspension and again once the workers have trimmed the acked
   entries from the inbox streams; and ``MEMORY USAGE key SAMPLES 1000`` of each shard's
   turns, timers, state and inbox keys (after minus before), per sleeper.
2. ``timers``: ``--timers`` M Alarm actors each ``sleep(until=T)`` with one T, a whole second
   far enough ahead that all M are suspended before it (checked). After the sleep each handler
   records ``time.time()`` in its state. Reported: lateness (wake-up time minus T) p50/p99/max,
   the earliest wake (must be >= 0), M / (last wake - T), and M / (all turns committed - T) as
   seen by a poller.
3. ``steps``: ``--step-messages`` messages to ``--step-actors`` actors whose handler does
   ``--steps`` K ``await self.step(noop)`` (an async noop; also a sync one, which a step runs in
   a thread), against one that calls ``await noop()`` K times directly. Throughput: all
   messages sent at once with ``send_many``, timed until every actor's state counts them all
   (after one warm-up message per actor). Latency: ``--serial`` awaited ``ask`` to one actor.
   Added cost per step = (t_step - t_plain) / (messages * K). Each step is one fenced write
   (``commit.lua``, op ``j``) of the whole open turn so far, before the handler goes on.
4. ``idle``: ``--idle-actors`` N distinct Counter actors each get one message (the handler adds 1
   to an int in its state), sent with ``send_many`` in chunks of 1,000 (at most ``WINDOW`` not
   yet committed), to ONE worker process, until the shards' ``state`` hashes hold N snapshots.
   Reported: Redis ``used_memory`` after minus before, divided by N, once the inbox streams are
   trimmed, with ``MEMORY USAGE key SAMPLES 1000`` of the state and inbox keys (after minus
   before); and the worker's RSS (``VmRSS``) before the first send and just after the last
   commit, while all N activations are still in memory (``WorkerSettings`` defaults: an
   activation is dropped after ``idle_timeout`` s without a message, or past
   ``max_activations`` per shard), and (after - before) / N per activation.

Each part also prints how many times a shard changed owner while it ran (fencing epochs after
minus before); anything but 0 means a worker lost leases under the load and the figures include
failovers. ``--only`` runs some parts (``--only sleepers --sleepers 1000000`` for the README's
figure); ``--json PATH`` also writes every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel

import actors
from actors.codec import decode_state
from actors.routing import shard_of
from actors.settings import WorkerSettings

from .common import SHARDS, Workers, argument_parser, private_server, wait_balanced, worker_argv, write_json

APP_SPEC = "benchmarks.workflows:app"
SEND_CHUNK = 1_000
WINDOW = 20_000
"""Sleepers sent but not yet suspended, at most (keeps the inbox streams from ballooning)."""
SAMPLES = 1_000
"""``MEMORY USAGE ... SAMPLES``: 0 (exact) walks every field, slow for 1M sleepers."""
POLL_S = 0.02
STALL_S = 60.0
"""Give up when the awaited count does not move for this long."""
TIMERS_STALL_S = 15.0
"""Part 2: every alarm should have woken a few seconds after T."""
TARGET_BYTES = 512


# ---- the actors the workers run -----------------------------------------------------------
class Hibernate(BaseModel):
    days: float = 30.0


class Sleeper(actors.Actor):
    """One message: sleep for a month. Nothing else, so what stays in Redis is the sleep."""

    async def on_hibernate(self, msg: Hibernate) -> None:
        await self.sleep(timedelta(days=msg.days))


class WakeAt(BaseModel):
    due_ms: int
    """A whole second, so ``due_ms / 1000`` is exact and the runtime's due is this one."""


class Alarm(actors.Actor):
    class State(BaseModel):
        woke: float = 0.0
        wakes: int = 0

    async def on_wake_at(self, msg: WakeAt) -> None:
        await self.sleep(until=datetime.fromtimestamp(msg.due_ms / 1000, UTC))
        self.state.woke = time.time()
        self.state.wakes += 1


class Work(BaseModel):
    k: int = 10


class Counted(BaseModel):
    done: int = 0


async def noop() -> None:
    return None


def sync_noop() -> None:
    return None


class Stepped(actors.Actor):
    """K journaled steps of an async function, awaited in the handler's task."""

    State = Counted

    async def on_work(self, msg: Work) -> None:
        for _ in range(msg.k):
            await self.step(noop)
        self.state.done += 1


class ThreadStepped(actors.Actor):
    """K journaled steps of a sync function: a step runs it in a thread (``asyncio.to_thread``)."""

    State = Counted

    async def on_work(self, msg: Work) -> None:
        for _ in range(msg.k):
            await self.step(sync_noop)
        self.state.done += 1


class Plain(actors.Actor):
    """The same K calls, not journaled."""

    State = Counted

    async def on_work(self, msg: Work) -> None:
        for _ in range(msg.k):
            await noop()
        self.state.done += 1


class Tick(BaseModel):
    pass


class Counter(actors.Actor):
    """One int of state; the smallest actor that leaves a snapshot behind."""

    class State(BaseModel):
        n: int = 0

    async def on_tick(self, msg: Tick) -> None:
        self.state.n += 1


app = actors.App(Sleeper, Alarm, Stepped, ThreadStepped, Plain, Counter)


# ---- worker processes -----------------------------------------------------------------------
class PartWorkers(Workers):
    """A part's worker processes; ``stop`` gives each 30 s."""

    stop_timeout = 30.0

    def warnings(self) -> dict[str, int]:
        """Lines of the workers' log by kind (lease lost, write already applied, other warnings)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        lines = [line for line in text.splitlines() if " WARNING " in line or " ERROR " in line]
        return {
            "lines": len(lines),
            "lease_lost": sum("lost the lease" in line for line in lines),
            "already_applied": sum("already applied" in line for line in text.splitlines()),
            "errors": sum(" ERROR " in line for line in lines),
        }


def spawn_workers(url: str, ns: str, count: int, log: Path) -> PartWorkers:
    return PartWorkers.spawn(worker_argv(APP_SPEC, url, ns), count, log)


async def shard_values(r: aioredis.Redis, command: Callable[[Any, int], Any]) -> list[Any]:
    """``command(pipe, shard)`` for every shard in one pipeline; the replies in shard order."""
    async with r.pipeline(transaction=False) as pipe:
        for s in range(SHARDS):
            command(pipe, s)
        return list(await pipe.execute())


class Stalled(RuntimeError):
    """An awaited count stopped moving."""

    def __init__(self, what: str, n: int, target: int, stall: float, log_tail: str) -> None:
        super().__init__(f"{what}: stuck at {n} (want {target}) for {stall:.0f}s; worker log:\n{log_tail}")
        self.n = n
        self.stall = stall


async def wait_until(
    count: Callable[[], Awaitable[int]],
    target: int,
    workers: Workers,
    what: str,
    poll: float = POLL_S,
    stall: float = STALL_S,
) -> float:
    """Poll ``count`` until it equals ``target``; returns the wall-clock time it first did.
    Fails if a worker exits, or raises Stalled if the count does not move for ``stall`` s."""
    last, moved = -1, time.monotonic()
    while True:
        n = await count()
        if n == target:
            return time.time()
        workers.check_alive()
        if n != last:
            last, moved = n, time.monotonic()
        elif time.monotonic() - moved > stall:
            raise Stalled(what, n, target, stall, workers.log_tail())
        await asyncio.sleep(poll)


async def timer_count(client: actors.Client) -> int:
    keys = client.store.keys
    return sum(await shard_values(client.store.redis, lambda pipe, s: pipe.zcard(keys.timers(s))))


async def inbox_entries(client: actors.Client) -> int:
    keys = client.store.keys
    return sum(await shard_values(client.store.redis, lambda pipe, s: pipe.xlen(keys.inbox(s))))


LATENCY_MS = 50
"""The server records events (commands, fsync, fork...) slower than this (``LATENCY LATEST``)."""


async def reset_latency(client: actors.Client) -> None:
    await client.store.redis.execute_command("LATENCY", "RESET")


async def latency_spikes(client: actors.Client) -> dict[str, int]:
    """The server's slowest event of each kind since the last reset (ms), over LATENCY_MS."""
    rows = await client.store.redis.execute_command("LATENCY", "LATEST")
    return {(row[0].decode() if isinstance(row[0], bytes) else str(row[0])): int(row[3]) for row in rows}


async def epochs(client: actors.Client) -> list[int]:
    """Every shard's fencing epoch: it grows by one each time the shard changes owner."""
    keys = client.store.keys
    return [
        int(v or 0) for v in await shard_values(client.store.redis, lambda pipe, s: pipe.get(keys.epoch(s)))
    ]


def lease_changes(first: list[int], last: list[int]) -> int:
    return sum(b - a for a, b in zip(first, last, strict=True))


async def open_count(client: actors.Client) -> int:
    """Timers plus open turns over all shards: 0 once every turn has committed."""
    keys = client.store.keys

    def both(pipe: Any, s: int) -> None:
        pipe.zcard(keys.timers(s))
        pipe.hlen(keys.turns(s))

    async with client.store.redis.pipeline(transaction=False) as pipe:
        for s in range(SHARDS):
            both(pipe, s)
        return sum(await pipe.execute())


async def states(client: actors.Client, ids: Sequence[str]) -> list[dict[str, Any] | None]:
    """Decoded snapshots of ``ids`` (None where there is none), read per shard with HMGET."""
    by_shard: dict[int, list[str]] = {}
    for aid in ids:
        by_shard.setdefault(shard_of(aid, SHARDS), []).append(aid)
    r, keys = client.store.redis, client.store.keys
    async with r.pipeline(transaction=False) as pipe:
        for s, group in by_shard.items():
            pipe.hmget(keys.state(s), group)
        replies = await pipe.execute()
    found: dict[str, dict[str, Any] | None] = {}
    for group, values in zip(by_shard.values(), replies, strict=True):
        for aid, raw in zip(group, values, strict=True):
            found[aid] = None if raw is None else decode_state(raw)
    return [found[aid] for aid in ids]


async def drop_namespace(r: aioredis.Redis, ns: str) -> None:
    """Delete a part's keys and wait until the server has freed them (it does so in the background)."""
    async for key in r.scan_iter(match=f"{ns}:*", count=1000):
        await r.unlink(key)
    for _ in range(600):
        if not int((await r.info("memory")).get("lazyfree_pending_objects", 0)):
            break
        await asyncio.sleep(0.1)


def quantile(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def progress(text: str) -> None:
    print(f"  .. {text}", file=sys.stderr, flush=True)


# ---- 1. bytes per sleeping actor ------------------------------------------------------------
def sleeper_key(i: int) -> str:
    return f"order-{i:07d}"


KEY_TYPES = ("turns", "timers", "state", "inbox")


async def key_usage(client: actors.Client, kind: str) -> int:
    """``MEMORY USAGE`` summed over the shards' keys of one kind (0 for a missing key)."""
    k = client.store.keys
    name = {"turns": k.turns, "timers": k.timers, "state": k.state, "inbox": k.inbox}[kind]
    values = await shard_values(
        client.store.redis, lambda pipe, s: pipe.memory_usage(name(s), samples=SAMPLES)
    )
    return sum(int(v or 0) for v in values)


INFO_FIELDS = ("used_memory", "used_memory_dataset", "used_memory_overhead", "mem_clients_normal",
               "mem_aof_buffer", "used_memory_scripts")  # fmt: skip


async def memory_snapshot(client: actors.Client) -> dict[str, int]:
    snap = {kind: await key_usage(client, kind) for kind in KEY_TYPES}
    info = await client.store.redis.info("memory")
    snap.update({name: int(info.get(name, 0)) for name in INFO_FIELDS})
    return snap


async def send_windowed(
    client: actors.Client,
    n: int,
    message: Callable[[int], tuple[Any, BaseModel]],
    settled: Callable[[], Awaitable[int]],
    workers: Workers,
    label: str,
    what: str,
) -> None:
    """Send ``message(i)`` for i < N with ``send_many`` in chunks, keeping at most WINDOW of them
    sent but not yet ``settled`` (suspended, committed...: the count ``what`` names)."""
    report_every = max(n // 10, SEND_CHUNK)
    sent, done = 0, 0
    while sent < n:
        while sent - done >= WINDOW:
            workers.check_alive()
            await asyncio.sleep(0.05)
            done = await settled()
        chunk = min(SEND_CHUNK, n - sent)
        await client.send_many([message(i) for i in range(sent, sent + chunk)])
        sent += chunk
        if sent % report_every < chunk:
            done = await settled()
            entries = await inbox_entries(client)
            progress(f"{label}: {sent:,} sent, {done:,} {what}, {entries:,} entries in the inboxes")
        elif sent % (SEND_CHUNK * 5) == 0:
            done = await settled()


async def send_sleepers(client: actors.Client, n: int, workers: Workers) -> None:
    """Send N Hibernate messages in chunks, keeping at most WINDOW of them not yet suspended."""
    await send_windowed(
        client,
        n,
        lambda i: (Sleeper.ref(sleeper_key(i)), Hibernate()),
        lambda: timer_count(client),
        workers,
        "sleepers",
        "suspended",
    )


async def wait_trimmed(client: actors.Client, workers: Workers, timeout: float = 60.0) -> tuple[int, float]:
    """Until every inbox stream is trimmed to at most one radix-tree node of entries (the
    workers ``XTRIM MINID ~`` acked entries every ~5 s); returns (entries left, seconds)."""
    r, keys = client.store.redis, client.store.keys
    started = time.monotonic()
    while True:
        lengths = await shard_values(r, lambda pipe, s: pipe.xlen(keys.inbox(s)))
        if max(lengths) <= 100 or time.monotonic() - started > timeout:
            return sum(lengths), time.monotonic() - started
        workers.check_alive()
        await asyncio.sleep(0.5)


async def blob_sizes(client: actors.Client, sample: int, kind: str = "turns") -> tuple[float, int, str]:
    """Average blob (bytes) over a random sample of fields of the shards' ``turns`` (open turns)
    or ``state`` (snapshots) hashes, the max, and an actor id."""
    r, keys = client.store.redis, client.store.keys
    key = keys.turns if kind == "turns" else keys.state
    per_shard = max(1, sample // SHARDS)
    fields = await shard_values(r, lambda pipe, s: pipe.hrandfield(key(s), per_shard))
    async with r.pipeline(transaction=False) as pipe:
        for s, names in enumerate(fields):
            for name in names:
                pipe.hstrlen(key(s), name)
        sizes = await pipe.execute()
    example = next((names[0].decode() for names in fields if names), "")
    return (statistics.fmean(sizes) if sizes else 0.0), max(sizes, default=0), example


async def run_sleepers(url: str, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    n = args.sleepers
    ns = f"sleep-{uuid.uuid4().hex[:6]}"
    async with actors.connect(url, namespace=ns, app=app, shards=SHARDS) as client:
        r = client.store.redis
        workers = spawn_workers(url, ns, args.processes, tmp / f"{ns}.log")
        try:
            await wait_balanced(client, workers, even=True)
            epochs_before = await epochs(client)
            await reset_latency(client)
            before = await memory_snapshot(client)
            started = time.time()
            await send_sleepers(client, n, workers)
            done = await wait_until(lambda: timer_count(client), n, workers, "sleepers suspended", 0.1)
            untrimmed = await memory_snapshot(client)
            left, trim_wait = await wait_trimmed(client, workers)
            after = await memory_snapshot(client)
            # Every timer is the month-long sleep (none at 0 = running, none FOREVER = parked).
            now_ms = int(time.time() * 1000)
            sleeping = sum(
                await shard_values(
                    r, lambda pipe, s: pipe.zcount(client.store.keys.timers(s), now_ms + 86_400_000, 2**51)
                )
            )
            turns = sum(await shard_values(r, lambda pipe, s: pipe.hlen(client.store.keys.turns(s))))
            blob_avg, blob_max, example = await blob_sizes(client, 1_000)
            rss = workers.rss_mib()
            changes = lease_changes(epochs_before, await epochs(client))
            spikes = await latency_spikes(client)
        finally:
            workers.stop()
            worker_log = workers.warnings()
        await drop_namespace(r, ns)  # leave a clean server for the next parts
    if sleeping != n or turns != n:
        raise RuntimeError(f"expected {n} sleeping turns; timers due in 30 days: {sleeping}, turns: {turns}")
    delta = {k: after[k] - before[k] for k in (*KEY_TYPES, "used_memory")}
    return {
        "sleepers": n,
        "populate_s": done - started,
        "populate_per_s": n / (done - started),
        "processes": args.processes,
        "used_memory_before": before["used_memory"],
        "used_memory_after": after["used_memory"],
        "bytes_per_sleeper": delta["used_memory"] / n,
        "bytes_per_sleeper_untrimmed": (untrimmed["used_memory"] - before["used_memory"]) / n,
        "inbox_bytes_per_sleeper_untrimmed": (untrimmed["inbox"] - before["inbox"]) / n,
        "by_key_type": {k: delta[k] / n for k in KEY_TYPES},
        "other": (delta["used_memory"] - sum(delta[k] for k in KEY_TYPES)) / n,
        "info_memory_delta": {k: after[k] - before[k] for k in INFO_FIELDS},
        "inbox_entries_left": left,
        "trim_wait_s": trim_wait,
        "open_turn_blob_avg": blob_avg,
        "open_turn_blob_max": blob_max,
        "actor_id_example": example,
        "worker_rss_mib": rss,
        "lease_changes": changes,
        "worker_log": worker_log,
        "server_latency_ms": spikes,
    }


# ---- 2. timers fired per second, and lateness -----------------------------------------------
async def run_timers(url: str, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    m = args.timers
    ns = f"timers-{uuid.uuid4().hex[:6]}"
    ids = [f"Alarm/a{i}" for i in range(m)]
    async with actors.connect(url, namespace=ns, app=app, shards=SHARDS) as client:
        workers = spawn_workers(url, ns, args.processes, tmp / f"{ns}.log")
        try:
            await wait_balanced(client, workers, even=True)
            epochs_before = await epochs(client)
            await reset_latency(client)
            margin = args.timer_margin if args.timer_margin is not None else 2.0 + m / 4_000
            due_s = math.ceil(time.time() + margin)
            msg = WakeAt(due_ms=due_s * 1000)
            started = time.time()
            for first in range(0, m, SEND_CHUNK):
                last = min(m, first + SEND_CHUNK)
                await client.send_many([(Alarm.ref(f"a{i}"), msg) for i in range(first, last)])
            suspended = await wait_until(lambda: timer_count(client), m, workers, "alarms suspended")
            spare = due_s - suspended
            if spare <= 0.2:
                raise RuntimeError(
                    f"the {m} alarms were suspended only {spare:.2f}s before their due time; "
                    f"raise --timer-margin (was {margin:.1f}s)"
                )
            await asyncio.sleep(max(0.0, due_s - time.time() - 0.2))
            try:
                committed = await wait_until(
                    lambda: open_count(client), 0, workers, "alarms woken", 0.005, TIMERS_STALL_S
                )
            except Stalled as exc:
                # Report it with the other parts' figures rather than abort the run.
                diagnosis, stuck, at_zero = await timer_diagnosis(client, epochs_before)
                return {
                    "timers": m,
                    "processes": args.processes,
                    "failed": f"{stuck:,} of {m:,} alarms never woke (no progress for {exc.stall:.0f}s); "
                    f"{at_zero:,} of them have timer score 0 (taken, to be resumed by the shard owner)",
                    "diagnosis": diagnosis,
                    "log_tail": workers.log_tail(),
                    "worker_log": workers.warnings(),
                    "server_latency_ms": await latency_spikes(client),
                    "lease_changes": lease_changes(epochs_before, await epochs(client)),
                }
            found = await states(client, ids)
            changes = lease_changes(epochs_before, await epochs(client))
            spikes = await latency_spikes(client)
        finally:
            workers.stop()
            worker_log = workers.warnings()
    woke = [s["woke"] for s in found if s]
    wakes = [s["wakes"] for s in found if s]
    if len(woke) != m or set(wakes) != {1}:
        raise RuntimeError(f"{m} alarms: {len(woke)} woke, wakes per actor {sorted(set(wakes))}")
    late = sorted(w - due_s for w in woke)
    return {
        "timers": m,
        "processes": args.processes,
        "suspend_s": suspended - started,
        "spare_s": spare,
        "late_ms_min": late[0] * 1000,
        "late_ms_p50": statistics.median(late) * 1000,
        "late_ms_p99": quantile(late, 0.99) * 1000,
        "late_ms_max": late[-1] * 1000,
        "early": sum(1 for x in late if x < 0),
        "fired_per_s": m / late[-1] if late[-1] > 0 else float("inf"),
        "committed_s": committed - due_s,
        "committed_per_s": m / (committed - due_s),
        "lease_changes": changes,
        "worker_log": worker_log,
        "server_latency_ms": spikes,
    }


async def timer_diagnosis(client: actors.Client, epochs_before: list[int]) -> tuple[list[str], int, int]:
    """Why alarms did not all commit: per shard, open turns, timers at 0 and the epochs; and
    the totals of open turns and of timers at 0."""
    r, keys = client.store.redis, client.store.keys
    turns = await shard_values(r, lambda pipe, s: pipe.hlen(keys.turns(s)))
    at_zero = await shard_values(r, lambda pipe, s: pipe.zcount(keys.timers(s), 0, 0))
    now = await epochs(client)
    rows = [
        f"shard {s}: {turns[s]} open turns, {at_zero[s]} timers at score 0, "
        f"epoch {epochs_before[s]} -> {now[s]}"
        for s in range(SHARDS)
        if turns[s] or at_zero[s] or now[s] != epochs_before[s]
    ]
    return rows, sum(turns), sum(at_zero)


# ---- 3. cost of a journaled step --------------------------------------------------------------
@dataclass
class StepRun:
    kind: str
    label: str
    messages: int
    seconds: float
    serial: int
    serial_seconds: float

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def serial_ms(self) -> float:
        return self.serial_seconds / self.serial * 1000


STEP_TYPES: Sequence[tuple[str, type[actors.Actor], str]] = (
    ("plain", Plain, "K x await noop() (not journaled)"),
    ("step", Stepped, "K x await self.step(noop), async noop"),
    ("thread_step", ThreadStepped, "K x await self.step(sync_noop), in a thread"),
)


async def run_step_kind(
    client: actors.Client, workers: Workers, cls: type[actors.Actor], kind: str, label: str,
    args: argparse.Namespace,
) -> StepRun:  # fmt: skip
    n, actor_count, k = args.step_messages, args.step_actors, args.steps
    refs = [cls.ref(f"{kind}{i}") for i in range(actor_count)]
    ids = [ref.id for ref in refs]

    async def done_total() -> int:
        return sum(s["done"] for s in await states(client, ids) if s)

    # Warm-up: one message per actor, so activations and code paths are hot.
    await client.send_many([(ref, Work(k=k)) for ref in refs])
    await wait_until(done_total, actor_count, workers, f"{kind} warm-up", 0.01)
    started = time.time()
    for first in range(0, n, SEND_CHUNK):
        last = min(n, first + SEND_CHUNK)
        await client.send_many([(refs[i % actor_count], Work(k=k)) for i in range(first, last)])
    finished = await wait_until(done_total, actor_count + n, workers, kind, 0.01)
    one = cls.ref(f"{kind}-serial")
    await client.ask(one, Work(k=k), timeout=30)  # activate it
    serial_started = time.perf_counter()
    for _ in range(args.serial):
        await client.ask(one, Work(k=k), timeout=30)
    serial_seconds = time.perf_counter() - serial_started
    return StepRun(kind, label, n, finished - started, args.serial, serial_seconds)


async def run_steps(url: str, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    ns = f"steps-{uuid.uuid4().hex[:6]}"
    runs: dict[str, StepRun] = {}
    async with actors.connect(url, namespace=ns, app=app, shards=SHARDS) as client:
        workers = spawn_workers(url, ns, args.processes, tmp / f"{ns}.log")
        try:
            await wait_balanced(client, workers, even=True)
            epochs_before = await epochs(client)
            await reset_latency(client)
            for kind, cls, label in STEP_TYPES:
                runs[kind] = await run_step_kind(client, workers, cls, kind, label, args)
                progress(f"steps: {kind} {runs[kind].rate:,.0f} turns/s")
            changes = lease_changes(epochs_before, await epochs(client))
            spikes = await latency_spikes(client)
        finally:
            workers.stop()
            worker_log = workers.warnings()
    n, k = args.step_messages, args.steps
    plain = runs["plain"]
    out: dict[str, Any] = {
        "messages": n,
        "actors": args.step_actors,
        "k": k,
        "serial": args.serial,
        "processes": args.processes,
        "lease_changes": changes,
        "worker_log": worker_log,
        "server_latency_ms": spikes,
        "runs": {},
    }
    for kind, run in runs.items():
        out["runs"][kind] = {
            "label": run.label,
            "seconds": run.seconds,
            "turns_per_s": run.rate,
            "serial_ms_per_turn": run.serial_ms,
            "added_us_per_step": None if kind == "plain" else (run.seconds - plain.seconds) / (n * k) * 1e6,
            "added_serial_us_per_step": None
            if kind == "plain"
            else (run.serial_ms - plain.serial_ms) / k * 1000,
        }
    return out


# ---- 4. what an idle actor costs: Redis, and worker memory while it stays activated -----------
def idle_key(i: int) -> str:
    return f"user-{i:07d}"


async def state_count(client: actors.Client) -> int:
    """Snapshots in the shards' state hashes: one per actor whose first turn has committed."""
    keys = client.store.keys
    return sum(await shard_values(client.store.redis, lambda pipe, s: pipe.hlen(keys.state(s))))


async def run_idle(url: str, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    n = args.idle_actors
    ns = f"idle-{uuid.uuid4().hex[:6]}"
    limits = WorkerSettings()
    async with actors.connect(url, namespace=ns, app=app, shards=SHARDS) as client:
        r = client.store.redis
        workers = spawn_workers(url, ns, 1, tmp / f"{ns}.log")
        try:
            await wait_balanced(client, workers, even=True)
            epochs_before = await epochs(client)
            await reset_latency(client)
            before = await memory_snapshot(client)
            rss_before = workers.rss_mib()[0]
            started = time.time()
            await send_windowed(
                client,
                n,
                lambda i: (Counter.ref(idle_key(i)), Tick()),
                lambda: state_count(client),
                workers,
                "idle",
                "committed",
            )
            done = await wait_until(lambda: state_count(client), n, workers, "counters committed", 0.05)
            rss_after = workers.rss_mib()[0]
            rss_at = time.time()
            per_shard = await shard_values(r, lambda pipe, s: pipe.hlen(client.store.keys.state(s)))
            left, trim_wait = await wait_trimmed(client, workers)
            after = await memory_snapshot(client)
            rss_trimmed = workers.rss_mib()[0]
            rss_trimmed_at = time.time()
            blob_avg, blob_max, example = await blob_sizes(client, 1_000, "state")
            sample = [f"Counter/{idle_key(i)}" for i in range(0, n, max(1, n // 1_000))]
            counts = {s["n"] if s else None for s in await states(client, sample)}
            changes = lease_changes(epochs_before, await epochs(client))
            spikes = await latency_spikes(client)
        finally:
            workers.stop()
            worker_log = workers.warnings()
        await drop_namespace(r, ns)  # leave a clean server for any later part
    if counts != {1}:
        raise RuntimeError(f"expected every counter at 1; a sample of 1,000 holds {sorted(counts, key=str)}")
    delta = {k: after[k] - before[k] for k in (*KEY_TYPES, "used_memory")}
    mib = 2**20
    return {
        "actors": n,
        "processes": 1,
        "populate_s": done - started,
        "populate_per_s": n / (done - started),
        "used_memory_before": before["used_memory"],
        "used_memory_after": after["used_memory"],
        "bytes_per_actor": delta["used_memory"] / n,
        "by_key_type": {k: delta[k] / n for k in KEY_TYPES},
        "other": (delta["used_memory"] - sum(delta[k] for k in KEY_TYPES)) / n,
        "info_memory_delta": {k: after[k] - before[k] for k in INFO_FIELDS},
        "inbox_entries_left": left,
        "trim_wait_s": trim_wait,
        "state_blob_avg": blob_avg,
        "state_blob_max": blob_max,
        "actor_id_example": example,
        "actors_per_shard_max": max(per_shard),
        "actors_per_shard_min": min(per_shard),
        "idle_timeout_s": limits.idle_timeout,
        "max_activations_per_shard": limits.max_activations,
        "trim_interval_s": limits.trim_interval,
        "rss_mib_before": rss_before,
        "rss_mib_after": rss_after,
        "rss_mib_after_trim": rss_trimmed,
        "rss_bytes_per_activation": (rss_after - rss_before) * mib / n,
        "rss_s_after_first_send": rss_at - started,
        "rss_after_trim_s_after_first_send": rss_trimmed_at - started,
        "lease_changes": changes,
        "worker_log": worker_log,
        "server_latency_ms": spikes,
    }


# ---- report ------------------------------------------------------------------------------------
def owner_changes(res: dict[str, Any]) -> str:
    n = res["lease_changes"]
    note = "" if n == 0 else " (leases were lost under the load: failovers are included)"
    line = f"   shard owner changes while measuring: {n}{note}"
    log = res.get("worker_log")
    if log:
        line += (
            f"; worker log: {log['lines']} warning/error lines ({log['lease_lost']} lost leases, "
            f"{log['errors']} errors, {log['already_applied']} 'already applied' resets)"
        )
    spikes = res.get("server_latency_ms")
    if spikes is not None:
        slow = ", ".join(f"{event} {ms} ms" for event, ms in sorted(spikes.items())) or "none"
        line += f"\n   server events slower than {LATENCY_MS} ms (LATENCY LATEST, max): {slow}"
    return line


def report_sleepers(res: dict[str, Any]) -> list[str]:
    n = res["sleepers"]
    total = res["bytes_per_sleeper"]
    verdict = "under" if total < TARGET_BYTES else "OVER"
    lines = [
        f"1. bytes per sleeping actor: {n:,} Sleeper actors, each in sleep(timedelta(days=30))",
        f"   populated in {res['populate_s']:.1f}s ({res['populate_per_s']:,.0f} suspended/s, "
        f"{res['processes']} worker procs, send_many chunks of {SEND_CHUNK:,})",
        f"   open-turn blob: {res['open_turn_blob_avg']:.0f} bytes avg, {res['open_turn_blob_max']} max "
        f"(sample of 1,000); actor id e.g. {res['actor_id_example']!r}",
        "",
        f"   {'what':<52} {'bytes/sleeper':>13}",
        f"   {'-' * 66}",
    ]
    for kind in KEY_TYPES:
        what = f"{kind} (MEMORY USAGE SAMPLES {SAMPLES}, 16 keys, delta)"
        lines.append(f"   {what:<52} {res['by_key_type'][kind]:>13.1f}")
    lines += [
        f"   {'other (used_memory delta - the above)':<52} {res['other']:>13.1f}",
        f"   {'used_memory delta / N, inboxes trimmed':<52} {total:>13.1f}   "
        f"{verdict} the {TARGET_BYTES}-byte target",
        f"   {'used_memory delta / N, just suspended (untrimmed)':<52} "
        f"{res['bytes_per_sleeper_untrimmed']:>13.1f}   "
        f"(inbox streams then {res['inbox_bytes_per_sleeper_untrimmed']:.1f})",
        f"   used_memory {res['used_memory_before'] / 2**20:.1f} MiB before, "
        f"{res['used_memory_after'] / 2**20:.1f} MiB after; {res['inbox_entries_left']} inbox entries "
        f"left after trimming ({res['trim_wait_s']:.1f}s wait); worker RSS "
        + ", ".join(f"{x:.0f}" for x in res["worker_rss_mib"])
        + " MiB",
        owner_changes(res),
    ]
    return lines


def report_timers(res: dict[str, Any]) -> list[str]:
    m = res["timers"]
    title = f"2. timers: {m:,} Alarm actors in sleep(until=T), one T for all; {res['processes']} worker procs"
    if "failed" in res:
        return [
            title,
            f"   FAILED: {res['failed']}",
            *(f"     {row}" for row in res["diagnosis"]),
            owner_changes(res),
        ]
    early = "none early" if res["early"] == 0 else f"{res['early']} EARLY"
    return [
        title,
        f"   all suspended {res['spare_s']:.2f}s before T "
        f"(sending and suspending took {res['suspend_s']:.2f}s)",
        "",
        f"   {'lateness (wake-up time.time() - T)':<40} {'min':>8} {'p50':>8} {'p99':>8} {'max':>8}",
        f"   {'-' * 76}",
        f"   {'ms':<40} {res['late_ms_min']:>8.1f} {res['late_ms_p50']:>8.1f} "
        f"{res['late_ms_p99']:>8.1f} {res['late_ms_max']:>8.1f}   {early}",
        "",
        f"   {'fired/s: M / (last wake-up - T)':<40} {res['fired_per_s']:>10,.0f}",
        f"   {'committed/s: M / (all committed - T)':<40} {res['committed_per_s']:>10,.0f}   "
        f"(last commit seen {res['committed_s']:.2f}s after T)",
        owner_changes(res),
    ]


def report_steps(res: dict[str, Any]) -> list[str]:
    k, n = res["k"], res["messages"]
    lines = [
        f"3. journaled steps: K={k} per turn; {n:,} messages to {res['actors']} actors, all sent "
        f"at once (throughput), and {res['serial']} awaited asks to one actor (latency); "
        f"{res['processes']} worker procs",
        "",
        f"   {'handler':<44} {'turns/s':>9} {'+us/step':>9} {'ask ms':>8} {'+us/step':>9}",
        f"   {'-' * 83}",
    ]
    for run in res["runs"].values():
        added = "" if run["added_us_per_step"] is None else f"{run['added_us_per_step']:.0f}"
        serial = "" if run["added_serial_us_per_step"] is None else f"{run['added_serial_us_per_step']:.0f}"
        lines.append(
            f"   {run['label']:<44} {run['turns_per_s']:>9,.0f} {added:>9} "
            f"{run['serial_ms_per_turn']:>8.2f} {serial:>9}"
        )
    lines += [
        "",
        "   +us/step (throughput) = (t_step - t_plain) / (messages * K): wall time added per step with",
        f"   {res['actors']} actors busy at once; +us/step (latency) = (ask ms - plain ask ms) / K for one",
        "   actor alone. Each step is one fenced Redis write of the open turn before the handler goes on.",
        owner_changes(res),
    ]
    return lines


def report_idle(res: dict[str, Any]) -> list[str]:
    n = res["actors"]
    mib = 2**20
    ttl, cap = res["idle_timeout_s"], res["max_activations_per_shard"]
    fresh = res["rss_s_after_first_send"] < ttl
    note = (
        "all still activated"
        if fresh and res["actors_per_shard_max"] <= cap
        else "SOME MAY HAVE BEEN EVICTED: past idle_timeout or max_activations"
    )
    lines = [
        f"4. idle actors: {n:,} distinct Counter actors, one message each (state: one int, +1), "
        f"{res['processes']} worker proc",
        f"   populated in {res['populate_s']:.1f}s ({res['populate_per_s']:,.0f} committed/s, send_many "
        f"chunks of {SEND_CHUNK:,}); state blob {res['state_blob_avg']:.0f} bytes avg, "
        f"{res['state_blob_max']} max (sample of 1,000); actor id e.g. {res['actor_id_example']!r}",
        "",
        f"   {'Redis, once the inboxes are trimmed':<52} {'bytes/actor':>13}",
        f"   {'-' * 66}",
        f"   {f'state hashes (MEMORY USAGE SAMPLES {SAMPLES}, delta)':<52} "
        f"{res['by_key_type']['state']:>13.1f}",
        f"   {'inbox streams (same)':<52} {res['by_key_type']['inbox']:>13.1f}",
        f"   {'turns + timers (same; no open turns)':<52} "
        f"{res['by_key_type']['turns'] + res['by_key_type']['timers']:>13.1f}",
        f"   {'other (used_memory delta - the above)':<52} {res['other']:>13.1f}",
        f"   {'used_memory delta / N':<52} {res['bytes_per_actor']:>13.1f}",
        f"   used_memory {res['used_memory_before'] / mib:.1f} MiB before, "
        f"{res['used_memory_after'] / mib:.1f} MiB after; {res['inbox_entries_left']} inbox entries "
        f"left after trimming ({res['trim_wait_s']:.1f}s wait)",
        "",
        f"   {'worker process (1 proc, all 16 shards)':<52} {'RSS MiB':>13}",
        f"   {'-' * 66}",
        f"   {'before the first send':<52} {res['rss_mib_before']:>13.1f}",
        f"   {'just after all N committed':<52} {res['rss_mib_after']:>13.1f}   "
        f"({res['rss_s_after_first_send']:.1f}s after the first send)",
        f"   {'after the trimming wait':<52} {res['rss_mib_after_trim']:>13.1f}   "
        f"({res['rss_after_trim_s_after_first_send']:.1f}s after the first send)",
        f"   {'(after - before) / N, bytes per activation':<52} {res['rss_bytes_per_activation']:>13,.0f}",
        f"   activation limits (WorkerSettings defaults): idle_timeout {ttl:g}s, max_activations "
        f"{cap:,} per shard",
        f"   ({cap * SHARDS:,} for a process holding all {SHARDS} shards), checked every trim_interval "
        f"{res['trim_interval_s']:g}s; here {res['actors_per_shard_min']:,}-{res['actors_per_shard_max']:,} "
        f"actors per shard: {note}",
        owner_changes(res),
    ]
    return lines


PARTS = ("sleepers", "timers", "steps", "idle")


async def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--sleepers", type=int, default=100_000, help="N sleeping actors (part 1)")
    parser.add_argument("--timers", type=int, default=20_000, help="M actors woken at one instant (part 2)")
    parser.add_argument("--timer-margin", type=float, default=None,
                        help="seconds from the first send to T (default 2 + M/4000)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=10, help="K steps per turn (part 3)")
    parser.add_argument("--step-messages", type=int, default=2_000, help="messages per handler kind (part 3)")
    parser.add_argument("--step-actors", type=int, default=200, help="actors per handler kind (part 3)")
    parser.add_argument("--serial", type=int, default=100, help="awaited asks to one actor (part 3)")
    parser.add_argument("--idle-actors", type=int, default=100_000, help="N idle actors (part 4)")
    parser.add_argument("--processes", type=int, default=2, help="worker processes (parts 1-3; idle uses 1)")
    parser.add_argument("--only", action="append", choices=PARTS, help="run only this part (repeatable)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    parts = args.only or list(PARTS)

    results: dict[str, Any] = {}
    with private_server("workflows") as run:
        r = aioredis.Redis.from_url(run.url)
        try:
            server_info = await r.info("server")
            mem_info = await r.info("memory")
            await r.config_set("latency-monitor-threshold", LATENCY_MS)
        finally:
            await r.aclose()
        runs = (("sleepers", run_sleepers), ("timers", run_timers), ("steps", run_steps), ("idle", run_idle))
        for part, run_part in runs:
            if part in parts:
                results[part] = await run_part(run.url, run.tmp, args)
        failed = [part for part, res in results.items() if "failed" in res]
        run.keep = bool(failed)  # its worker logs say why

    name = "valkey" if "valkey_version" in server_info else "redis"
    version = server_info.get("valkey_version") or server_info.get("redis_version")
    header = [
        run.machine_line(server=f"{name} {version} (allocator {mem_info.get('mem_allocator')})"),
        f"{SHARDS} shards; parts: {', '.join(parts)}",
    ]
    sections = {
        "sleepers": report_sleepers,
        "timers": report_timers,
        "steps": report_steps,
        "idle": report_idle,
    }
    for line in header:
        print(line)
    for part, res in results.items():
        print()
        for line in sections[part](res):
            print(line)
    if args.json:
        write_json(args.json, {"header": header, "results": results})
    if failed:
        kept = f"server data and worker logs kept in {run.tmp}"
        print(f"\nFAILED: {', '.join(failed)}; {kept}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    asyncio.run(main())

"""Peers: the same job on our runtime and on other Python task systems, on the same private
Valkey server, in the same run.

    python -m benchmarks.peers [--messages 5000] [--rate 200] [--seconds 3] [--actors 1000]
                               [--only ours,arq,dramatiq,taskiq,celery,dbos,dbos-pg]
                               [--rounds 1] [--json PATH]

The peers are optional (``pip install -e '.[bench-peers]'``, plus ``pip install --no-deps arq``:
arq pins redis<6): one whose package is missing, or that fails, gets one line saying why and the
run goes on; with none installed the command prints one line and stops.

Everything runs on a private server (AOF on, fsync every second) that this command starts on a
free loopback port in a temporary directory and stops at the end. Each system gets ONE real
worker process (a subprocess started by its own CLI; dramatiq's and taskiq's CLIs keep a
supervising parent that runs no jobs) and its broker keys on that server; DBOS keeps its queue
in its system database: a SQLite file in the same temporary directory (``dbos``), or a private
PostgreSQL server (``dbos-pg``, ``benchmarks.postgres``: started the same way, on loopback, as
an unprivileged user when run as root, if Postgres binaries are found; else that line says
``DBOS (Postgres): skipped: <why>``). The systems run one after another.

The job (``benchmarks.peer_jobs.common``), the same for all: payload ``{"n": i}``, a no-op
handler. For throughput it only adds 1 to an in-process counter and makes no Redis call; a
thread of its own in each worker process writes ``SET`` of that count to a key every 5 ms when
it changed, which the producer polls. For latency it makes one Redis call, ``RPUSH`` of
``time.time()`` at handler start minus the send time the payload carries. The handler is
``async def`` wherever the system has async handlers (celery has none: a sync task, and a sync
client for the ``RPUSH``).

For each system, after a warm-up of 50 jobs (which also waits out the worker's start-up):

* **jobs/s**: ``--messages`` N payloads are enqueued as fast as the library allows, from one
  producer in this process, and the clock runs from the first enqueue until the counter reads N
  (polled every 5 ms; the worker writes it every 5 ms: the time includes up to ~10 ms of this
  polling). The producer uses the library's batch API where it has one (ours:
  ``client.send_many`` in chunks of 500; DBOS: ``DBOSClient.enqueue_in_transaction``, 500 per
  database transaction); async libraries without one get 50 enqueue calls in flight at a time
  (arq ``enqueue_job``, taskiq ``kiq``); sync ones are called in a loop in one thread (dramatiq
  ``send``, celery ``apply_async`` on one producer). The time the enqueueing alone took is
  printed too: when it is close to the total, the producer was the limit.
* **latency**: open loop at ``--rate`` jobs/s for ``--seconds``: each job's enqueue call is
  started at its slot of a fixed schedule without waiting for the ones before it (``client.send``
  for ours, the same single-job calls as above for the peers; blocking calls run in a pool of 8
  threads), with ``t = time.time()`` taken when the call is started; p50 and p99 of handler
  start - t, over all jobs. The check column says when the last job ran more than 1 s after
  the last enqueue returned (the system did not keep up with the load).
* **check**: after both, the counter must read exactly 50 + N and the list hold exactly
  rate x seconds entries (a handler run twice shows here).

Settings, each system's most durable standard one (all on the same server, AOF everysec):

* ours: ``actors.cli worker``, 16 shards; a counter actor (state snapshotted every turn,
  exactly-once turns), message i to actor ``i % --actors``.
* arq: defaults (max_jobs 10, queue polled every 0.5 s, a job in progress is re-run if its
  worker dies), JSON job serializer instead of pickle.
* dramatiq: Redis broker (messages acked after the actor ran, a dead worker's requeued), 1
  process x 8 threads (the default threads), an async actor via the ``AsyncIO`` middleware,
  JSON encoder (its default).
* taskiq: taskiq-redis ``RedisStreamBroker`` (consumer group, ``XACK`` after the task), ack type
  ``when_saved`` (its default and most durable), 1 worker process, max 100 async tasks (default).
* celery: Redis broker, ``task_acks_late=True``, ``task_reject_on_worker_lost=True``,
  ``worker_prefetch_multiplier=1``, threads pool with concurrency 4 (so one process), JSON,
  no result backend, ``--without-gossip --without-mingle --without-heartbeat``.
* DBOS (SQLite): queued async workflows, SQLite system database (a commit and fsync per state
  change), queue polled every 1 s (its default), portable JSON serializer instead of pickle.
* DBOS (Postgres): the same, with its system database on the private Postgres (a new database
  per round; Postgres's defaults: ``fsync``, ``synchronous_commit`` and ``full_page_writes``
  on; driver psycopg 3, which dbos depends on).

``--rounds R`` repeats everything R times and keeps each system's median throughput sample and
its latency sample from that round.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import redis.asyncio as aioredis
from pydantic import BaseModel

import actors

from .common import ROOT, SHARDS, argument_parser, child_env, median_of, private_server, write_json
from .common import worker_argv as actors_worker_argv
from .peer_jobs import common
from .peer_jobs.common import done_key, latency_key, ready_key
from .postgres import PrivatePostgres, private_postgres

WARMUP = 50
CHUNK = 500
"""Jobs per batch for producers with a batch API (ours, DBOS)."""
IN_FLIGHT = 50
"""Enqueue calls in flight at once for async producers without a batch API."""
POLL_S = 0.005
STARTUP_S = 90.0
"""How long a worker may take to run its warm-up jobs (start-up included)."""
STALL_S = 30.0
"""Give up when the counter does not move for this long."""
SEND_THREADS = 8
"""Threads the latency load's sends run in, for libraries whose enqueue call blocks."""

Payload = dict[str, Any]


# ---- ours: a counter-like actor --------------------------------------------------------
class Job(BaseModel):
    n: int
    t: float | None = None


class Jobs(actors.Actor):
    class State(BaseModel):
        total: int = 0

    async def on_job(self, msg: Job) -> None:
        self.state.total += 1
        await common.record(msg.model_dump(exclude_none=True))


app = actors.App(Jobs)
APP_SPEC = "benchmarks.peers:app"


# ---- the systems -----------------------------------------------------------------------
@dataclass
class Context:
    url: str
    prefix: str
    tmp: Path
    actor_count: int
    round_no: int
    postgres: PrivatePostgres | None = None
    """The private Postgres (``dbos-pg``), if it started."""

    @property
    def sqlite_url(self) -> str:
        return f"sqlite:///{self.tmp / f'dbos-{self.round_no}.sqlite'}"

    @property
    def postgres_database(self) -> str:
        return f"dbos{self.round_no}"


class System:
    """One system under test: how to start its worker and how to enqueue to it."""

    key: ClassVar[str]
    label: ClassVar[str] = ""
    """Its name in the results table (``key`` if empty)."""
    setting: ClassVar[str]
    packages: ClassVar[tuple[str, ...]] = ()
    install: ClassVar[str] = "pip install -e '.[bench-peers]'"
    sync: ClassVar[bool] = False
    """Its enqueue calls block: run them in a thread."""
    needs_postgres: ClassVar[bool] = False
    """Runs only when the private Postgres started (``benchmarks.postgres``)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    @classmethod
    def name(cls) -> str:
        return cls.label or cls.key

    def worker_argv(self) -> list[str]:
        raise NotImplementedError

    def worker_env(self) -> dict[str, str]:
        """Extra environment of its worker process."""
        return {}

    def prepare(self) -> None:
        """Called before its worker is started."""

    async def open(self, worker: Worker) -> None:
        pass

    async def close(self) -> None:
        pass

    async def produce(self, payloads: list[Payload]) -> None:
        """Enqueue all of ``payloads`` as fast as the library allows (async libraries)."""
        raise NotImplementedError

    async def send(self, payload: Payload) -> None:
        """Enqueue one (async libraries)."""
        raise NotImplementedError

    def produce_sync(self, payloads: list[Payload]) -> None:
        raise NotImplementedError

    def send_sync(self, payload: Payload) -> None:
        raise NotImplementedError


async def in_flight(calls: Callable[[Payload], Awaitable[Any]], payloads: list[Payload]) -> None:
    for first in range(0, len(payloads), IN_FLIGHT):
        await asyncio.gather(*(calls(p) for p in payloads[first : first + IN_FLIGHT]))


class Ours(System):
    key = "ours"
    setting = f"actors worker, {SHARDS} shards; counter actor, state saved per turn; send_many x{CHUNK}"

    def worker_argv(self) -> list[str]:
        return actors_worker_argv(APP_SPEC, self.ctx.url, self.namespace)

    @property
    def namespace(self) -> str:
        return self.ctx.prefix.replace(":", "-")

    async def open(self, worker: Worker) -> None:
        self.stack = contextlib.AsyncExitStack()
        self.client = await self.stack.enter_async_context(
            actors.connect(self.ctx.url, namespace=self.namespace, app=app, shards=SHARDS)
        )

    async def close(self) -> None:
        await self.stack.aclose()

    def item(self, p: Payload) -> tuple[actors.ActorRef[Any], BaseModel]:
        return Jobs.ref(f"j{p['n'] % self.ctx.actor_count}"), Job(**p)

    async def produce(self, payloads: list[Payload]) -> None:
        for first in range(0, len(payloads), CHUNK):
            await self.client.send_many([self.item(p) for p in payloads[first : first + CHUNK]])

    async def send(self, payload: Payload) -> None:
        await self.client.send(*self.item(payload))


class Arq(System):
    key = "arq"
    setting = f"defaults (max_jobs 10, poll 0.5 s); JSON; enqueue_job x{IN_FLIGHT} in flight"
    packages = ("arq",)
    install = "pip install --no-deps arq: it pins redis<6"

    def worker_argv(self) -> list[str]:
        return [sys.executable, "-m", "arq", "benchmarks.peer_jobs.arq_worker.WorkerSettings"]

    async def open(self, worker: Worker) -> None:
        from arq import create_pool

        from .peer_jobs import arq_worker

        self.pool = await create_pool(
            arq_worker.WorkerSettings.redis_settings,
            job_serializer=arq_worker.dumps,
            job_deserializer=json.loads,
        )

    async def close(self) -> None:
        await self.pool.aclose()

    async def send(self, payload: Payload) -> None:
        await self.pool.enqueue_job(common.JOB, payload)

    async def produce(self, payloads: list[Payload]) -> None:
        await in_flight(self.send, payloads)


class Dramatiq(System):
    key = "dramatiq"
    setting = "Redis broker, ack after run; 1 proc x 8 threads, async actor; JSON; send in a loop"
    packages = ("dramatiq", "redis")
    sync = True

    def worker_argv(self) -> list[str]:
        return [sys.executable, "-m", "dramatiq", "benchmarks.peer_jobs.dramatiq_worker",
                "--processes", "1", "--threads", "8"]  # fmt: skip

    async def open(self, worker: Worker) -> None:
        from .peer_jobs import dramatiq_worker

        self.actor = dramatiq_worker.peers_job

    def send_sync(self, payload: Payload) -> None:
        self.actor.send(payload)

    def produce_sync(self, payloads: list[Payload]) -> None:
        for p in payloads:
            self.actor.send(p)


class Taskiq(System):
    key = "taskiq"
    setting = f"RedisStreamBroker, XACK when_saved; 1 worker proc; JSON; kiq x{IN_FLIGHT} in flight"
    packages = ("taskiq", "taskiq_redis")

    def worker_argv(self) -> list[str]:
        return [sys.executable, "-m", "taskiq", "worker", "benchmarks.peer_jobs.taskiq_worker:broker",
                "--workers", "1", "--ack-type", "when_saved", "--log-level", "WARNING"]  # fmt: skip

    async def open(self, worker: Worker) -> None:
        from .peer_jobs import taskiq_worker

        self.module = taskiq_worker
        await taskiq_worker.broker.startup()

    async def close(self) -> None:
        await self.module.broker.shutdown()

    async def send(self, payload: Payload) -> None:
        await self.module.peers_job.kiq(payload)

    async def produce(self, payloads: list[Payload]) -> None:
        await in_flight(self.send, payloads)


class Celery(System):
    key = "celery"
    setting = "Redis, acks_late, reject_on_worker_lost, prefetch x1; threads pool c=4; JSON"
    packages = ("celery", "kombu", "redis")
    sync = True

    def worker_argv(self) -> list[str]:
        return [sys.executable, "-m", "celery", "-A", "benchmarks.peer_jobs.celery_worker", "worker",
                "--pool", "threads", "--concurrency", "4", "--prefetch-multiplier", "1",
                "--loglevel", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat",
                "-Q", common.queue("celery"), "-n", f"peers-{os.getpid()}@localhost"]  # fmt: skip

    async def open(self, worker: Worker) -> None:
        from .peer_jobs import celery_worker

        self.module = celery_worker

    def send_sync(self, payload: Payload) -> None:
        self.module.peers_job.apply_async((payload,))

    def produce_sync(self, payloads: list[Payload]) -> None:
        with self.module.app.producer_or_acquire() as producer:
            for p in payloads:
                self.module.peers_job.apply_async((p,), producer=producer)


class Dbos(System):
    key = "dbos"
    label = "DBOS (SQLite)"
    setting = f"queued async workflows, SQLite (fsync/commit), poll 1 s; JSON; {CHUNK} per txn"
    packages: ClassVar[tuple[str, ...]] = ("dbos", "sqlalchemy")
    sync = True

    @property
    def database_url(self) -> str:
        """Its system database, as DBOS is given it."""
        return self.ctx.sqlite_url

    def engine_options(self) -> tuple[Any, dict[str, Any]]:
        """The URL and options of the SQLAlchemy engine its batches are enqueued through."""
        return self.database_url, {"connect_args": {"timeout": 30}}

    def worker_argv(self) -> list[str]:
        return [sys.executable, "-m", "benchmarks.peer_jobs.dbos_worker"]

    def worker_env(self) -> dict[str, str]:
        return {common.DBOS_URL_ENV: self.database_url}

    async def open(self, worker: Worker) -> None:
        import sqlalchemy as sa
        from dbos import DBOSClient, DBOSPortableJSONSerializer

        from .peer_jobs import dbos_worker

        # DBOSClient never migrates: wait until the worker has created the schema and the queue.
        r = aioredis.Redis.from_url(self.ctx.url)
        try:
            await worker.wait_for(lambda: r.exists(ready_key(self.ctx.prefix)), STARTUP_S, "DBOS launch")
        finally:
            await r.aclose()
        self.client = DBOSClient(
            system_database_url=self.database_url,
            serializer=DBOSPortableJSONSerializer(),
            application_name=dbos_worker.APP_NAME,
        )
        url, options = self.engine_options()
        self.engine = sa.create_engine(url, **options)
        self.options: Any = {"queue_name": common.QUEUE, "workflow_name": common.JOB}

    async def close(self) -> None:
        self.engine.dispose()
        self.client.destroy()

    def send_sync(self, payload: Payload) -> None:
        self.client.enqueue(self.options, payload)

    def produce_sync(self, payloads: list[Payload]) -> None:
        for first in range(0, len(payloads), CHUNK):
            with self.engine.begin() as conn:
                for p in payloads[first : first + CHUNK]:
                    self.client.enqueue_in_transaction(conn, self.options, p)


class DbosPostgres(Dbos):
    key = "dbos-pg"
    label = "DBOS (Postgres)"
    setting = f"queued async workflows, Postgres (fsync, sync commit), poll 1 s; JSON; {CHUNK} per txn"
    packages = ("dbos", "sqlalchemy", "psycopg")
    needs_postgres = True

    @property
    def postgres(self) -> PrivatePostgres:
        if self.ctx.postgres is None:
            raise RuntimeError("no private Postgres")
        return self.ctx.postgres

    @property
    def database_url(self) -> str:
        return self.postgres.url(self.ctx.postgres_database)

    def engine_options(self) -> tuple[Any, dict[str, Any]]:
        # DBOS picks psycopg 3 itself; a plain postgresql:// engine would ask for psycopg2.
        return self.postgres.url(self.ctx.postgres_database, scheme="postgresql+psycopg"), {}

    def prepare(self) -> None:
        self.postgres.create_database(self.ctx.postgres_database)


SYSTEMS: Sequence[type[System]] = (Ours, Arq, Dramatiq, Taskiq, Celery, Dbos, DbosPostgres)


# ---- worker processes -----------------------------------------------------------------
@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    log: Path

    def last_line(self) -> str:
        text = self.log.read_text(errors="replace").strip() if self.log.exists() else ""
        return text.splitlines()[-1][:200] if text else "(empty log)"

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {self.proc.returncode}: {self.last_line()}")

    async def wait_for(self, check: Callable[[], Awaitable[Any]], timeout: float, what: str) -> None:
        deadline = time.perf_counter() + timeout
        while not await check():
            self.check_alive()
            if time.perf_counter() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}: {self.last_line()}")
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM to its process group (CLIs that fork children), SIGKILL after 20 s."""
        for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=wait)
        with contextlib.suppress(ProcessLookupError):  # children left behind by the CLI
            os.killpg(self.proc.pid, signal.SIGKILL)


def spawn(system: System, ctx: Context) -> Worker:
    env = child_env({common.URL_ENV: ctx.url, common.PREFIX_ENV: ctx.prefix, **system.worker_env()})
    log = ctx.tmp / f"{ctx.prefix.replace(':', '-')}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(system.worker_argv(), cwd=ROOT, env=env, stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    return Worker(proc, log)


async def wait_count(
    read: Callable[[], Awaitable[int]], target: int, worker: Worker, first_timeout: float
) -> float:
    """Poll ``read`` until it reaches ``target``; returns the perf_counter time it was seen.

    Fails if the worker exits, if nothing counts for ``first_timeout`` seconds at first, or if
    the count then stands still for STALL_S.
    """
    last, moved = -1, time.perf_counter()
    limit = first_timeout
    while True:
        value = await read()
        now = time.perf_counter()
        if value >= target:
            return now
        if value != last:
            if last >= 0:
                limit = STALL_S
            last, moved = value, now
        elif now - moved > limit:
            raise RuntimeError(f"stuck at {value} of {target} for {limit:.0f}s: {worker.last_line()}")
        worker.check_alive()
        await asyncio.sleep(POLL_S)


# ---- one system, start to end -----------------------------------------------------------
@dataclass
class Result:
    key: str
    label: str
    setting: str
    messages: int
    seconds: float
    enqueue_seconds: float
    latencies_ms: list[float] = field(repr=False)
    offered_rate: float
    achieved_rate: float
    drain_seconds: float
    """From the last latency-load send until its last handler ran."""
    check: str

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else float("inf")

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def produce(system: System, payloads: list[Payload]) -> None:
    if system.sync:
        await asyncio.to_thread(system.produce_sync, payloads)
    else:
        await system.produce(payloads)


async def open_loop(system: System, rate: float, count: int) -> float:
    """Enqueue ``count`` jobs, job k at start + k / rate, each without waiting for the ones
    before it (sync libraries: in a pool of SEND_THREADS threads); returns the achieved rate of
    starting sends. The payload's ``t`` is taken when the send is started."""
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(SEND_THREADS, thread_name_prefix="send") if system.sync else None

    def send(k: int) -> Awaitable[None]:
        payload: Payload = {"n": k, "t": time.time()}
        if pool is not None:
            return loop.run_in_executor(pool, system.send_sync, payload)
        return asyncio.ensure_future(system.send(payload))

    try:
        start = time.perf_counter()
        pending: list[Awaitable[None]] = []
        for k in range(count):
            delay = start + k / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            pending.append(send(k))
        span = time.perf_counter() - start
        await asyncio.gather(*pending)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    return (count - 1) / span if span > 0 and count > 1 else float("nan")


async def run_system(system: System, worker: Worker, r: aioredis.Redis, n: int, rate: float,
                     seconds: float) -> Result:  # fmt: skip
    done, lat = done_key(system.ctx.prefix), latency_key(system.ctx.prefix)

    async def count_done() -> int:
        return int(await r.get(done) or 0)

    async def count_lat() -> int:
        return int(await r.llen(lat))

    await system.open(worker)
    try:
        await produce(system, [{"n": -1 - i} for i in range(WARMUP)])
        await wait_count(count_done, WARMUP, worker, STARTUP_S)

        payloads = [{"n": i} for i in range(n)]
        started = time.perf_counter()
        await produce(system, payloads)
        enqueued = time.perf_counter()
        finished = await wait_count(count_done, WARMUP + n, worker, STALL_S)

        count = max(1, round(rate * seconds))
        achieved = await open_loop(system, rate, count)
        all_sent = time.perf_counter()
        drained = await wait_count(count_lat, count, worker, STALL_S)
        await asyncio.sleep(0.2)  # a late duplicate would show in the check below
        ran, listed = await count_done(), await count_lat()
        latencies = [float(v) * 1000 for v in await r.lrange(lat, 0, -1)]
    finally:
        await system.close()
    notes = []
    if ran != WARMUP + n:
        notes.append(f"COUNTER {ran} != {WARMUP + n}")
    if listed != count:
        notes.append(f"LATENCY LIST {listed} != {count}")
    if not notes:
        notes.append("counts exact")
    if achieved < 0.98 * rate:
        notes.append(f"latency load sent at only {achieved:,.0f}/s")
    if drained - all_sent > 1.0:
        notes.append(f"latency load: last job ran {drained - all_sent:.1f}s after the last send")
    check = "; ".join(notes)
    return Result(system.key, system.name(), system.setting, n, finished - started, enqueued - started,
                  latencies, rate, achieved, drained - all_sent, check)  # fmt: skip


def installed(package: str) -> bool:
    if package in sys.modules:  # some set no __spec__ once imported (kombu)
        return True
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def missing_packages(cls: type[System]) -> list[str]:
    return [p for p in cls.packages if not installed(p)]


async def run_round(
    url: str, tmp: Path, args: argparse.Namespace, round_no: int, postgres: PrivatePostgres | None
) -> dict[str, Result]:
    results: dict[str, Result] = {}
    r = aioredis.Redis.from_url(url)
    try:
        for cls in SYSTEMS:
            if cls.key not in args.only:
                continue
            missing = missing_packages(cls)
            if missing:
                if round_no == 0:
                    print(f"{cls.key}: skipped, not installed: {', '.join(missing)} ({cls.install})",
                          flush=True)  # fmt: skip
                continue
            if cls.needs_postgres and postgres is None:
                continue  # main said why
            ctx = Context(url, f"peers{round_no}:{cls.key}", tmp, args.actors, round_no, postgres)
            system = cls(ctx)
            try:
                system.prepare()
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                print(f"{cls.key}: failed before its worker started, {reason}", flush=True)
                continue
            worker = spawn(system, ctx)
            try:
                result = await run_system(system, worker, r, args.messages, args.rate, args.seconds)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                print(f"{cls.key}: failed, {reason} (worker log: {worker.log})", flush=True)
                continue
            finally:
                worker.stop()
            results[cls.key] = result
            print(f"{cls.key}: {result.rate:,.0f} jobs/s, p50 {result.pct(0.5):.1f} ms, "
                  f"p99 {result.pct(0.99):.1f} ms", flush=True)  # fmt: skip
    finally:
        await r.aclose()
    return results


# ---- report ----------------------------------------------------------------------------
def print_report(header: Sequence[str], results: dict[str, Result]) -> None:
    ours = results.get("ours")
    width = max([len("setting"), *(len(r.setting) for r in results.values())])
    names = max([len("system"), *(len(r.label) for r in results.values())])
    print()
    for line in header:
        print(line)
    print()
    print(f"{'system':<{names}} {'setting':<{width}} {'jobs/s':>8} {'ours/peer':>9} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'enqueue s':>9} {'total s':>8}  check")  # fmt: skip
    print("-" * (width + names + 71))
    for r in results.values():
        ratio = f"{ours.rate / r.rate:>9.2f}" if ours else f"{'-':>9}"
        print(f"{r.label:<{names}} {r.setting:<{width}} {r.rate:>8,.0f} {ratio} {r.pct(0.5):>8.1f} "
              f"{r.pct(0.99):>8.1f} {r.enqueue_seconds:>9.2f} {r.seconds:>8.2f}  {r.check}")  # fmt: skip


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("redis", "arq", "dramatiq", "taskiq", "taskiq-redis", "celery", "kombu", "dbos", "psycopg"):
        with contextlib.suppress(PackageNotFoundError):
            found.append(f"{name} {version(name)}")
    return ", ".join(found)


async def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--messages", type=int, default=5_000, help="N jobs for the throughput figure")
    parser.add_argument("--rate", type=float, default=200.0, help="offered load for latency, jobs/s")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of the latency load")
    parser.add_argument("--actors", type=int, default=1_000, help="our actors the jobs are spread over")
    parser.add_argument("--only", default=",".join(c.key for c in SYSTEMS), help="systems to run")
    parser.add_argument("--rounds", type=int, default=1, help="repeat everything; report medians")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = parser.parse_args(argv)
    args.only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = args.only - {c.key for c in SYSTEMS}
    if unknown:
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")
    if min(args.messages, args.actors, args.rounds) < 1 or args.rate <= 0 or args.seconds <= 0:
        parser.error("--messages, --actors, --rounds, --rate and --seconds must be positive")

    peers = [c for c in SYSTEMS if c.key in args.only and c is not Ours]
    if peers and all(missing_packages(c) for c in peers):
        reason = "no peer system is installed (pip install -e '.[bench-peers]')"
        print(f"peers: skipped, {reason}")
        if args.json:
            write_json(args.json, {"skipped": reason}, announce=False)
        return

    samples: dict[str, list[Result]] = {}
    skipped: set[str] = set()
    postgres_line = ""
    with private_server("peers") as run, contextlib.ExitStack() as stack:
        os.environ[common.URL_ENV] = run.url  # the peer modules read it when imported
        postgres: PrivatePostgres | None = None
        wanted = [c for c in SYSTEMS if c.key in args.only and c.needs_postgres and not missing_packages(c)]
        if wanted:
            postgres, why = stack.enter_context(private_postgres())
            if postgres is None:
                skipped.update(c.key for c in wanted)
                for c in wanted:
                    print(f"{c.name()}: skipped: {why}", flush=True)
            else:
                postgres_line = (
                    f"postgres: {postgres.version}, private, loopback TCP, default durability "
                    "(fsync, synchronous_commit, full_page_writes on)"
                )
        for round_no in range(args.rounds):
            for key, result in (await run_round(run.url, run.tmp, args, round_no, postgres)).items():
                samples.setdefault(key, []).append(result)
        ran = {c.key for c in SYSTEMS if c.key in args.only and not missing_packages(c)} - skipped
        failed = ran - set(samples)
        run.keep = bool(failed) or args.keep
    if run.keep:
        print(f"worker logs kept in {run.tmp}")

    results = {k: median_of(runs, lambda r: r.rate)[0] for k, runs in samples.items()}
    header = [
        run.machine_line(),
        f"jobs/s: {args.messages} jobs of {{'n': i}}, first enqueue -> all handlers ran (no-op "
        f"handlers: an in-process count, SET to Redis every 5 ms), 1 worker process per system; "
        f"latency: open loop, {args.rate:g} jobs/s for "
        f"{args.seconds:g} s, enqueue -> handler start; rounds: {args.rounds}",
        f"versions: {versions()}",
        *([postgres_line] if postgres_line else []),
    ]
    print_report(header, results)
    if args.json:
        payload = {
            "header": header,
            "results": {
                k: {
                    **{f: v for f, v in asdict(r).items() if f != "latencies_ms"},
                    "jobs_per_s": r.rate,
                    "ours_over_peer": results["ours"].rate / r.rate if "ours" in results else None,
                    "latency_p50_ms": r.pct(0.5),
                    "latency_p99_ms": r.pct(0.99),
                    "latency_mean_ms": statistics.fmean(r.latencies_ms),
                }
                for k, r in results.items()
            },
            "samples": {k: [r.rate for r in runs] for k, runs in samples.items()},
        }
        write_json(args.json, payload)


if __name__ == "__main__":
    asyncio.run(main())

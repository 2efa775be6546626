"""The one thing every handler in ``benchmarks.peers`` does, ours and the peers' alike.

A job's payload is ``{"n": i}`` (throughput) or ``{"n": i, "t": time.time() at send}``
(latency).

* Throughput: the handler is a no-op but for adding 1 to an in-process counter (under a
  ``threading.Lock``: celery's handlers run on 4 threads, and the flusher below reads it from
  another). It makes no Redis call.
  One daemon thread per worker process, started by its first job (a forked child starts its
  own), writes ``SET {prefix}:done <count>`` with a sync client of its own whenever the count
  changed, checking every ``FLUSH_S`` (5 ms). The producer polls that key, so each system's
  time includes up to 5 ms of flush delay (plus its own 5 ms poll). Each system runs its jobs in
  one worker process that is never restarted, so the key holds every job run: a job run twice
  counts twice.
* Latency: the handler makes one Redis call, ``RPUSH {prefix}:lat <seconds from send to
  handler start>`` (taken before the call; at the latency load's low rate its cost is small).
  The producer polls the list's length.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import redis
import redis.asyncio as aioredis

URL_ENV = "PEERS_REDIS_URL"
PREFIX_ENV = "PEERS_PREFIX"
DBOS_URL_ENV = "PEERS_DBOS_URL"
"""DBOS's system database: a SQLite file (``dbos``) or the private Postgres (``dbos-pg``)."""
QUEUE = "peers"
"""DBOS's queue (in its system database). The Redis-based peers get one named after them, as
``queue("celery")``: they share one server, and some keep a queue under its bare name."""
JOB = "peers_job"
MAX_CONNECTIONS = 50
FLUSH_S = 0.005
"""How often the flusher checks whether the count of jobs run changed."""


def queue(system: str) -> str:
    return f"{QUEUE}-{system}"


def done_key(prefix: str) -> str:
    return f"{prefix}:done"


def latency_key(prefix: str) -> str:
    return f"{prefix}:lat"


def ready_key(prefix: str) -> str:
    return f"{prefix}:ready"


def redis_url() -> str:
    return os.environ[URL_ENV]


_async: dict[int, aioredis.Redis] = {}
_sync: list[redis.Redis] = []


def _async_client() -> aioredis.Redis:
    """One client per event loop (some peers run handlers on a loop thread of their own)."""
    loop = id(asyncio.get_running_loop())
    client = _async.get(loop)
    if client is None:
        # Blocking: a handler waits for a free connection rather than failing at the
        # pool's limit (redis-py's default pool raises past 100 connections).
        pool = aioredis.BlockingConnectionPool.from_url(redis_url(), max_connections=MAX_CONNECTIONS)
        client = _async[loop] = aioredis.Redis(connection_pool=pool)
    return client


class _Done:
    """The jobs this process ran, and the thread that writes their number to ``{prefix}:done``."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.flushing = False

    def add(self) -> None:
        with self.lock:
            self.count += 1
            if not self.flushing:
                self.flushing = True
                threading.Thread(target=self.flush, name="peers-done", daemon=True).start()

    def flush(self) -> None:
        key = done_key(os.environ[PREFIX_ENV])
        client = redis.Redis.from_url(redis_url())
        written = 0
        while True:
            time.sleep(FLUSH_S)
            count = self.count
            if count == written:
                continue
            try:
                client.set(key, count)
            except redis.RedisError:
                continue  # retried at the next tick; the producer fails if it stalls
            written = count


_done = _Done()
# A forked child gets its own lock, count and flusher (threads do not survive a fork).
os.register_at_fork(after_in_child=_done.reset)


def _latency(payload: dict[str, Any], started: float) -> float | None:
    sent = payload.get("t")
    return None if sent is None else started - float(sent)


async def record(payload: dict[str, Any]) -> None:
    """What an async handler does."""
    latency = _latency(payload, time.time())
    if latency is None:
        _done.add()
    else:
        await _async_client().rpush(latency_key(os.environ[PREFIX_ENV]), f"{latency:.6f}")


def record_sync(payload: dict[str, Any]) -> None:
    """What a sync handler does (peers without async handlers)."""
    latency = _latency(payload, time.time())
    if latency is None:
        _done.add()
        return
    if not _sync:
        pool = redis.BlockingConnectionPool.from_url(redis_url(), max_connections=MAX_CONNECTIONS)
        _sync.append(redis.Redis(connection_pool=pool))
    _sync[0].rpush(latency_key(os.environ[PREFIX_ENV]), f"{latency:.6f}")

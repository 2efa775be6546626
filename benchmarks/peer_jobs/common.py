"""The one thing every handler in ``benchmarks.peers`` does, ours and the peers' alike.

A job's payload is ``{"n": i}`` (throughput) or ``{"n": i, "t": time.time() at send}``
(latency). The handler makes exactly one Redis call: ``INCR {prefix}:done`` for the former,
``RPUSH {prefix}:lat <seconds from send to handler start>`` for the latter. The producer polls
that counter or the list's length to know when all N ran.
"""

from __future__ import annotations

import asyncio
import os
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


def _command(payload: dict[str, Any], started: float) -> tuple[str, str, float | None]:
    prefix = os.environ[PREFIX_ENV]
    sent = payload.get("t")
    if sent is None:
        return "incr", done_key(prefix), None
    return "rpush", latency_key(prefix), started - float(sent)


async def record(payload: dict[str, Any]) -> None:
    """What an async handler does."""
    started = time.time()
    op, key, latency = _command(payload, started)
    r = _async_client()
    if op == "incr":
        await r.incr(key)
    else:
        await r.rpush(key, f"{latency:.6f}")


def record_sync(payload: dict[str, Any]) -> None:
    """What a sync handler does (peers without async handlers)."""
    started = time.time()
    op, key, latency = _command(payload, started)
    if not _sync:
        pool = redis.BlockingConnectionPool.from_url(redis_url(), max_connections=MAX_CONNECTIONS)
        _sync.append(redis.Redis(connection_pool=pool))
    if op == "incr":
        _sync[0].incr(key)
    else:
        _sync[0].rpush(key, f"{latency:.6f}")

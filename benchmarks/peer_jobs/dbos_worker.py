"""DBOS: ``python -m benchmarks.peer_jobs.dbos_worker``: one process that launches DBOS on the
system database at ``$PEERS_DBOS_URL`` (a SQLite file, or ``postgresql://...`` for the private
Postgres), listens to one queue and runs an ``async`` workflow per queued item.

Payloads and results use DBOS's portable JSON serializer (its default pickles). Stops on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import redis
from dbos import DBOS, DBOSConfig, DBOSPortableJSONSerializer

from .common import DBOS_URL_ENV, JOB, PREFIX_ENV, QUEUE, ready_key, record, redis_url

APP_NAME = "peers"


def config() -> DBOSConfig:
    return {
        "name": APP_NAME,
        "system_database_url": os.environ[DBOS_URL_ENV],
        "serializer": DBOSPortableJSONSerializer(),
        "log_level": "WARNING",
    }


@DBOS.workflow(name=JOB)
async def peers_job(payload: dict[str, Any]) -> None:
    await record(payload)


def main() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    DBOS(config=config())
    DBOS.launch()
    DBOS.register_queue(QUEUE)
    redis.Redis.from_url(redis_url()).set(ready_key(os.environ[PREFIX_ENV]), 1)
    stop.wait()
    DBOS.destroy(workflow_completion_timeout_sec=5)


if __name__ == "__main__":
    main()

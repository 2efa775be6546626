"""arq: ``python -m arq benchmarks.peer_jobs.arq_worker.WorkerSettings``. JSON job serializer."""

from __future__ import annotations

import json
from typing import Any

from arq.connections import RedisSettings

from .common import JOB, record, redis_url


def dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()


async def peers_job(ctx: dict[str, Any], payload: dict[str, Any]) -> None:
    await record(payload)


assert peers_job.__name__ == JOB


class WorkerSettings:
    functions = [peers_job]  # noqa: RUF012 (arq reads class attributes)
    redis_settings = RedisSettings.from_dsn(redis_url())
    job_serializer = staticmethod(dumps)
    job_deserializer = staticmethod(json.loads)

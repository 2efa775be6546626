"""taskiq: ``python -m taskiq worker benchmarks.peer_jobs.taskiq_worker:broker --ack-type when_saved``.

taskiq-redis's ``RedisStreamBroker``: ``XADD`` to a stream, ``XREADGROUP`` in a consumer group,
``XACK`` after the task ran and its (dummy) result was saved; JSON serializer (taskiq's default).
The group starts at id 0 so nothing sent before the worker created it is skipped.
"""

from __future__ import annotations

from typing import Any

from taskiq_redis import RedisStreamBroker

from .common import JOB, queue, record, redis_url

broker = RedisStreamBroker(redis_url(), queue_name=queue("taskiq"), consumer_id="0")


@broker.task(task_name=JOB)
async def peers_job(payload: dict[str, Any]) -> None:
    await record(payload)

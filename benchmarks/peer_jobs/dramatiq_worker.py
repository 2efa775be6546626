"""dramatiq: ``python -m dramatiq benchmarks.peer_jobs.dramatiq_worker --processes 1``.

Redis broker (acks after the actor ran; unacked messages of a dead worker are requeued), JSON
encoder (dramatiq's default), an ``async def`` actor through the ``AsyncIO`` middleware.
"""

from __future__ import annotations

from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware.asyncio import AsyncIO

from .common import JOB, queue, record, redis_url

broker = RedisBroker(url=redis_url())
broker.add_middleware(AsyncIO())
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name=JOB, queue_name=queue("dramatiq"))
async def peers_job(payload: dict[str, Any]) -> None:
    await record(payload)

"""celery: ``python -m celery -A benchmarks.peer_jobs.celery_worker worker --pool threads ...``.

Redis broker, JSON serializer, ``task_acks_late`` (ack after the task ran),
``task_reject_on_worker_lost``, ``worker_prefetch_multiplier=1``, no result backend. Celery tasks
are sync functions.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from .common import JOB, queue, record_sync, redis_url

app = Celery("peers", broker=redis_url())
app.conf.update(
    task_default_queue=queue("celery"),
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name=JOB)
def peers_job(payload: dict[str, Any]) -> None:
    record_sync(payload)

"""``actors worker``: load the app, run one worker process, or ``--processes N`` of them."""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import logging
import os
import signal
import sys

from . import processes, telemetry
from .actor import App
from .settings import LeaseSettings, RedisSettings, WorkerSettings
from .worker import Worker


def load_app(spec: str) -> App:
    """Import ``module:attribute`` and check it is an App."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SystemExit(f"APP must look like 'package.module:app', got {spec!r}")
    sys.path.insert(0, os.getcwd())
    app = getattr(importlib.import_module(module_name), attr, None)
    if not isinstance(app, App):
        raise SystemExit(f"{spec} is not an actors.App")
    return app


def cmd_worker(args: argparse.Namespace) -> int:
    if args.processes > 1:
        return processes.run_parent(_child_argv(args), args.processes, args.redis)
    app = load_app(args.app)
    telemetry.configure(args.otel)
    # A worker allocates many short-lived objects; with the default thresholds, full
    # collections of a large heap stalled the event loop past the lease TTL under load.
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    settings = WorkerSettings(
        shards=args.shards,
        max_redeliveries=args.max_redeliveries,
        dlq_max_len=args.dlq_max_len,
        dlq_max_age=args.dlq_max_age,
        lease=LeaseSettings(
            ttl=args.lease_ttl, renew_interval=args.renew_interval, stall_limit=args.stall_limit
        ),
    )
    worker = Worker(app, redis_settings(args), settings, shutdown_grace=args.grace)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        if args.parent_pid:  # a child of --processes N ends with its parent
            processes.watch_parent(args.parent_pid, lambda: loop.call_soon_threadsafe(worker.stop))
        await worker.run()

    logging.getLogger("actors").info("worker %s starting", worker.id)
    try:
        asyncio.run(run())
    finally:
        telemetry.shutdown()
    return 0


def _child_argv(args: argparse.Namespace) -> list[str]:
    """A child's arguments: this command's, for one process (the URL goes in its environment)."""
    argv = ["--log-level", args.log_level, "worker", args.app, "--processes", "1",
            "--lease-ttl", str(args.lease_ttl), "--renew-interval", str(args.renew_interval),
            "--stall-limit", str(args.stall_limit), "--max-redeliveries", str(args.max_redeliveries),
            "--grace", str(args.grace), "--dlq-max-len", str(args.dlq_max_len),
            "--dlq-max-age", str(args.dlq_max_age)]  # fmt: skip
    if args.namespace:
        argv += ["--namespace", args.namespace]
    if args.shards:
        argv += ["--shards", str(args.shards)]
    if args.otel:
        argv += ["--otel", args.otel]
    if args.durability:
        argv += ["--durability", args.durability]
    return argv


def redis_settings(args: argparse.Namespace) -> RedisSettings:
    return RedisSettings.from_env(args.redis, args.namespace, getattr(args, "durability", None))

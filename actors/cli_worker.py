"""``actors worker``: load the app, run one worker process, or ``--processes N`` of them.

The first SIGTERM or Ctrl-C drains (logged at once: the turns still running, the messages
read ahead that are left in Redis); a second one stops now: the process exits at once, and
what it had not committed waits in Redis for the next owner of its shards, whose leases
expire within a lease TTL. With ``--processes N`` the parent passes each signal on to its
children (which run in a session of their own, so a Ctrl-C reaches them once, through it)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys

from . import health, processes, telemetry
from .cli_run import load_app, redis_settings
from .settings import LeaseSettings, WorkerSettings
from .worker import Worker

log = logging.getLogger("actors")

FORGIVE_WITHIN = 1.0
"""Seconds a worker stopping now spends marking its running turns forgiven before it exits."""
_exiting: set[asyncio.Future[None]] = set()
"""The task that ends the process (held: the loop keeps only a weak reference to a task)."""


def cmd_worker(args: argparse.Namespace) -> int:
    load_app(args.app)  # a typo in APP fails here, once, rather than in every child
    if args.processes > 1:
        return processes.run_parent(_child_argv(args), args.processes, args.redis, health.endpoint(args))
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
        rolling_upgrade=args.rolling_upgrade,
        allow_eviction=args.allow_eviction,
        lease=LeaseSettings(
            ttl=args.lease_ttl, renew_interval=args.renew_interval, stall_limit=args.stall_limit
        ),
    )
    worker = Worker(
        app, redis_settings(args), settings, shutdown_grace=args.grace, connect_timeout=args.connect_timeout
    )

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _on_signal, worker, sig)
        if args.parent_pid:  # a child of --processes N ends with its parent
            processes.watch_parent(args.parent_pid, lambda: loop.call_soon_threadsafe(worker.stop))
        with health.watching(worker, health.endpoint(args), args.health_fd):  # --health-port
            await worker.run()

    log.info("worker %s starting", worker.id)
    try:
        asyncio.run(run())
    finally:
        telemetry.shutdown()
    log.info("worker %s stopped", worker.id)
    return 0


def _on_signal(worker: Worker, sig: signal.Signals) -> None:
    """The first signal drains; the next one stops now."""
    if not worker.stopping:
        log.info("%s: stopping gracefully (send it again to stop now)", sig.name)
        worker.stop()
        return
    running = worker.running_turns()
    log.warning(
        "%s again: stopping now; %d running turn%s and the messages not committed stay in Redis for "
        "the next owner (the leases expire within %gs)",
        sig.name, running, "" if running == 1 else "s", worker.settings.lease.ttl,
    )  # fmt: skip
    _exiting.add(asyncio.ensure_future(_exit_now(worker, 128 + sig)))


async def _exit_now(worker: Worker, status: int) -> None:
    """Mark the running turns forgiven (their next start is not counted as a crash), briefly,
    then end the process at once: a step function's thread cannot be stopped, only left."""
    try:
        await asyncio.wait_for(worker.forgive_running(), FORGIVE_WITHIN)
    except Exception as exc:  # best effort: at worst their next start counts
        log.warning("could not mark the running turns forgiven: %r", exc)
    finally:
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stdout.flush()
        os._exit(status)


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
    argv += [flag for flag, on in (("--rolling-upgrade", args.rolling_upgrade),
                                   ("--allow-eviction", args.allow_eviction)) if on]  # fmt: skip
    if args.connect_timeout:
        argv += ["--connect-timeout", str(args.connect_timeout)]
    if args.durability:
        argv += ["--durability", args.durability]
    return argv


def worker_safety_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that let a worker start where it would refuse to."""
    parser.add_argument(
        "--rolling-upgrade", action="store_true",
        help="start even if live workers of the namespace serve another app or version with "
        "types this app lacks (a version that drops a type, a rollback; adding types needs no flag)",
    )  # fmt: skip
    parser.add_argument(
        "--allow-eviction", action="store_true",
        help="start (with a warning) even if the server's maxmemory-policy is not noeviction",
    )  # fmt: skip

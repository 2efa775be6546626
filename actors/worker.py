"""A worker process: runs the turn loops of the shards its supervisor leases.

A shard runner that fails (Redis error, duplicate commit) is restarted with
backoff from what Redis holds, as long as the lease is still ours; one that
lost its lease is stopped and its activations dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from . import preflight, sharing, telemetry
from .actor import App
from .errors import LeaseLost, RedisUnavailable
from .lease import Lease
from .limits import Limits
from .markers import Markers
from .replies import ReplyListener
from .server import resolve_url
from .settings import DEFAULT_DURABILITY, DEFAULT_SHARDS, RedisSettings, WorkerSettings, redact_url
from .shard import ShardRunner
from .store import Store, error_reason, is_refusal, is_transient
from .supervisor import Supervisor
from .turn import TurnServices

log = logging.getLogger("actors.worker")

WITHDRAW_TIMEOUT = 2.0
"""Seconds a stopping worker gives Redis to delete its app record."""

CONNECT_BACKOFF_FIRST = 0.5
CONNECT_BACKOFF_MAX = 10.0
"""Seconds between a starting worker's attempts to reach Redis: doubling from the first to the max."""


class Worker:
    """Runs ``app``'s actors. ``await worker.run()`` until ``worker.stop()`` (or cancellation)."""

    def __init__(
        self,
        app: App,
        redis: RedisSettings | None = None,
        settings: WorkerSettings | None = None,
        *,
        shutdown_grace: float = 10.0,
        connect_timeout: float | None = None,
    ) -> None:
        self.app = app
        self.redis_settings = redis or RedisSettings.from_env()
        self.settings = settings or WorkerSettings()
        self.shutdown_grace = shutdown_grace
        self.connect_timeout = connect_timeout
        """Seconds ``run`` waits for Redis to answer at start before it raises RedisUnavailable
        (None: until it answers or the worker is stopped)."""
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.ready = Ready()
        """Set once the worker has run its first supervisor tick; ``await ready.wait()`` raises
        the worker's error instead if it stopped before (it refused to start)."""
        self._stop = asyncio.Event()
        self._slots: dict[int, _Slot] = {}
        self._services: TurnServices | None = None
        self._supervisor: Supervisor | None = None

    def stop(self) -> None:
        """Begin a graceful stop: start no turn, let the turns in progress end (up to
        ``shutdown_grace``), release every lease. Messages read ahead and not started stay in
        Redis for the next owner. Logs what it drains; a second call does nothing."""
        if self._stop.is_set():
            return
        self._stop.set()
        running = self.running_turns()
        left = 0
        for slot in self._slots.values():
            slot.draining = True  # a runner that fails now is not started again
            left += slot.runner.drain() if slot.runner is not None else 0
        log.info(
            "stopping: draining %d running turn%s on %d shards (at most %gs); %d message%s read ahead "
            "left in Redis for the next owner",
            running, "" if running == 1 else "s", len(self._slots), self.shutdown_grace,
            left, "" if left == 1 else "s",
        )  # fmt: skip

    @property
    def stopping(self) -> bool:
        """``stop`` was called."""
        return self._stop.is_set()

    async def forgive_running(self) -> None:
        """Mark the turns running now forgiven: their next start, by the next owner of their
        shard, is not counted toward ``max_redeliveries`` (a stop, not a crash, ended them)."""
        await asyncio.gather(*(r.forgive_running() for r in self.runners), return_exceptions=True)

    def running_turns(self) -> int:
        """Turns whose handler runs now, on every shard this worker holds."""
        return sum(len(r.turns.running()) for r in self.runners)

    @property
    def shards(self) -> list[int]:
        return sorted(self._slots)

    # ---- what the health probes read (actors/health.py), from a thread of their own --------------
    # (and ``stopping``, above)
    @property
    def last_tick(self) -> float | None:
        """When (``time.monotonic()``) its supervisor last ticked successfully; None before it first did."""
        return None if self._supervisor is None else self._supervisor.last_tick

    @property
    def held_shards(self) -> int:
        return len(self._slots)

    @property
    def runners(self) -> list[ShardRunner]:
        return [slot.runner for slot in self._slots.values() if slot.runner is not None]

    async def run(self) -> None:
        try:
            await self._run()
        except Exception as exc:
            if not self.ready.is_set():
                self.ready.fail(exc)  # whoever waits for it learns why it never will be
            raise

    async def _run(self) -> None:
        store = Store.from_url(resolve_url(self.redis_settings.url), self.redis_settings.namespace)
        reader = store.inbox_reader(self.settings.read_count, self.settings.block_ms)
        replies = ReplyListener(store)
        markers = Markers(store)
        limits = Limits(
            store, self.app.limiters, int(self.settings.lease.ttl * 1000),
            int(self.settings.messages.idempotency_ttl * 1000), renew=False, markers=markers,
        )  # fmt: skip
        try:
            shards = await self._first_contact(store)
            if shards is None:
                return  # stopped while waiting for Redis
            redis = self.redis_settings
            await store.durability(redis.durability, DEFAULT_DURABILITY, redis.durability_timeout)
            await replies.start()
            markers.start()
            await limits.start()
            self._services = TurnServices(
                self.app, store, shards, self.settings.messages, replies, limits, markers, reader,
                max_record_bytes=self.settings.max_record_bytes,
            )  # fmt: skip
            supervisor = Supervisor(
                store, self.id, shards, self.settings.lease,
                on_acquired=self._start_shard, on_lost=self._stop_shard, on_release=self._drain_shard,
                info=self._info, slots=limits.held_slots, load=self._load,
                describe=self._describe(asyncio.get_running_loop()),
            )  # fmt: skip
            self._supervisor = supervisor
            telemetry.observe_worker(
                lambda: len(self._slots),
                lambda: {r.shard: r.inflight for r in self.runners},
                lambda: {r.shard: r.lag for r in self.runners},
            )
            await supervisor.run(self._stop, ready=self.ready.set)
        finally:
            for shard in list(self._slots):
                self._stop_shard(shard)
            await reader.close()
            await limits.stop()
            await markers.stop()  # after every shard and dispatcher: the last ones go too
            await replies.stop()
            await self._withdraw(store)
            await store.close()

    async def _check_server(self, store: Store) -> None:
        """Before anything is written: the user's rights, the eviction policy, then whether
        this app may share the namespace with its live workers (each a one-line error)."""
        await preflight.check_rights(store)
        await preflight.check_eviction(store, self.settings.allow_eviction)
        await preflight.check_cluster_coverage(store)
        await sharing.claim_namespace(store, self.id, self.app, self.settings.rolling_upgrade)

    async def _withdraw(self, store: Store) -> None:
        """Delete this worker's app record (``ns:apps``) as it stops; if Redis does not answer
        soon, the next worker to start deletes it."""
        try:
            async with asyncio.timeout(WITHDRAW_TIMEOUT):
                await store.release_app(self.id)
        except Exception as exc:
            log.debug("could not delete the app record of %s: %r", self.id, exc)

    async def _first_contact(self, store: Store) -> int | None:
        """The namespace's shard count, once Redis answers. A worker that starts while Redis
        is unreachable waits for it, one log line per attempt, the delay doubling up to
        ``CONNECT_BACKOFF_MAX``; past ``connect_timeout`` it gives up (RedisUnavailable).
        None if stopped meanwhile. Refused credentials or commands are not waited out."""
        started = time.monotonic()
        delay = CONNECT_BACKOFF_FIRST
        where = redact_url(self.redis_settings.url)
        for attempt in itertools.count(1):
            try:
                await self._check_server(store)
                return await store.shard_count(self.settings.shards, DEFAULT_SHARDS)
            except Exception as exc:
                if not is_transient(exc) or is_refusal(exc):
                    raise
                waited = time.monotonic() - started
                if self.connect_timeout is not None and waited >= self.connect_timeout:
                    raise RedisUnavailable(
                        f"Redis at {where} could not be reached for {waited:.1f}s ({error_reason(exc)}); "
                        f"gave up (connect timeout {self.connect_timeout:g}s)"
                    ) from exc
                if self.connect_timeout is not None:
                    delay = max(0.0, min(delay, self.connect_timeout - waited))
                log.warning(
                    "Redis at %s is not reachable (%s); attempt %d, trying again in %.1fs",
                    where, error_reason(exc), attempt, delay,
                )  # fmt: skip
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                if self._stop.is_set():
                    return None
                delay = min(delay * 2, CONNECT_BACKOFF_MAX)
        raise AssertionError("unreachable")  # itertools.count never ends

    def _info(self) -> dict[str, str]:
        """What the heartbeat adds to this worker's info hash, for ``actors status`` and ``top``."""
        assert self._services is not None
        waiting = {f"waiting:{name}": str(n) for name, n in self._services.limits.waiting().items()}
        return {**waiting, **self._services.stats.summary(), "shards": str(len(self._slots))}

    def _describe(self, loop: asyncio.AbstractEventLoop) -> Callable[[], str]:
        """What ``loop`` runs now, named for a person: the turn whose handler it is in. Called
        from the LeaseKeeper's thread while the loop is stuck, so what it reads stands still."""

        def describe() -> str:
            task = asyncio.current_task(loop)
            try:
                return next(filter(None, (_turn_of(task, runner) for runner in self.runners)), "")
            except RuntimeError:  # the loop changed a dict meanwhile: it is not stuck after all
                return ""

        return describe

    def _load(self, shard: int) -> int:
        """Work in flight on a shard: messages read and not finished, and steps running."""
        slot = self._slots.get(shard)
        if slot is None:
            return 0
        return slot.lease.steps.running + (slot.runner.inflight if slot.runner is not None else 0)

    # ---- shard runners ---------------------------------------------------------
    def _start_shard(self, lease: Lease) -> None:
        slot = _Slot(lease)
        slot.task = asyncio.create_task(self._run_shard(slot), name=f"shard-{lease.shard}")
        self._slots[lease.shard] = slot

    def _stop_shard(self, shard: int) -> None:
        slot = self._slots.pop(shard, None)
        if slot is not None and slot.task is not None:
            slot.task.cancel()

    async def _drain_shard(self, shard: int) -> list[str]:
        """Drain the shard's runner; returns the inbox entries it leaves to the next owner
        that no one started (``ShardRunner.handed_over``)."""
        slot = self._slots.get(shard)
        if slot is None or slot.task is None:
            return []
        slot.draining = True
        if slot.runner is not None:
            slot.runner.drain()
        try:
            await asyncio.wait_for(asyncio.shield(slot.task), timeout=self.shutdown_grace)
        except TimeoutError:
            if slot.runner is not None:
                await slot.runner.forgive_running()
            running = slot.lease.steps.running
            log.warning(
                "shard %s: in-flight turns did not finish in %ss; abandoning them%s",
                shard, self.shutdown_grace,
                f" once the {running} step functions still running have ended" if running else "",
            )  # fmt: skip
        except Exception:  # already logged by _run_shard
            pass
        self._stop_shard(shard)
        with contextlib.suppress(asyncio.CancelledError):
            await slot.task
        return slot.handed_over

    async def _run_shard(self, slot: _Slot) -> None:
        assert self._services is not None
        lease = slot.lease
        delay = 0.05
        while not slot.draining:
            slot.runner = ShardRunner(lease, self.id, self._services, self.settings)
            try:
                await slot.runner.run()
                return  # drained
            except Exception as exc:
                if _cancelling():
                    # TaskGroup prefers its children's errors to our cancellation: honour it.
                    raise asyncio.CancelledError() from exc
                errors = _flatten(exc)
                lost = next((e for e in errors if isinstance(e, LeaseLost)), None)
                if lost is not None:
                    log.warning(
                        "shard %s: lease lost at epoch %s (%s); stopping its turns",
                        lease.shard, lease.epoch, lost,
                    )  # fmt: skip
                    if self._supervisor is not None:
                        self._supervisor.lose(lease)
                    return
                if all(is_transient(e) for e in errors):
                    log.warning(
                        "shard %s: Redis error %r; restarting from Redis in %.2fs",
                        lease.shard,
                        errors[0],
                        delay,
                    )
                else:
                    log.error("shard %s: runner failed; restarting from Redis", lease.shard, exc_info=exc)
            finally:
                # Kept on the slot: the runner may end (drained by ``stop``) before the
                # supervisor's release asks for them.
                slot.handed_over += slot.runner.handed_over
                slot.runner = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


class Ready(asyncio.Event):
    """``Worker.ready``: an Event whose ``wait()`` raises the worker's error if it stopped
    before it was ready, so code that waits for it does not wait for ever."""

    error: Exception | None = None

    def fail(self, error: Exception) -> None:
        self.error = error
        self.set()

    async def wait(self) -> Literal[True]:
        await super().wait()
        if self.error is not None:
            raise self.error
        return True


@dataclass(slots=True)
class _Slot:
    """A leased shard: its runner task, the current runner, and whether it is draining."""

    lease: Lease
    task: asyncio.Task[None] | None = None
    runner: ShardRunner | None = None
    draining: bool = False
    handed_over: list[str] = field(default_factory=list)
    """What its drained runner left to the next owner, never started (``ShardRunner.handed_over``)."""


def _turn_of(task: asyncio.Task[Any] | None, runner: ShardRunner) -> str:
    """The running turn of ``runner`` whose actor task is ``task``, named ('' if none)."""
    act = next((a for a in list(runner.activations.values()) if a.task is task and a.running), None)
    if act is None or act.running is None or act.actor is None:
        return ""
    cls = type(act.actor)
    handler = cls.handlers.get(act.running.envelope.type)
    what = f"{cls.__name__}.{handler.name}" if handler else act.running.envelope.type
    return f"the turn of {act.id} ({what})"


def _flatten(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [e for sub in exc.exceptions for e in _flatten(sub)]
    return [exc]


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0

"""Clients, scripts and errors: what every part of the store shares.

Scripts are ``.lua`` files in ``actors/scripts``, registered once and called by SHA
(redis-py reloads a script the server lost, e.g. after a restart)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    AuthorizationError,
    NoPermissionError,
    NoScriptError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

from ..errors import Diverged, LeaseLost
from ..keys import Keys
from . import cluster
from .acks import Acknowledgment

log = logging.getLogger("actors.store")

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, OSError)
"""Errors after which a call's outcome is unknown and the connection is retried."""

STALL_TIMEOUT = 30.0
"""Seconds a send, or a supervisor tick, waits for a server that does not answer (calls have
no socket timeout of their own)."""


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT_ERRORS + cluster.CLUSTER_ERRORS) or (
        isinstance(exc, ResponseError) and str(exc).startswith(("LOADING", "BUSY", "TRYAGAIN"))
    )


REFUSALS: tuple[type[BaseException], ...] = (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    AuthorizationError,
    NoPermissionError,
)
"""Errors that waiting will not cure: the server refused these credentials or this command.
(redis-py makes a failed authentication a ConnectionError, so ``is_transient`` takes it too.)"""


def is_refusal(exc: BaseException) -> bool:
    return isinstance(exc, REFUSALS)


def describe_error(exc: BaseException, where: str) -> str | None:
    """One line a person can act on for a Redis error, or None for anything else. ``where``
    names the server (a URL without its password)."""
    if isinstance(exc, AuthenticationError | AuthenticationWrongNumberOfArgsError):
        return (
            f"authentication failed at Redis at {where} ({_text(exc)}): check the user and password "
            "in the URL (--redis, ACTORS_REDIS_URL)"
        )
    if isinstance(exc, NoPermissionError | AuthorizationError):
        return (
            f"Redis at {where} refused a command: NOPERM {_text(exc)}; the ACL user of the URL needs "
            "the commands, keys and channels of the namespace (ACL SETUSER ... ~<ns>:* &<ns>:* +@all)"
        )
    if isinstance(exc, RedisConnectionError | RedisTimeoutError) or (
        isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError | PermissionError)
    ):
        return (
            f"cannot reach Redis at {where} ({error_reason(exc)}): is the server running, and is the "
            "URL right? (--redis, ACTORS_REDIS_URL; --debug for the traceback)"
        )
    if isinstance(exc, ResponseError):
        return f"Redis at {where} refused a command: {_text(exc)} (--debug for the traceback)"
    if isinstance(exc, RedisError):
        return f"Redis error at {where}: {_text(exc)} (--debug for the traceback)"
    return None


def error_reason(exc: BaseException) -> str:
    """Why a connection failed, briefly: the system's words for its OSError (``Connection
    refused``), else the error's text."""
    cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
    return os.strerror(cause.errno) if isinstance(cause, OSError) and cause.errno else _text(exc)


def _text(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def honour_cancel() -> None:
    """Raise CancelledError if the current task was cancelled.

    On Python 3.11, redis-py's socket timeouts use ``asyncio.wait_for``, which can
    return a finished result and drop a cancellation that arrived at the same
    moment. Every public Store method calls this after its Redis call (see
    ``honours_cancel``), so loops that call Redis still stop when cancelled.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError()


def script_text(name: str) -> str:
    return resources.files("actors").joinpath("scripts", f"{name}.lua").read_text()


T = TypeVar("T")

RAW_REPLY = "actors_raw_reply"
"""An option of the XAUTOCLAIM and cluster XREAD calls of ``Store``: keep the reply as the server sent it.
redis-py's own parsing turns an entry's fields into a dict, which keeps only the last of two
fields with one name. (The inbox reader's XREADs read raw replies from connections of their
own.)"""


def honours_cancel(cls: type[T]) -> type[T]:
    """Make every public coroutine method of ``cls`` raise CancelledError if its task was
    cancelled while it ran, even if redis-py dropped the cancellation (see honour_cancel)."""
    for name, fn in list(vars(cls).items()):
        if name.startswith("_") or not inspect.iscoroutinefunction(fn):
            continue

        def wrap(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            @functools.wraps(fn)
            async def call(*args: Any, **kwargs: Any) -> Any:
                result = await fn(*args, **kwargs)
                honour_cancel()
                return result

            return call

        setattr(cls, name, wrap(fn))
    return cls


SCRIPTS = (  # every file of actors/scripts
    "acquire_lease", "renew_lease", "release_lease", "commit", "count_delivery", "due_timers",
    "fire_schedule", "limiter_acquire", "limiter_release", "queue_dispatch", "queue_dispatched",
    "queue_done", "queue_enqueue", "queue_checks", "item_alive", "enqueue_once", "forward",
    "replay_dead_letter", "trim_inbox", "read_inbox", "expire_idle",
)  # fmt: skip


@honours_cancel
class StoreBase:
    """The clients and scripts of one namespace; each part of ``Store`` adds its calls."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        appender: aioredis.Redis | None = None,
        url: str | None = None,
    ) -> None:
        self.redis = client
        """For calls that are safe to repeat: it retries after a connection error."""
        allow_raw_replies(client)
        self._appender = appender or client
        """For calls whose retry after a lost reply would not be a no-op (plain XADDs, the fenced
        read and the timer script): it never retries them."""
        self.keys = keys
        self.url = url
        """Where the clients connect, if known (a LeaseKeeper needs it)."""
        self._scripts = {name: client.register_script(script_text(name)) for name in SCRIPTS}
        self._scripts_on: set[str] = set()
        """The cluster primaries known to hold every script (see ``_script_pipeline``)."""
        self.ack = Acknowledgment()
        """What a write that tells someone it happened waits for: the namespace's durability
        level (``DurabilityStore.durability``; nothing until then)."""

    async def close(self) -> None:
        await self.redis.aclose()
        if self._appender is not self.redis:
            await self._appender.aclose()

    async def _run(
        self, name: str, keys: Sequence[str], args: Sequence[Any], client: aioredis.Redis | None = None
    ) -> Any:
        """Call a script by SHA (redis-py loads it again if the server lost it).

        Fenced scripts (their first key is the lease) fail with FENCED when the
        lease is not held at the expected epoch: that becomes LeaseLost. DIVERGED
        (commit.lua) becomes Diverged.
        """
        try:
            return await self._scripts[name](keys=list(keys), args=list(args), client=client)
        except ResponseError as exc:
            raise _script_error(name, exc, keys, args) from None

    @contextlib.asynccontextmanager
    async def _script_pipeline(self, client: aioredis.Redis | None = None) -> AsyncIterator[Pipeline]:
        """A non-transactional pipeline for script calls. A server's pipeline loads the scripts
        it lacks before it runs; a cluster's does not, and a primary holds only the scripts
        loaded on it (a promoted replica has none: they are not replicated). So on a cluster
        every script is loaded on every primary not known to hold them first; a primary that
        lost them (restarted) fails the call with NoScriptError, and every primary is loaded
        again before the next."""
        target = client or self.redis
        if cluster.is_cluster(target):
            primaries = await cluster.primary_names(target)
            if not primaries <= self._scripts_on:
                for script in self._scripts.values():
                    await target.script_load(script.script)  # on every primary of a cluster
                self._scripts_on = primaries
        try:
            async with target.pipeline(transaction=False) as pipe:
                yield pipe
        except NoScriptError:
            self._scripts_on = set()
            raise

    async def _run_acknowledged(
        self, name: str, keys: Sequence[str], args: Sequence[Any], client: aioredis.Redis | None = None
    ) -> Any:
        """``_run`` for a script whose write tells someone it happened: with a durability level,
        the level's wait follows it on its connection (``_acknowledged``)."""
        if not self.ack.waits:
            return await self._run(name, keys, args, client)
        script, target = self._scripts[name], client or self.redis

        def call(pipe: Pipeline) -> None:
            pipe.evalsha(script.sha, len(keys), *keys, *args)

        try:
            try:
                [result] = await self._acknowledged(target, call, keys[:1])
            except NoScriptError:  # the server lost it (a restart): the script did not run
                await target.script_load(script.script)
                [result] = await self._acknowledged(target, call, keys[:1])
        except ResponseError as exc:
            raise _script_error(name, exc, keys, args) from None
        return result

    async def _acknowledged(
        self, client: aioredis.Redis, queue: Callable[[Pipeline], object], written: Sequence[str]
    ) -> list[Any]:
        """Send the commands ``queue`` adds and then the durability level's wait in one pipeline,
        so on one connection; returns the commands' replies once the wait says the level holds
        (the first error among them raised; DurabilityTimeout if the level was not reached).
        On a cluster the wait goes to the node of each key in ``written`` (the keys the
        commands write), after that node's commands on its connection; a write sent to a node
        that no longer serves its slot fails with MOVED rather than follow it (its wait would
        stay behind on the old node)."""
        waits = await cluster.primaries_of(client, written) if cluster.is_cluster(client) else [None]
        async with self._script_pipeline(client) as pipe:
            queued = queue(pipe)
            if inspect.isawaitable(queued):  # a script call in a pipeline is queued by awaiting it
                await queued
            for node in waits:
                self.ack.queue(pipe, node)
            if waits == [None]:
                replies = await pipe.execute(raise_on_error=False)
            else:  # a cluster pipeline
                replies = await pipe.execute(raise_on_error=False, allow_redirections=False)  # type: ignore[call-arg]
        replies, waited = replies[: -len(waits)], replies[-len(waits) :]
        for reply in replies:
            if isinstance(reply, NoScriptError):
                self._scripts_on = set()
            if isinstance(reply, Exception):
                raise reply
        for reply in waited:
            self.ack.check(reply)
        return replies

    def new_connection(self) -> AbstractConnection:
        """A connection outside the pools, made as the non-retrying client makes its own (same
        server, credentials, keepalive); its owner closes it."""
        pool = self._appender.connection_pool
        return pool.connection_class(**pool.connection_kwargs)

    async def server_time_ms(self) -> int:
        seconds, micros = await self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000


POOL_CONNECTIONS = 32
"""Connections of each client's pool at most. Every call on them is short (the blocking inbox
reads have connections of their own, ``reader.py``), so a few dozen serve any number of shards;
a burst of calls beyond them (a thousand shards' runners at once) waits its turn instead of
opening a connection each and keeping it."""


def _script_error(name: str, exc: ResponseError, keys: Sequence[str], args: Sequence[Any]) -> Exception:
    """A fenced script's FENCED (its first key is the lease) as LeaseLost, DIVERGED as Diverged."""
    if str(exc).startswith("FENCED"):
        return LeaseLost(f"{name} refused: {keys[0]} is no longer held at {args[0]!r}")
    if str(exc).startswith("DIVERGED"):
        return Diverged(f"{name} refused: {exc}")
    return exc


def make_client(url: str, retries: int) -> aioredis.Redis:
    if (seed := cluster.seed_url(url)) is not None:
        return cluster.make_cluster_client(seed, retries, KEEPALIVE)
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=POOL_CONNECTIONS,
        timeout=30,  # wait this long for a free connection rather than fail at once
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries),
        socket_connect_timeout=5,
        # No per-call socket timeout: on Python 3.11 redis-py runs every call with one
        # under asyncio.wait_for, a Task each (about 40 us of CPU per call here). A dead
        # peer is found by TCP keepalive instead; the callers that must not wait on a
        # stuck server bound themselves (the supervisor's tick, appends).
        socket_timeout=None,
        socket_keepalive=True,
        socket_keepalive_options=KEEPALIVE,
        health_check_interval=30,
    )
    return aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes its sockets


KEEPALIVE = {
    getattr(socket, option): value
    for option, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3))
    if hasattr(socket, option)
}
"""A silent peer is declared dead after about 5 + 2 x 3 = 11 s (where the platform allows)."""


def allow_raw_replies(client: aioredis.Redis) -> None:
    """Let XAUTOCLAIM and XREAD calls given the ``RAW_REPLY`` option skip redis-py's parsing (other calls
    are parsed as before)."""
    for command in ("XAUTOCLAIM", "XREAD"):
        parse = client.response_callbacks.get(command)
        if parse is not None and getattr(parse, "func", None) is not raw_or_parsed:
            client.set_response_callback(command, functools.partial(raw_or_parsed, parse))


async def raw_reply(client: aioredis.Redis, *args: EncodableT, **options: Any) -> Any:
    """Run a command whose reply redis-py leaves as the server sent it (see ``RAW_REPLY``)."""
    # execute_command is unannotated in redis-py's asyncio client.
    return await client.execute_command(*args, **options, **{RAW_REPLY: True})  # type: ignore[no-untyped-call]


def raw_or_parsed(parse: Callable[..., Any], response: Any, **options: Any) -> Any:
    if options.pop(RAW_REPLY, False):
        return response
    return parse(response, **options)

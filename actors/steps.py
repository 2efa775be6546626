"""A step's function: its attempts (retried with backoff, within its limiter), its thread,
and what it may know of itself (``step_info()``). A step function runs at least once and
never concurrently with itself: a thread cannot be stopped, so a timed-out or cancelled
attempt of a sync function waits for its thread, which keeps its limiter slot and its
shard's lease (``StepsInFlight``) until it ends."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import logging
import random
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import pydantic_core
from pydantic import TypeAdapter

from . import telemetry
from .actor import StepOptions
from .codec import packed_size
from .errors import RecordTooLarge, Reject
from .journal import Record, StepFailed
from .lease import StepsInFlight
from .limits import Limits

log = logging.getLogger("actors.steps")


class StepHost(Protocol):
    """What a step's attempts need from the runner of its turn (``turn.TurnHost`` has it)."""

    steps: StepsInFlight

    async def fenced(self) -> None: ...


@dataclass(frozen=True, slots=True)
class StepInfo:
    """What a step's function may know about the step it runs in (``actors.step_info()``)."""

    idempotency_key: str
    """The same for every attempt of this step, on every worker, in every replay of its turn:
    pass it to an outside system that deduplicates (a payment API), so that an attempt
    repeated after a crash (a step runs at least once) has one effect."""
    epoch: int
    """The shard's lease epoch: a fencing token that only grows. An outside system that keeps
    the highest epoch it saw for a key, and refuses a lower one, refuses a former owner."""
    name: str
    attempt: int
    """1 for the first call of this run of the step, then each retry."""


_STEP: contextvars.ContextVar[StepInfo | None] = contextvars.ContextVar("actors_step", default=None)


def step_info() -> StepInfo:
    """The step whose function is running (it works in sync functions' threads too)."""
    info = _STEP.get()
    if info is None:
        raise RuntimeError("actors.step_info() is only available inside a step's function")
    return info


def callable_name(fn: Callable[..., Any]) -> str:
    inner = fn.func if isinstance(fn, functools.partial) else fn
    return str(getattr(inner, "__qualname__", None) or getattr(inner, "__name__", None) or repr(inner))


async def run_step(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                    options: StepOptions, limits: Limits, host: StepHost,
                    info: StepInfo) -> list[Any]:  # fmt: skip
    """Call ``fn`` with retries; returns the journal value ``["ok", result]``, ``["error", type, text]``
    or ``["reject", reason, detail]``."""
    attempts = options.retries + 1
    for attempt in range(1, attempts + 1):
        waiting = time.perf_counter()
        # Outside the try: a Redis error while waiting for the limiter is not the step's
        # failure (the function never ran), so it is not journaled; it fails this attempt
        # of the whole turn, which is retried (then dead-lettered) like any handler error.
        # So is a lost lease, which ends the turn's runner.
        await host.fenced()  # no limiter capacity is spent by a fenced owner
        async with limits.hold(options.limiter):
            if options.limiter is not None:
                telemetry.waited(options.limiter, (time.perf_counter() - waiting) * 1000)
            await host.fenced()  # the limiter's wait may have been long
            token = _STEP.set(dataclasses.replace(info, attempt=attempt))
            try:
                result = await _call_once(fn, args, kwargs, options.timeout, host.steps)
            except Reject as rejection:
                # The function refused for good (user code's business error): no retry. Journaled,
                # so that every run of the turn raises it from ``step`` without calling it again.
                return ["reject", rejection.reason, rejection.detail]
            except Exception as exc:
                failure: Exception | None = exc
            else:
                failure = None
            finally:
                _STEP.reset(token)
        telemetry.annotate("step.attempt", attempt)
        if failure is not None:
            if attempt == attempts:
                return ["error", type(failure).__name__, str(failure)]
            delay = min(options.max_backoff, options.backoff * 2 ** (attempt - 1))
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            continue
        try:
            return ["ok", pydantic_core.to_jsonable_python(result)]
        except pydantic_core.PydanticSerializationError:
            # Journaled as the step's error: its side effects happened, so it must not run again.
            text = (f"step {callable_name(fn)} returned a {type(result).__name__}, which cannot be "
                    "journaled: return JSON-compatible data or a pydantic model")  # fmt: skip
            return ["error", "TypeError", text]
    raise AssertionError("unreachable")


def bounded(outcome: list[Any], name: str, max_bytes: int) -> list[Any]:
    """A step's outcome as it is journaled: one over ``max_bytes`` (``max_record_bytes``)
    becomes the step's error ``RecordTooLarge``. Journaled rather than failing the turn, like
    a result with no JSON form: the function ran, its side effects happened, and a turn
    retried would run it again only to get as much back. The handler may catch the
    ``StepFailed`` (and keep such data outside the journal, recording a reference to it)."""
    size = packed_size(outcome)
    if size <= max_bytes:
        return outcome
    what = {"ok": "result", "error": "error", "reject": "rejection"}.get(outcome[0], "outcome")
    error = RecordTooLarge(f"the {what} of step {name}", size, max_bytes)
    return ["error", type(error).__name__, str(error)]


async def _call_once(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                     timeout: float | None, steps: StepsInFlight) -> Any:  # fmt: skip
    """One attempt of a step function, counted in ``steps`` for as long as it executes."""
    if asyncio.iscoroutinefunction(fn) or asyncio.iscoroutinefunction(getattr(fn, "func", None)):
        steps.enter()
        try:
            async with asyncio.timeout(timeout):
                return await fn(*args, **kwargs)
        finally:
            steps.leave()
    result = await _in_thread(fn, args, kwargs, timeout, steps)
    return await result if asyncio.iscoroutine(result) else result


async def _in_thread(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                     timeout: float | None, steps: StepsInFlight) -> Any:  # fmt: skip
    """Run a sync step function in a thread. A thread cannot be stopped: when the attempt
    times out, or its turn is cancelled, this still waits for the thread to end, so that
    its limiter slot, its shard's lease and the step's next attempt never overlap it."""
    steps.enter()

    def run() -> Any:
        try:
            return fn(*args, **kwargs)
        finally:
            steps.leave()  # from the thread itself: a stalled event loop cannot delay it

    thread = asyncio.get_running_loop().run_in_executor(None, contextvars.copy_context().run, run)
    try:
        async with asyncio.timeout(timeout):
            return await asyncio.shield(thread)
    except (TimeoutError, asyncio.CancelledError):
        await _outlive(thread, callable_name(fn))
        raise


async def _outlive(thread: asyncio.Future[Any], name: str) -> None:
    """Wait for ``thread`` to end, through cancellations (one that arrives meanwhile is
    raised once the thread has ended)."""
    cancelled = False
    while not thread.done():
        log.warning("step %s: its attempt is over, but its thread still runs; waiting for it", name)
        try:
            await asyncio.wait({thread}, timeout=30)
        except asyncio.CancelledError:
            cancelled = True
    if not thread.cancelled():
        thread.exception()  # retrieved: the attempt's outcome is its timeout or cancellation
    if cancelled:
        raise asyncio.CancelledError()


def step_result(record: Record, name: str, fn: Callable[..., Any]) -> Any:
    """The journaled outcome, the same on the first run and on every replay."""
    if record.value[0] == "error":
        _, error_type, text = record.value
        raise StepFailed(name, error_type, text)
    if record.value[0] == "reject":
        raise Reject(record.value[1], record.value[2])
    adapter = _return_adapter(fn)
    value = record.value[1]
    return value if adapter is None else adapter.validate_python(value)


def _return_adapter(fn: Callable[..., Any]) -> TypeAdapter[Any] | None:
    inner = fn.func if isinstance(fn, functools.partial) else fn
    try:
        return _adapter_for(inner)
    except TypeError:  # unhashable callable
        return _build_adapter(inner)


@functools.lru_cache(maxsize=1024)
def _adapter_for(fn: Callable[..., Any]) -> TypeAdapter[Any] | None:
    return _build_adapter(fn)


def _build_adapter(fn: Callable[..., Any]) -> TypeAdapter[Any] | None:
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        return None
    annotation = hints.get("return")
    if annotation is None or annotation is type(None) or annotation is Any:
        return None
    return TypeAdapter(annotation)

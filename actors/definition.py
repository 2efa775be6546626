"""How an actor class is read when it is defined: its handlers (public async methods with one
message-model parameter), its scheduled methods, the types it waits for, and the durations
its class keywords give. ``Actor.__init_subclass__`` calls these; the runtime keeps the
``Handler`` records they make."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pydantic import BaseModel

from .errors import DefinitionError
from .messages import Tick
from .schedules import SCHEDULE_ATTR, Schedule

HandlerFn = Callable[[Any, Any], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Handler:
    """One handler of an actor type."""

    name: str
    message: type[BaseModel]
    reply: type[BaseModel] | None
    fn: HandlerFn


RESERVED = frozenset({"ref", "send", "ask", "state", "key", "turn", "step", "sleep", "wait_for", "enqueue"})
"""Methods of ``Actor`` that are never handlers."""


def duration_seconds(value: timedelta | float | None) -> float | None:
    if value is None or isinstance(value, int | float):
        return value
    if isinstance(value, timedelta):
        return value.total_seconds()
    raise TypeError(f"expected a timedelta or a number of seconds, not {type(value).__name__}")


def positive_seconds(cls: type, keyword: str, value: timedelta | float) -> float:
    """A class keyword's duration in seconds, refused unless positive."""
    try:
        seconds = duration_seconds(value)
    except TypeError as exc:
        raise DefinitionError(f"{cls.__name__}: {keyword} {exc}") from None
    if seconds is None or not seconds > 0:
        raise DefinitionError(f"{cls.__name__}: {keyword} must be positive, not {value!r}")
    return float(seconds)


def waitable_types(cls: type[Any], types: Sequence[type[BaseModel]]) -> dict[str, type[BaseModel]]:
    found: dict[str, type[BaseModel]] = {}
    for model in types:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise DefinitionError(f"{cls.__name__}: waits_for takes pydantic models, not {model!r}")
        found[model.__name__] = model
    return found


def discover_schedules(cls: type[Any]) -> dict[str, tuple[Schedule, Handler]]:
    found: dict[str, tuple[Schedule, Handler]] = {}
    for attr in dir(cls):
        fn = getattr(cls, attr, None)
        spec = getattr(fn, SCHEDULE_ATTR, None)
        if not isinstance(spec, Schedule):
            continue
        handler = as_handler(cls, attr, fn) if inspect.iscoroutinefunction(fn) else None
        if handler is None or handler.message is not Tick:
            raise DefinitionError(
                f"{cls.__name__}.{attr} is scheduled: it must be `async def {attr}(self, tick: Tick)`"
            )
        if spec.name in found:
            raise DefinitionError(f"{cls.__name__} has two schedules named {spec.name!r}")
        found[spec.name] = (spec, handler)
    return found


def discover_handlers(cls: type[Any]) -> dict[str, Handler]:
    handlers: dict[str, Handler] = {}
    for attr in dir(cls):
        if attr.startswith("_") or attr in RESERVED:
            continue
        fn = getattr(cls, attr)
        if not inspect.iscoroutinefunction(fn) or hasattr(fn, SCHEDULE_ATTR):
            continue
        handler = as_handler(cls, attr, fn)
        if handler is None:
            continue
        name = handler.message.__name__
        if name in handlers:
            raise DefinitionError(
                f"{cls.__name__} has two handlers for message type {name}: {handlers[name].name} and {attr}"
            )
        handlers[name] = handler
    return handlers


def as_handler(cls: type[Any], attr: str, fn: HandlerFn) -> Handler | None:
    params = list(inspect.signature(fn).parameters.values())[1:]
    if len(params) != 1:
        return None
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:
        raise DefinitionError(f"cannot resolve annotations of {cls.__name__}.{attr}: {exc}") from exc
    message = hints.get(params[0].name)
    if not (isinstance(message, type) and issubclass(message, BaseModel)):
        return None
    reply = hints.get("return")
    if reply is type(None):
        reply = None
    if reply is not None and not (isinstance(reply, type) and issubclass(reply, BaseModel)):
        raise DefinitionError(f"{cls.__name__}.{attr} must return a pydantic model or None, not {reply!r}")
    return Handler(attr, message, reply, fn)

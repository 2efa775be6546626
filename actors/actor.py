"""The Actor base class, references and the App that groups actor types (how a class is read: ``definition``).

A handler is a public async method with exactly one parameter besides ``self``,
annotated with a pydantic model: the message type. Its return annotation (a
model or None) is the reply type for ``ask``.
"""

from __future__ import annotations

import builtins
import typing
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from pydantic import BaseModel

from .definition import (
    Handler,
    discover_handlers,
    discover_schedules,
    duration_seconds,
    positive_seconds,
    waitable_types,
)
from .errors import DefinitionError, InvalidActorRef, UnknownActorType, UnknownMessageType
from .limiter import Limiter, check_limiters
from .messages import Approval
from .queues import QueueItem
from .schedules import Schedule
from .settings import check_seconds

M = TypeVar("M", bound=BaseModel)
R = TypeVar("R", bound=BaseModel)
A = TypeVar("A", bound="Actor")


@dataclass(frozen=True, slots=True)
class ActorRef(Generic[A]):
    """The address of a virtual actor: its type name and key.

    Refs made with ``MyActor.ref(key)`` also carry the class, so replies and
    state read from outside can be validated into models.
    """

    type: str
    key: str
    cls: builtins.type[A] | None = None  # builtins: the field ``type`` shadows it here

    def __post_init__(self) -> None:
        if not isinstance(self.type, str) or not self.type or "/" in self.type:
            raise InvalidActorRef(f"an actor type must be a non-empty name without '/', not {self.type!r}")
        if not isinstance(self.key, str) or not self.key:
            raise InvalidActorRef(f"an actor key must be a non-empty string, not {self.key!r}")

    @property
    def id(self) -> str:
        return f"{self.type}/{self.key}"

    def __str__(self) -> str:
        return self.id

    @classmethod
    def parse(cls, text: str) -> ActorRef[Any]:
        """Parse ``Type/key`` (the key may itself contain slashes)."""
        actor_type, sep, key = text.partition("/")
        if not sep or not actor_type or not key:
            raise InvalidActorRef(f"actor reference must look like 'Type/key', got {text!r}")
        return ActorRef(actor_type, key)


@dataclass(frozen=True, slots=True)
class TurnInfo:
    """What a handler may know about the turn it runs in (``self.turn``)."""

    message_id: str
    message_type: str
    shard: int
    epoch: int
    """The shard's lease epoch this turn will commit under."""
    worker_id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class StepOptions:
    name: str | None = None
    retries: int = 3
    backoff: float = 1.0
    max_backoff: float = 60.0
    timeout: float | None = None
    limiter: str | None = None


class TurnCalls(Protocol):
    """What an actor asks of the turn it runs in (``turn.TurnContext`` provides it)."""

    @property
    def info(self) -> TurnInfo: ...

    def send(self, ref: ActorRef[Any], msg: BaseModel) -> None: ...

    async def ask(self, ref: ActorRef[Any], msg: BaseModel, timeout: float) -> Any: ...

    async def enqueue(self, queue: str, ref: ActorRef[Any], msg: BaseModel, item: QueueItem) -> str: ...

    async def step(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                   options: StepOptions) -> Any: ...  # fmt: skip

    async def sleep(self, delay_ms: int | None, until_ms: int | None) -> None: ...

    async def wait_for(self, model: type[BaseModel], timeout_ms: int | None,
                       where: Callable[[Any], bool] | None) -> Any: ...  # fmt: skip


class _NoState(BaseModel):
    """The state of an actor that declares none."""


T = TypeVar("T")


class Actor:
    """Base class of every actor type.

    Subclass it with an optional nested ``State`` model and async handlers::

        class Counter(Actor):
            class State(BaseModel):
                total: int = 0

            async def on_add(self, msg: Add) -> Total:
                self.state.total += msg.by
                return Total(total=self.state.total)

    ``class Counter(Actor, name="counter")`` sets the type name (default: the class name).
    ``waits_for=[Decision]`` declares message types the actor receives only through
    ``wait_for`` (it needs no handler for them); ``Approval`` is always accepted.
    ``limiter="crawl"`` makes every turn wait for a token and slot of that limiter.
    ``turn_timeout=timedelta(hours=2)`` bounds each attempt of its handlers (default: the
    worker's ``turn_timeout``); an attempt that runs longer fails with TurnTimeout.
    ``retention=timedelta(days=7)`` (or seconds) deletes the state of an actor of this type
    once it has been idle that long: no turn committed since, none open, nothing deferred
    or running. Its next message starts it from a fresh State. Default: kept for ever.
    """

    State: ClassVar[type[BaseModel]] = _NoState
    type_name: ClassVar[str] = "Actor"
    handlers: ClassVar[dict[str, Handler]] = {}
    waitable: ClassVar[dict[str, type[BaseModel]]] = {"Approval": Approval}
    schedules: ClassVar[dict[str, tuple[Schedule, Handler]]] = {}
    """Scheduled methods by schedule name (see ``actors.schedule``)."""
    limiter: ClassVar[str | None] = None
    """The limiter every turn of this type holds (``class X(Actor, limiter="name")``)."""
    turn_timeout: ClassVar[float | None] = None
    """Seconds an attempt of this type's handlers may run (``class X(Actor, turn_timeout=...)``);
    None: the worker's ``WorkerSettings.turn_timeout``."""
    retention: ClassVar[float | None] = None
    """Seconds an actor of this type may stay idle before its state is deleted
    (``class X(Actor, retention=...)``); None: kept for ever."""

    key: str
    state: Any
    _turn: TurnCalls | None

    def __init_subclass__(
        cls,
        name: str | None = None,
        waits_for: Sequence[type[BaseModel]] = (),
        limiter: str | None = None,
        turn_timeout: timedelta | float | None = None,
        retention: timedelta | float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        cls.type_name = name or cls.__name__
        if limiter is not None:
            cls.limiter = limiter
        if turn_timeout is not None:
            cls.turn_timeout = positive_seconds(cls, "turn_timeout", turn_timeout)
        if retention is not None:
            cls.retention = positive_seconds(cls, "retention", retention)
        cls.waitable = {**cls.waitable, **waitable_types(cls, waits_for)}
        if "/" in cls.type_name:
            raise DefinitionError(f"actor type name {cls.type_name!r} must not contain '/'")
        if not (isinstance(cls.State, type) and issubclass(cls.State, BaseModel)):
            raise DefinitionError(f"{cls.__name__}.State must be a pydantic BaseModel subclass")
        cls.handlers = discover_handlers(cls)
        cls.schedules = discover_schedules(cls)

    def __init__(self, key: str, state: BaseModel) -> None:
        self.key = key
        self.state = state
        self._turn = None

    @classmethod
    def ref(cls: type[A], key: str) -> ActorRef[A]:
        return ActorRef(cls.type_name, key, cls)

    @classmethod
    def handler_for(cls, message_type: str) -> Handler:
        try:
            return cls.handlers[message_type]
        except KeyError:
            known = ", ".join(sorted(cls.handlers)) or "none"
            raise UnknownMessageType(
                f"actor type {cls.type_name} has no handler for message type "
                f"{message_type!r} (it handles: {known})"
            ) from None

    @classmethod
    def message_model(cls, message_type: str) -> type[BaseModel]:
        """The model of a message type this actor accepts: one it handles or waits for."""
        handler = cls.handlers.get(message_type)
        if handler is not None:
            return handler.message
        model = cls.waitable.get(message_type)
        if model is not None:
            return model
        known = ", ".join(sorted({*cls.handlers, *cls.waitable}))
        raise UnknownMessageType(
            f"actor type {cls.type_name} has no handler for message type {message_type!r} "
            f"and does not wait for it (it accepts: {known})"
        )

    # ---- inside a turn --------------------------------------------------
    @property
    def turn(self) -> TurnInfo:
        """The current turn: message id and type, shard, lease epoch, worker id, attempt."""
        return self._context().info

    def _context(self) -> TurnCalls:
        if self._turn is None:
            raise RuntimeError("send/ask can only be used inside a handler, during a turn")
        return self._turn

    async def send(self, ref: ActorRef[Any], msg: BaseModel) -> None:
        """Send ``msg`` to ``ref``. Delivered only if this turn commits, and then exactly once."""
        self._context().send(ref, msg)

    async def ask(self, ref: ActorRef[Any], msg: BaseModel, *, timeout: float = 30.0) -> Any:
        """Send ``msg`` and wait for the reply; journaled, so a re-run of this turn gets
        the recorded reply without asking again. The request goes out at once, with a
        message id fixed by the turn and the call's position, so a re-run before the
        reply was recorded is deduplicated by the target. Two actors asking each other
        wait until the timeout; use ``send`` for cycles.
        """
        return await self._context().ask(ref, msg, check_seconds(timeout, "an ask's timeout"))

    async def enqueue(
        self,
        queue: str,
        ref: ActorRef[Any],
        msg: BaseModel,
        *,
        priority: int = 0,
        dedup_id: str | None = None,
        partition: str = "",
    ) -> str:
        """Put ``msg`` for ``ref`` on the queue of limiter ``queue`` (see ``Client.enqueue``);
        journaled. Raises DuplicateItem if ``dedup_id`` is queued or running."""
        item = QueueItem(priority, dedup_id or "", partition)
        return await self._context().enqueue(queue, ref, msg, item)

    async def step(
        self,
        fn: Callable[..., Awaitable[T]] | Callable[..., T],
        /,
        *args: Any,
        name: str | None = None,
        retries: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        timeout: float | timedelta | None = None,
        limiter: str | None = None,
        **kwargs: Any,
    ) -> T:
        """Run ``fn(*args, **kwargs)`` (sync functions in a thread) once for this turn.

        It is retried up to ``retries`` times with exponential backoff and jitter,
        each attempt bounded by ``timeout``. Its result, or its last error as
        ``StepFailed``, is journaled before the handler goes on: after a crash the
        turn runs again from the top and this call returns the recorded result
        without calling ``fn``. The result comes back as its JSON form, validated
        into ``fn``'s return annotation when it has one, on the first run as on a
        replay. ``name`` (default: the function's qualified name) must stay the same
        while turns are open. With ``limiter``, each attempt first waits for a token
        (and a slot) of that limiter of the app.
        """
        options = StepOptions(name, retries, backoff, max_backoff, duration_seconds(timeout), limiter)
        return typing.cast(T, await self._context().step(fn, args, kwargs, options))

    async def sleep(self, delay: timedelta | float | None = None, *, until: datetime | None = None) -> None:
        """Sleep durably for ``delay`` (a timedelta or seconds) or until ``until``.

        The turn is suspended: its handler is unwound and it lives in Redis until the
        shard's owner wakes it, when the time has come by Redis's clock, never before,
        even if every worker was down meanwhile. The handler then runs again from the
        top (journaled primitives return their results). Messages to this actor wait
        until the turn ends.
        """
        if (delay is None) == (until is None):
            raise TypeError("sleep needs exactly one of delay or until")
        until_ms = None if until is None else _epoch_ms(until)
        delay_ms = None if delay is None else int(duration_seconds(delay) * 1000)  # type: ignore[operator]
        await self._context().sleep(delay_ms, until_ms)

    async def wait_for(
        self,
        message: type[M],
        *,
        timeout: timedelta | float | None = None,
        where: Callable[[M], bool] | None = None,
    ) -> M | None:
        """The first message of type ``message`` (matching ``where``) sent to this actor,
        or None after ``timeout`` (None: wait for ever).

        A matching message that arrived before the turn got here satisfies the wait.
        Meanwhile the turn is suspended in Redis, holding no worker memory; other
        messages to the actor wait, in order, until the turn ends. The type must be
        ``Approval`` or declared with ``class X(Actor, waits_for=[...])``.
        """
        cls = type(self)
        if message.__name__ not in cls.waitable and message.__name__ not in cls.handlers:
            raise UnknownMessageType(
                f"{cls.__name__} cannot wait for {message.__name__}: declare it with "
                f"class {cls.__name__}(Actor, waits_for=[{message.__name__}]) so workers accept it"
            )
        timeout_ms = None if timeout is None else int(duration_seconds(timeout) * 1000)  # type: ignore[operator]
        return typing.cast("M | None", await self._context().wait_for(message, timeout_ms, where))


def _epoch_ms(when: datetime) -> int:
    if when.tzinfo is None:
        raise ValueError("sleep(until=...) needs a timezone-aware datetime (e.g. datetime.now(UTC))")
    return int(when.astimezone(UTC).timestamp() * 1000)


class App:
    """The actor types a worker runs and a client may validate against.

    ``App(Counter, Greeter, limiters=[Limiter("llm", rate=50, per=timedelta(minutes=1))])``;
    it holds what a process-wide registry would.
    """

    def __init__(self, *actor_types: type[Actor], limiters: Iterable[Limiter] = ()) -> None:
        self.limiters = check_limiters(limiters)
        self._types: dict[str, type[Actor]] = {}
        for cls in actor_types:
            self.register(cls)

    def register(self, cls: type[Actor]) -> type[Actor]:
        if not (isinstance(cls, type) and issubclass(cls, Actor)) or cls is Actor:
            raise DefinitionError(f"{cls!r} is not an Actor subclass")
        existing = self._types.get(cls.type_name)
        if existing is not None and existing is not cls:
            raise DefinitionError(f"two actor types are named {cls.type_name!r}")
        if cls.limiter is not None and cls.limiter not in self.limiters:
            raise DefinitionError(
                f"{cls.__name__} uses limiter {cls.limiter!r}, which the app does not define "
                f"(pass App(..., limiters=[Limiter({cls.limiter!r}, ...)]))"
            )
        self._types[cls.type_name] = cls
        return cls

    @property
    def actor_types(self) -> Iterable[type[Actor]]:
        return self._types.values()

    def actor_type(self, name: str) -> type[Actor]:
        try:
            return self._types[name]
        except KeyError:
            known = ", ".join(sorted(self._types)) or "none"
            raise UnknownActorType(f"unknown actor type {name!r} (this app defines: {known})") from None

    def resolve(self, ref: ActorRef[Any]) -> type[Actor] | None:
        """The class behind ``ref``: the one it carries, else the app's, else None."""
        if ref.cls is not None:
            return ref.cls
        return self._types.get(ref.type)

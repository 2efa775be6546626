"""Durable actors on Redis streams.

Layout: ``actor`` (Actor, refs, App) -> ``client`` (send/ask/state from outside)
-> ``store`` (the only module that talks to Redis; Lua in ``scripts/``) ->
``worker`` / ``supervisor`` (leases, shard runners) -> ``shard`` (a package: receive
-> turn -> commit -> forward) -> ``turn`` (what a handler does). ``server`` runs
the embedded default Redis/Valkey; ``cli`` is the ``actors`` command.
"""

from .actor import Actor, ActorRef, App
from .client import Client, connect
from .cluster_server import LocalCluster
from .errors import (
    ActorsError,
    AskTimeout,
    ConfigurationError,
    DecodeError,
    DefinitionError,
    DuplicateItem,
    DurabilityTimeout,
    HandlerError,
    IdempotencyConflict,
    IdleTimeout,
    InvalidActorRef,
    InvalidArgument,
    InvalidIdempotencyKey,
    LeaseLost,
    MessageNotEncodable,
    MessageTooLarge,
    RecordTooLarge,
    RedisUnavailable,
    Reject,
    Rejected,
    ServerError,
    StateTooLarge,
    TooLarge,
    TurnTimeout,
    UnknownActorType,
    UnknownMessageType,
)
from .journal import JournalMismatch, StepFailed
from .limiter import Limiter
from .messages import Approval, Tick
from .schedules import schedule
from .server import EmbeddedServer
from .settings import LeaseSettings, MessageSettings, RedisSettings, RetrySettings, WorkerSettings
from .steps import StepInfo, step_info
from .worker import Worker

__all__ = [
    # defining actors
    "Actor",
    "ActorRef",
    "App",
    "Approval",
    "Limiter",
    "schedule",
    "Tick",
    "step_info",
    "StepInfo",
    # talking to them
    "Client",
    "connect",
    # running them
    "Worker",
    "EmbeddedServer",
    "LocalCluster",
    # settings
    "RedisSettings",
    "WorkerSettings",
    "LeaseSettings",
    "RetrySettings",
    "MessageSettings",
    # errors
    "ActorsError",
    "AskTimeout",
    "ConfigurationError",
    "DecodeError",
    "DefinitionError",
    "HandlerError",
    "DuplicateItem",
    "DurabilityTimeout",
    "IdempotencyConflict",
    "IdleTimeout",
    "InvalidActorRef",
    "InvalidArgument",
    "InvalidIdempotencyKey",
    "JournalMismatch",
    "LeaseLost",
    "MessageNotEncodable",
    "MessageTooLarge",
    "RecordTooLarge",
    "RedisUnavailable",
    "Reject",
    "Rejected",
    "ServerError",
    "StateTooLarge",
    "StepFailed",
    "TooLarge",
    "TurnTimeout",
    "UnknownActorType",
    "UnknownMessageType",
]

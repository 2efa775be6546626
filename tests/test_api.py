"""The public API changes only on purpose."""

import actors


def test_exported_names_are_pinned() -> None:
    assert sorted(actors.__all__) == sorted([
        "Actor", "ActorRef", "App", "Client", "connect", "Worker", "EmbeddedServer",
        "RedisSettings", "WorkerSettings", "LeaseSettings", "RetrySettings", "MessageSettings",
        "ActorsError", "AskTimeout", "ConfigurationError", "DecodeError", "DefinitionError",
        "HandlerError", "LeaseLost", "MessageTooLarge", "ServerError", "UnknownActorType",
        "UnknownMessageType", "Approval", "schedule", "Tick", "JournalMismatch", "StepFailed",
        "Limiter", "DuplicateItem", "IdempotencyConflict", "InvalidIdempotencyKey",
        "TurnTimeout", "step_info", "StepInfo", "Reject", "Rejected",
        "TooLarge", "StateTooLarge", "RecordTooLarge",
        "IdleTimeout", "InvalidActorRef", "InvalidArgument", "MessageNotEncodable", "RedisUnavailable",
        "DurabilityTimeout", "LocalCluster",
    ])  # fmt: skip
    for name in actors.__all__:
        assert getattr(actors, name) is not None


def test_every_error_derives_from_the_root() -> None:
    for name in actors.__all__:
        obj = getattr(actors, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, actors.ActorsError)

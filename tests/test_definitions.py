"""Actor definitions are checked when the class is created, with clear errors."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

import actors
from actors import DefinitionError


class Ping(BaseModel):
    pass


class Pong(BaseModel):
    pass


def test_handlers_are_discovered_by_annotation() -> None:
    class Player(actors.Actor):
        async def on_ping(self, msg: Ping) -> Pong:
            return Pong()

        async def helper(self) -> None:  # no message parameter: not a handler
            pass

    assert set(Player.handlers) == {"Ping"}
    assert Player.handlers["Ping"].reply is Pong
    assert Player.ref("k").id == "Player/k"


def test_two_handlers_for_one_message_type_are_refused() -> None:
    with pytest.raises(DefinitionError, match="two handlers"):

        class Twice(actors.Actor):
            async def a(self, msg: Ping) -> None: ...

            async def b(self, msg: Ping) -> None: ...


def test_a_non_model_return_type_is_refused() -> None:
    with pytest.raises(DefinitionError, match="must return a pydantic model"):

        class Bad(actors.Actor):
            async def a(self, msg: Ping) -> int:
                return 1


def test_two_actor_types_with_one_name_are_refused() -> None:
    class One(actors.Actor, name="same"):
        pass

    class Two(actors.Actor, name="same"):
        pass

    with pytest.raises(DefinitionError, match="two actor types"):
        actors.App(One, Two)


def test_refs_parse_and_reject_bad_text() -> None:
    ref = actors.ActorRef.parse("Counter/user/7")
    assert (ref.type, ref.key) == ("Counter", "user/7")
    with pytest.raises(ValueError):
        actors.ActorRef.parse("no-slash")

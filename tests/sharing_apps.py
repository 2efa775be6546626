"""Apps that share (or must not share) a namespace: another team's app, and two versions of it."""

from __future__ import annotations

from pydantic import BaseModel

import actors


class Hello(BaseModel):
    name: str = "world"


class Greeting(BaseModel):
    text: str


class Bye(BaseModel):
    pass


class Greeter(actors.Actor):
    async def on_hello(self, msg: Hello) -> Greeting:
        return Greeting(text=f"hello, {msg.name}")


class Farewell(actors.Actor):
    async def on_bye(self, msg: Bye) -> Greeting:
        return Greeting(text="bye")


greeters = actors.App(Greeter)
"""Version 1 of the greeting app: a different app from ``tests.apps`` (no type in common)."""

greeters_v2 = actors.App(Greeter, Farewell)
"""Version 2 of the same app (same module): adds a type."""

"""Actor types with and without state retention (``class X(Actor, retention=...)``)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import ClassVar

from pydantic import BaseModel

import actors


class Add(BaseModel):
    by: int = 1


class Get(BaseModel):
    pass


class Total(BaseModel):
    total: int


class Hold(BaseModel):
    """A turn that runs in memory (no journal write) until the test opens ``Kept.gate``."""


class Flow(BaseModel):
    """A workflow turn: waits (durably, with no timeout) for a Proceed, then adds 10."""


class Proceed(BaseModel):
    pass


class Kept(actors.Actor, retention=1.0):
    """State deleted after a second without a turn."""

    class State(BaseModel):
        total: int = 0

    gate: ClassVar[asyncio.Event | None] = None
    holding: ClassVar[set[str]] = set()

    async def on_add(self, msg: Add) -> None:
        self.state.total += msg.by

    async def on_get(self, msg: Get) -> Total:
        return Total(total=self.state.total)

    async def on_hold(self, msg: Hold) -> None:
        gate = type(self).gate
        assert gate is not None, "the test sets Kept.gate"
        type(self).holding.add(self.key)
        await gate.wait()
        self.state.total += 1


class Waiter(actors.Actor, waits_for=[Proceed], retention=timedelta(seconds=1)):
    """A workflow type with retention given as a timedelta."""

    class State(BaseModel):
        total: int = 0

    async def on_add(self, msg: Add) -> None:
        self.state.total += msg.by

    async def on_flow(self, msg: Flow) -> None:
        await self.wait_for(Proceed)
        self.state.total += 10

    async def on_get(self, msg: Get) -> Total:
        return Total(total=self.state.total)


class Forever(actors.Actor):
    """No retention: its state is kept for ever, and its commits mark nothing."""

    class State(BaseModel):
        total: int = 0

    async def on_add(self, msg: Add) -> None:
        self.state.total += msg.by


app = actors.App(Kept, Waiter, Forever)

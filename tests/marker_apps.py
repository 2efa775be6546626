"""Actors of test_markers: queued jobs that one actor records in the order its turns commit,
a boss that queues jobs from a turn, and an asker whose turn asks and commits.

A worker process started with ``ACTORS_CRASH_AFTER_ENQUEUE=1`` kills itself (SIGKILL) right
after its first queued item is queued, before the turn that queued it writes its journal."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from actors import Actor, App, Limiter
from actors.limits import Limits


class Job(BaseModel):
    tag: str


class Fan(BaseModel):
    tags: list[str]
    target: str = "w"


class Bump(BaseModel):
    pass


class Count(BaseModel):
    n: int


class AskMany(BaseModel):
    times: int


class Jobs(Actor):
    """The target of queued items: its committed state lists them in the order they ran."""

    class State(BaseModel):
        done: list[str] = []

    async def on_job(self, msg: Job) -> None:
        self.state.done.append(msg.tag)


class Boss(Actor):
    """Queues jobs from inside a turn (journaled)."""

    class State(BaseModel):
        items: list[str] = []

    async def on_fan(self, msg: Fan) -> None:
        for tag in msg.tags:
            self.state.items.append(await self.enqueue("jobs", Jobs.ref(msg.target), Job(tag=tag)))


class Counted(Actor):
    class State(BaseModel):
        n: int = 0

    async def on_bump(self, msg: Bump) -> Count:
        self.state.n += 1
        return Count(n=self.state.n)


class Asker(Actor):
    """Asks its Counted namesake ``times`` times (journaled asks), then commits."""

    class State(BaseModel):
        answers: list[int] = []

    async def on_ask_many(self, msg: AskMany) -> None:
        for _ in range(msg.times):
            self.state.answers.append((await self.ask(Counted.ref(self.key), Bump())).n)


class Gated(Actor):
    """Answers an ask once the test opens its gate (the file ``open``); notes that it started."""

    class State(BaseModel):
        n: int = 0

    async def on_bump(self, msg: Bump) -> Count:
        folder = Path(os.environ["ACTORS_TEST_DIR"])
        (folder / "gated.log").touch()
        await _gate(folder / "open")
        self.state.n += 1
        return Count(n=self.state.n)


async def _gate(path: Path) -> None:
    """Return once the test has created ``path`` (another process: no event to wait on)."""
    while not await asyncio.to_thread(path.exists):  # noqa: ASYNC110
        await asyncio.sleep(0.02)


class GatedAsker(Actor):
    """Asks its Gated namesake once (a journaled ask), then commits."""

    class State(BaseModel):
        answers: list[int] = []

    async def on_ask_many(self, msg: AskMany) -> None:
        for _ in range(msg.times):
            self.state.answers.append((await self.ask(Gated.ref(self.key), Bump(), timeout=60)).n)


app = App(Jobs, Boss, Counted, Asker, Gated, GatedAsker, limiters=[Limiter("jobs", concurrency=1)])


def _crash_after_enqueue() -> None:
    queue = Limits.enqueue

    async def enqueue_then_die(self: Limits, *args: Any, **kwargs: Any) -> str:
        item_id = await queue(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)  # queued, and its turn's journal never says so
        return item_id

    Limits.enqueue = enqueue_then_die  # type: ignore[method-assign]


if os.environ.get("ACTORS_CRASH_AFTER_ENQUEUE") == "1":
    _crash_after_enqueue()

"""Rate- and concurrency-limited actors the limiter tests run in real worker processes.

Every limited call appends ``<event> <pid> <time.time()>`` to ``$ACTORS_TEST_DIR/calls.log``.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from pydantic import BaseModel

import actors


def log_call(event: str) -> None:
    path = Path(os.environ.get("ACTORS_TEST_DIR", ".")) / "calls.log"
    with open(path, "a") as out:
        out.write(f"{event} {os.getpid()} {time.time():.6f}\n")


class Hit(BaseModel):
    seconds: float = 0.0


async def call_api(seconds: float) -> None:
    log_call("start")
    await asyncio.sleep(seconds)
    log_call("end")


class RateCaller(actors.Actor):
    class State(BaseModel):
        calls: int = 0

    async def on_hit(self, msg: Hit) -> None:
        await self.step(call_api, msg.seconds, limiter="api")
        self.state.calls += 1


class SlotCaller(actors.Actor):
    class State(BaseModel):
        calls: int = 0

    async def on_hit(self, msg: Hit) -> None:
        await self.step(call_api, msg.seconds, limiter="pool")
        self.state.calls += 1


class Crawler(actors.Actor, limiter="crawl"):
    """Every turn holds a slot of ``crawl``."""

    class State(BaseModel):
        calls: int = 0

    async def on_hit(self, msg: Hit) -> None:
        await call_api(msg.seconds)
        self.state.calls += 1


app = actors.App(
    RateCaller,
    SlotCaller,
    Crawler,
    limiters=[
        actors.Limiter("api", rate=20, per=1.0),
        actors.Limiter("pool", concurrency=5),
        actors.Limiter("crawl", concurrency=2),
    ],
)

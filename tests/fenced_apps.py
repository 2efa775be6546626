"""Actors whose steps leave a trace in ``$ACTORS_TEST_DIR/effects.log``: which process ran
which step function, and when it started and ended, so tests can see a step run by a
fenced owner or two runs of one step overlapping."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from pydantic import BaseModel

import actors


def trace(text: str) -> None:
    path = Path(os.environ.get("ACTORS_TEST_DIR", ".")) / "effects.log"
    with open(path, "a") as out:
        out.write(f"{text} {os.getpid()} {time.time():.6f}\n")
        out.flush()
        os.fsync(out.fileno())


def effect(key: str, name: str, seconds: float) -> str:
    """A step function with an outside effect that takes ``seconds``."""
    trace(f"start {key} {name}")
    time.sleep(seconds)
    trace(f"end {key} {name}")
    return name


GATE_LIMIT = 120.0
"""Seconds a gated step waits for its gate at most: a test that never opens it still ends."""


def gated_effect(key: str, name: str, gate: str) -> str:
    """A step function with an outside effect that lasts until the test creates the file
    ``gate`` in ``$ACTORS_TEST_DIR``: busy for as long as the test needs, however slow the
    machine, where a fixed duration could end before the test has looked."""
    trace(f"start {key} {name}")
    path = Path(os.environ.get("ACTORS_TEST_DIR", ".")) / gate
    deadline = time.monotonic() + GATE_LIMIT
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    trace(f"end {key} {name}")
    return name


def open_gate(folder: Path, gate: str) -> None:
    (folder / gate).touch()


class Steps(BaseModel):
    gap: float = 0.0
    """Seconds the handler waits (in plain code, not durably) between the two steps."""
    first: float = 0.0
    second: float = 0.0
    first_gate: str | None = None
    """If set, the first step lasts until this file exists (``gated_effect``), not ``first``."""


class Ran(BaseModel):
    done: int = 0


class TwoSteps(actors.Actor):
    State = Ran

    async def on_steps(self, msg: Steps) -> None:
        if msg.first_gate is None:
            await self.step(effect, self.key, "one", msg.first)
        else:
            await self.step(gated_effect, self.key, "one", msg.first_gate)
        trace(f"between {self.key} -")
        await asyncio.sleep(msg.gap)
        await self.step(effect, self.key, "two", msg.second)
        self.state.done += 1


class Exit(BaseModel):
    code: int = 3


class CancelMe(BaseModel):
    pass


class Quitter(actors.Actor):
    """Its handler calls ``sys.exit``: a handler failure, not the end of the worker."""

    State = Ran

    async def on_exit(self, msg: Exit) -> None:
        raise SystemExit(msg.code)

    async def on_cancel_me(self, msg: CancelMe) -> None:
        raise asyncio.CancelledError()  # not a cancellation of the turn: a failure like any other

    async def on_steps(self, msg: Steps) -> None:
        self.state.done += 1


class Hold(BaseModel):
    seconds: float
    timeout: float | None = None


class Capped(actors.Actor):
    """One sync step under limiter ``one`` (a concurrency cap of 1)."""

    State = Ran

    async def on_hold(self, msg: Hold) -> None:
        try:
            await self.step(
                effect, self.key, "slot", msg.seconds, limiter="one", timeout=msg.timeout, retries=0
            )
        except actors.StepFailed:
            pass
        self.state.done += 1


class Block(BaseModel):
    seconds: float


class Blocker(actors.Actor):
    """Blocks its worker's event loop (a bug in a handler, on purpose)."""

    async def on_block(self, msg: Block) -> None:
        trace(f"blocking {self.key} -")
        time.sleep(msg.seconds)  # noqa: ASYNC251  # the bug this actor stands for


app = actors.App(TwoSteps, Quitter, Capped, Blocker, limiters=[actors.Limiter("one", concurrency=1)])


class Crash(BaseModel):
    pass


class Crasher(actors.Actor):
    """Its handler ends its process, as a segfault or the OOM killer would."""

    async def on_crash(self, msg: Crash) -> None:
        trace(f"crashing {self.key} -")
        os._exit(17)


app.register(Crasher)


class Hang(BaseModel):
    pass


class Hanger(actors.Actor):
    """A handler that never returns."""

    State = Ran

    async def on_hang(self, msg: Hang) -> None:
        trace(f"hanging {self.key} -")
        await asyncio.Event().wait()

    async def on_steps(self, msg: Steps) -> None:
        self.state.done += 1


class Racy(actors.Actor):
    """Runs two steps at once: the journal's order would depend on timing."""

    async def on_steps(self, msg: Steps) -> None:
        await asyncio.gather(self.step(effect, self.key, "a", 0.01), self.step(effect, self.key, "b", 0.01))


class ShortHanger(Hanger, turn_timeout=0.5):
    """A Hanger whose turns may run half a second."""


app.register(Hanger)
app.register(ShortHanger)
app.register(Racy)


class Ping(BaseModel):
    pass


class Pong(BaseModel):
    n: int = 1


class Target(actors.Actor):
    async def on_ping(self, msg: Ping) -> Pong:
        return Pong()


class Orchestrator(actors.Actor):
    """Asks a Target of the same key (often of its own shard), then records it."""

    State = Ran

    async def on_steps(self, msg: Steps) -> None:
        await self.ask(Target.ref(self.key), Ping(), timeout=30)
        self.state.done += 1


app.register(Target)
app.register(Orchestrator)


class Nested(actors.Actor, limiter="one"):
    """Every turn holds limiter ``one`` (cap 1), and its step asks for ``one`` again."""

    State = Ran

    async def on_steps(self, msg: Steps) -> None:
        await self.step(effect, self.key, "nested", 0.0, limiter="one")
        self.state.done += 1


app.register(Nested)


async def async_effect(key: str, name: str, seconds: float) -> str:
    trace(f"start {key} {name}")
    await asyncio.sleep(seconds)
    trace(f"end {key} {name}")
    return name


class Outcome(BaseModel):
    error: str = ""


class Impatient(actors.Actor):
    """An async step that would take 30 s, with a timeout of 0.3 s and no retries."""

    State = Outcome

    async def on_steps(self, msg: Steps) -> None:
        try:
            await self.step(async_effect, self.key, "slow", 30.0, timeout=0.3, retries=0)
        except actors.StepFailed as exc:
            self.state.error = exc.error_type


app.register(Impatient)

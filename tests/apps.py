"""Actor types the tests run, in-process and in real worker processes."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from pydantic import BaseModel

import actors


class Add(BaseModel):
    by: int = 1
    sender: str = ""
    seq: int = -1


class Get(BaseModel):
    pass


class Nap(BaseModel):
    """Adds one after sleeping inside the handler (to catch a worker mid-turn)."""

    seconds: float


class Total(BaseModel):
    total: int


class Counter(actors.Actor):
    """Counts; remembers, per sender, the sequence numbers in the order handled, the
    lease epochs its turns committed under (fencing: they may only grow), and an
    activation log: which process ran each committed turn of a sender's message, from
    when to when (system-wide monotonic clock), to show no two processes held it at once."""

    class State(BaseModel):
        total: int = 0
        seqs: dict[str, list[int]] = {}
        epochs: list[int] = []
        held: list[tuple[int, float, float]] = []

    async def on_add(self, msg: Add) -> None:
        started = time.monotonic()
        self.state.total += msg.by
        if msg.sender:
            self.state.seqs.setdefault(msg.sender, []).append(msg.seq)
        if not self.state.epochs or self.state.epochs[-1] != self.turn.epoch:
            self.state.epochs.append(self.turn.epoch)
        if msg.sender:
            await asyncio.sleep(0)  # a turn that yields, as real ones do
            self.state.held.append((os.getpid(), started, time.monotonic()))

    async def on_nap(self, msg: Nap) -> None:
        await asyncio.sleep(msg.seconds)
        self.state.total += 1
        if not self.state.epochs or self.state.epochs[-1] != self.turn.epoch:
            self.state.epochs.append(self.turn.epoch)

    async def on_get(self, msg: Get) -> Total:
        return Total(total=self.state.total)


class Mirror(actors.Actor):
    """Adds to itself and forwards each add to a Tally actor (often in another shard)."""

    class State(BaseModel):
        total: int = 0

    async def on_add(self, msg: Add) -> None:
        self.state.total += msg.by
        await self.send(Tally.ref(f"tally-{int(self.key.rsplit('-', 1)[-1]) % 7}"), Add(by=msg.by))

    async def on_get(self, msg: Get) -> Total:
        return Total(total=self.state.total)


class Tally(actors.Actor):
    class State(BaseModel):
        total: int = 0

    async def on_add(self, msg: Add) -> None:
        self.state.total += msg.by

    async def on_get(self, msg: Get) -> Total:
        return Total(total=self.state.total)


class Lookup(BaseModel):
    name: str


class Answer(BaseModel):
    value: str


class Front(actors.Actor):
    """Answers by asking a Back actor."""

    async def on_lookup(self, msg: Lookup) -> Answer:
        inner = await self.ask(Back.ref(msg.name), msg)
        return Answer(value=f"front saw {inner.value}")


class Back(actors.Actor):
    async def on_lookup(self, msg: Lookup) -> Answer:
        return Answer(value=f"back:{self.key}")


class Boom(BaseModel):
    times: int = 1_000


class Flaky(actors.Actor):
    """Fails ``times`` attempts, then succeeds; counts attempts and successes."""

    class State(BaseModel):
        ok: int = 0

    attempts: int = 0

    async def on_boom(self, msg: Boom) -> Total:
        type(self).attempts += 1
        self.state.ok += 1000  # must be rolled back when the attempt fails
        if type(self).attempts <= msg.times:
            raise RuntimeError(f"boom #{type(self).attempts}")
        self.state.ok -= 999
        return Total(total=self.state.ok)

    async def on_add(self, msg: Add) -> Total:
        self.state.ok += msg.by
        return Total(total=self.state.ok)


class Hold(BaseModel):
    pass


def held_dir() -> Path:
    return Path(os.environ.get("ACTORS_TEST_DIR", "."))


def held_log(text: str) -> None:
    with open(held_dir() / "held.log", "a") as out:
        out.write(text + "\n")


class Held(actors.Actor):
    """Its turn logs ``start <pid> <message id>`` to ``$ACTORS_TEST_DIR/held.log``, then runs
    until the file ``$ACTORS_TEST_DIR/release`` or ``release-<key>`` exists (logging ``end <pid>
    <message id>``): a test that saw the start kills the worker inside the turn, not on
    either side of it."""

    class State(BaseModel):
        total: int = 0

    async def on_hold(self, msg: Hold) -> None:
        held_log(f"start {os.getpid()} {self.turn.message_id}")
        while True:
            if (held_dir() / "release").exists() or (held_dir() / f"release-{self.key}").exists():
                break
            await asyncio.sleep(0.02)
        held_log(f"end {os.getpid()} {self.turn.message_id}")
        self.state.total += 1


app = actors.App(Counter, Mirror, Tally, Front, Back, Flaky, Held)

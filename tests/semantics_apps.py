"""Actors for the message-semantics tests: a recorder of what it received, in order, and
senders that mix send, ask and failing turns."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from pydantic import BaseModel

import actors


class Note(BaseModel):
    text: str


class Query(BaseModel):
    text: str


class Seen(BaseModel):
    log: list[str] = []


class Recorder(actors.Actor):
    State = Seen

    async def on_note(self, msg: Note) -> None:
        self.state.log.append(msg.text)

    async def on_query(self, msg: Query) -> Seen:
        self.state.log.append(msg.text)
        return self.state


class Mix(BaseModel):
    target: str


def noop() -> int:
    return 1


class Sender(actors.Actor):
    """Sends to a recorder, then asks it: the ask must not overtake the send."""

    async def on_mix(self, msg: Mix) -> None:
        ref = Recorder.ref(msg.target)
        await self.send(ref, Note(text="sent first"))
        await self.send(ref, Note(text="sent second"))
        await self.ask(ref, Query(text="asked third"))
        await self.send(ref, Note(text="sent fourth"))


class Leaky(actors.Actor):
    """Sends, runs a step, then fails for good: its send must never be delivered."""

    async def on_mix(self, msg: Mix) -> None:
        await self.send(Recorder.ref(msg.target), Note(text="from a turn that failed"))
        await self.step(noop)
        raise RuntimeError("fails for good")


app = actors.App(Recorder, Sender, Leaky)


class Gate(BaseModel):
    pass


class SlowTarget(actors.Actor):
    """Answers a query once the file ``$ACTORS_TEST_DIR/open`` exists."""

    State = Seen

    async def on_query(self, msg: Query) -> Seen:
        here = Path(os.environ.get("ACTORS_TEST_DIR", "."))
        (here / f"asked-{os.getpid()}").touch()
        while True:  # a file, not an event: the test is another process
            if (here / "open").exists():
                break
            await asyncio.sleep(0.02)
        self.state.log.append(msg.text)
        return self.state


class Asker(actors.Actor):
    State = Seen

    async def on_mix(self, msg: Mix) -> None:
        answer = await self.ask(SlowTarget.ref(msg.target), Query(text="q"), timeout=60)
        self.state.log.append(f"answered {len(answer.log)}")


app.register(SlowTarget)
app.register(Asker)


class Relay(actors.Actor):
    """Only sends."""

    async def on_mix(self, msg: Mix) -> None:
        await self.send(Recorder.ref(msg.target), Note(text="relayed"))


app.register(Relay)

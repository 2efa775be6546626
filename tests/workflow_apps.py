"""Durable workflows the tests run, in-process and in real worker processes.

Step functions log every start and end to ``$ACTORS_TEST_DIR/steps.log`` (one
line each, flushed and fsynced) so a test can see exactly which ran, and how often,
across crashes of the process that ran them. A gated step, after logging its start
``start <key> <i> <token>``, waits until the test calls ``release(directory, token)``: the
test then acts (kills the worker, changes the code) while the step is certainly running.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from datetime import timedelta
from pathlib import Path

from pydantic import BaseModel

import actors
from actors import Approval, StepFailed

GATE_TIMEOUT = 60.0
"""A gated step goes on by itself after this long, so a broken test fails instead of hanging."""


def gate_dir() -> Path:
    return Path(os.environ.get("ACTORS_TEST_DIR", "."))


def log_line(text: str) -> None:
    path = gate_dir() / "steps.log"
    with open(path, "a") as out:
        out.write(text + "\n")
        out.flush()
        os.fsync(out.fileno())


def release(directory: Path, token: str) -> None:
    """Let the gated step that logged ``token`` at its start go on."""
    (directory / f"release-{token}").touch()


def _released(token: str) -> bool:
    return (gate_dir() / f"release-{token}").exists()


class Go(BaseModel):
    steps: int = 5
    pause: float = 0.0
    """Seconds each step takes."""
    gate: bool = False
    """Each step, once started, waits for ``release`` (for a test to act inside it)."""


class Done(BaseModel):
    tokens: list[str]


class Progress(BaseModel):
    tokens: list[str] = []
    finished: int = 0


async def work(key: str, i: int, pause: float, gate: bool = False) -> str:
    """A step with a visible side effect: returns a token unique to this execution."""
    token = uuid.uuid4().hex[:8]
    log_line(f"start {key} {i} {token}")
    await asyncio.sleep(pause)
    deadline = time.monotonic() + GATE_TIMEOUT
    while gate and time.monotonic() < deadline:
        if _released(token):
            break
        await asyncio.sleep(0.01)
    log_line(f"end {key} {i} {token}")
    return token


def sync_work(key: str, i: int, pause: float, gate: bool = False) -> str:
    token = uuid.uuid4().hex[:8]
    log_line(f"start {key} {i} {token}")
    time.sleep(pause)
    deadline = time.monotonic() + GATE_TIMEOUT
    while gate and time.monotonic() < deadline:
        if _released(token):
            break
        time.sleep(0.01)
    log_line(f"end {key} {i} {token}")
    return token


class Pipeline(actors.Actor):
    """Runs ``steps`` journaled steps (odd ones sync, in a thread), then records them."""

    State = Progress

    async def on_go(self, msg: Go) -> Done:
        tokens = []
        for i in range(msg.steps):
            fn = work if i % 2 == 0 else sync_work
            tokens.append(await self.step(fn, self.key, i, msg.pause, msg.gate, name=f"step-{i}"))
        self.state.tokens = tokens
        self.state.finished += 1
        log_line(f"finished {self.key}")
        return Done(tokens=tokens)


class Attempts(BaseModel):
    fail: int
    retries: int = 3


class Outcome(BaseModel):
    value: str = ""
    error: str = ""
    calls: int = 0


CALLS: dict[str, int] = {}


async def flaky(key: str, fail: int) -> str:
    CALLS[key] = CALLS.get(key, 0) + 1
    if CALLS[key] <= fail:
        raise ConnectionError(f"flaky call #{CALLS[key]}")
    return f"ok after {CALLS[key]}"


class Retrier(actors.Actor):
    State = Outcome

    async def on_attempts(self, msg: Attempts) -> Outcome:
        try:
            self.state.value = await self.step(flaky, self.key, msg.fail, retries=msg.retries, backoff=0.01)
        except StepFailed as exc:
            self.state.error = f"{exc.error_type}: {exc.message}"
        self.state.calls = CALLS.get(self.key, 0)
        return self.state


class Nap(BaseModel):
    seconds: float


class Note(BaseModel):
    text: str


class Woke(BaseModel):
    slept_from_ms: int = 0
    woke_at_ms: int = 0
    after: list[str] = []


def now_ms() -> int:
    return int(time.time() * 1000)


class Sleeper(actors.Actor):
    """Sleeps durably between two journaled clock readings; records later messages."""

    State = Woke

    async def on_nap(self, msg: Nap) -> None:
        self.state.slept_from_ms = await self.step(now_ms)
        await self.sleep(timedelta(seconds=msg.seconds))
        self.state.woke_at_ms = await self.step(now_ms)

    async def on_note(self, msg: Note) -> None:
        self.state.after.append(msg.text)


class Refund(BaseModel):
    request_id: str
    timeout: float | None = None


class Decision(BaseModel):
    status: str = ""
    by: str = ""
    notes: list[str] = []
    approvals_seen: int = 0


def record_decision(state: Decision, approval: Approval | None) -> Decision:
    state.approvals_seen += approval is not None
    if approval is None:
        state.status = "timed out"
    else:
        state.status = "approved" if approval.approved else "rejected"
        state.by = approval.by
    return state


class Approver(actors.Actor):
    """Waits for an Approval of its request, then records the decision."""

    State = Decision

    async def on_refund(self, msg: Refund) -> Decision:
        self.state.status = "waiting"
        approval = await self.wait_for(
            Approval, timeout=msg.timeout, where=lambda a: a.request_id == msg.request_id
        )
        return record_decision(self.state, approval)

    async def on_note(self, msg: Note) -> None:
        self.state.notes.append(f"{msg.text}@{self.state.status}")


class Changing(actors.Actor):
    """Its code "changes" between runs of an open turn: ``variant`` decides the steps. With
    ``Go(gate=True)`` a test changes ``variant`` while the first step runs, its name taken."""

    variant = "a"

    async def on_go(self, msg: Go) -> None:
        _ = await self.step(work, self.key, 0, 0.0, msg.gate, name=f"first-{type(self).variant}")
        await self.sleep(0.3)


class Stubborn(actors.Actor):
    """Like Changing, but its handler swallows every error around the step."""

    variant = "a"

    class State(BaseModel):
        errors: list[str] = []

    async def on_go(self, msg: Go) -> None:
        try:
            _ = await self.step(work, self.key, 0, 0.0, msg.gate, name=f"first-{type(self).variant}")
        except Exception as exc:
            self.state.errors.append(type(exc).__name__)
        await self.sleep(0.3)


UNJOURNALABLE_CALLS: list[int] = []


def unjournalable() -> object:
    UNJOURNALABLE_CALLS.append(1)
    return object()


class Odd(actors.Actor):
    class State(BaseModel):
        error: str = ""

    async def on_go(self, msg: Go) -> None:
        try:
            await self.step(unjournalable)
        except StepFailed as exc:
            self.state.error = exc.error_type
        await self.sleep(0.2)  # the re-run after waking must not call it again


class Caller(actors.Actor):
    """Asks another actor, journaled; counts its own step runs."""

    class State(BaseModel):
        answer: str = ""

    async def on_go(self, msg: Go) -> Done:
        answer = await self.ask(Callee.ref(self.key), Note(text="hi"))
        await self.sleep(0.2)
        self.state.answer = answer.text
        return Done(tokens=[answer.text])


class Callee(actors.Actor):
    class State(BaseModel):
        asked: int = 0

    async def on_note(self, msg: Note) -> Note:
        self.state.asked += 1
        return Note(text=f"{msg.text} #{self.state.asked}")


def decide(key: str, decision: str) -> str:
    """A gated step: logs ``decide <key> <decision> <token>`` and waits for ``release(token)``."""
    token = uuid.uuid4().hex[:8]
    log_line(f"decide {key} {decision} {token}")
    deadline = time.monotonic() + GATE_TIMEOUT
    while time.monotonic() < deadline and not _released(token):
        time.sleep(0.01)
    return token


def pay(key: str) -> None:
    log_line(f"pay {key}")


class Payer(actors.Actor):
    """Waits for an Approval of its request; a gated step then records the decision (a test
    kills the worker inside it), and an approved refund is paid by another step."""

    State = Decision

    async def on_refund(self, msg: Refund) -> None:
        approval = await self.wait_for(
            Approval, timeout=msg.timeout, where=lambda a: a.request_id == msg.request_id
        )
        decision = "timeout" if approval is None else "approved" if approval.approved else "rejected"
        await self.step(decide, self.key, decision, name="decide")
        if approval is not None and approval.approved:
            await self.step(pay, self.key, name="pay")
        self.state.status = decision
        self.state.approvals_seen += approval is not None


class Proceed(BaseModel):
    pass


class Staged(actors.Actor, waits_for=[Proceed]):
    """Waits for a Proceed, then for an Approval of its request: whatever arrives before the
    Proceed (notes, approvals) is deferred behind the open turn meanwhile."""

    State = Decision

    async def on_refund(self, msg: Refund) -> Decision:
        self.state.status = "waiting"
        await self.wait_for(Proceed)
        approval = await self.wait_for(
            Approval, timeout=msg.timeout, where=lambda a: a.request_id == msg.request_id
        )
        return record_decision(self.state, approval)

    async def on_note(self, msg: Note) -> None:
        self.state.notes.append(msg.text)


app = actors.App(Pipeline, Retrier, Sleeper, Approver, Changing, Stubborn, Odd, Caller, Callee, Payer, Staged)

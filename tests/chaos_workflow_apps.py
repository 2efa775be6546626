"""Workflows for the workflow chaos test (test_workflow_chaos.py).

Each step function appends its ``start`` and its ``end`` (or, for an async one whose task
is cancelled, ``cancel``) to ``$ACTORS_TEST_DIR/wfchaos.log``, one fsynced line each, and
the handler logs ``between`` when it goes on from a step it ran (journaled by then) to its
plain code before the next::

    <what> <key> <step> <pid> <epoch> <time> <called> <token>

``epoch`` is the lease epoch of the turn that called the step (``self.turn.epoch``),
``time`` the system-wide ``CLOCK_MONOTONIC`` when the line was made (the test process
reads the same clock), ``called`` the time at which the handler called ``self.step``
(on a ``start`` line; ``-`` otherwise) and ``token`` is unique to that execution: it is
the step's result, so the state shows which execution was journaled (on a ``between``
line: the result the handler went on with).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path

from pydantic import BaseModel

import actors

LOG_NAME = "wfchaos.log"

RAN: set[str] = set()
"""Tokens of the step executions of this process: a step whose result is not among them was
replayed from the journal, and its handler goes on at once (a re-run of a turn is short)."""


def trace(what: str, key: str, step: str, epoch: int, token: str, called: float | None = None) -> None:
    path = Path(os.environ.get("ACTORS_TEST_DIR", ".")) / LOG_NAME
    at = time.monotonic()
    mark = "-" if called is None else f"{called:.6f}"
    line = f"{what} {key} {step} {os.getpid()} {epoch} {at:.6f} {mark} {token}\n"
    with open(path, "a") as out:
        out.write(line)
        out.flush()
        os.fsync(out.fileno())


async def async_effect(key: str, step: str, epoch: int, seconds: float, called: float) -> str:
    token = uuid.uuid4().hex[:12]
    RAN.add(token)
    trace("start", key, step, epoch, token, called)
    try:
        await asyncio.sleep(seconds)
    except BaseException:  # its task was cancelled (a lost lease): it stopped here
        trace("cancel", key, step, epoch, token)
        raise
    trace("end", key, step, epoch, token)
    return token


def sync_effect(key: str, step: str, epoch: int, seconds: float, called: float) -> str:
    """Run in a thread, which nothing can stop: it always logs its end unless its process dies."""
    token = uuid.uuid4().hex[:12]
    RAN.add(token)
    trace("start", key, step, epoch, token, called)
    time.sleep(seconds)
    trace("end", key, step, epoch, token)
    return token


class Run(BaseModel):
    pauses: list[float]
    """Seconds each step takes; even-numbered steps are async, odd ones sync (in a thread)."""
    gap: float = 0.1
    """Seconds the handler spends after a step it ran in plain (not journaled) code, as a
    handler that computes something would: a paused former owner that wakes here must be
    fenced by the next step's check of its lease deadline."""
    nap: float = 0.0
    """A durable ``self.sleep`` after step 1 (0: none)."""


class Flow(BaseModel):
    done: int = 0
    tokens: list[str] = []


class ChaosFlow(actors.Actor):
    State = Flow

    async def on_run(self, msg: Run) -> None:
        tokens = []
        for i, seconds in enumerate(msg.pauses):
            fn = async_effect if i % 2 == 0 else sync_effect
            step = f"s{i}"
            token = await self.step(fn, self.key, step, self.turn.epoch, seconds, time.monotonic(), name=step)
            tokens.append(token)
            if token in RAN:
                trace("between", self.key, step, self.turn.epoch, token)
                await asyncio.sleep(msg.gap)
            if i == 1 and msg.nap:
                await self.sleep(msg.nap)
        self.state.done += 1
        self.state.tokens = tokens


app = actors.App(ChaosFlow)

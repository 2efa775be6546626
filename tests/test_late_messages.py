"""What a ``wait_for`` takes, and when: a message that reached Redis after the wait's deadline
never satisfies it (without faults, with the worker down across the deadline); a wait's
outcome is decided once, across a SIGKILL in the step after it; late and unmatched messages
are dead-lettered with their own reasons and shown by ``inspect``; a match deferred behind
more than a thousand other messages still counts. Real servers, real workers."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import actors
from actors.codec import decode_envelope
from actors.journal import FOREVER_MS

from .conftest import eventually
from .test_cli import actors_cli, ok
from .workflow_apps import Approver, Note, Payer, Proceed, Refund, Staged, app, release

WORKFLOWS = "tests.workflow_apps:app"
LATE = "arrived after the wait timed out"
NO_WAIT = "no wait was open"


async def test_an_approval_that_reaches_redis_after_the_deadline_never_satisfies_the_wait(
    connect, start_worker
) -> None:
    """No fault at all: the approval arrives after the deadline by Redis's clock, before the
    timer fires (held back here, so that the window is not a millisecond wide)."""
    await start_worker(app)
    async with connect(app=app) as client:
        ref = Approver.ref("late-live")
        await client.send(ref, Refund(request_id="r", timeout=1.0))
        due_ms = await _hold_timer(client, ref)
        await eventually(lambda: _redis_past(client, due_ms))
        await client.approve(ref, "r", by="late")
        state = await eventually(lambda: _decided(client, ref))
        assert (state.status, state.approvals_seen, state.by) == ("timed out", 0, "")
        [dead] = await eventually(lambda: _dead_letters(client, ref, 1))
        assert decode_envelope(dead.envelope).type == "Approval"


async def test_an_approval_sent_while_the_worker_was_down_past_the_deadline_never_satisfies_it(
    spawn_worker, connect
) -> None:
    worker = spawn_worker(WORKFLOWS)
    async with connect(app=app) as client:
        ref = Approver.ref("late-down")
        await client.send(ref, Refund(request_id="r", timeout=1.0))
        view = await eventually(lambda: _turn_status(client, ref, "waiting"))
        due_ms = _due_ms(view)
        assert worker.stop() == 0
        await eventually(lambda: _redis_past(client, due_ms))
        await client.approve(ref, "r", by="late")
        spawn_worker(WORKFLOWS)
        state = await eventually(lambda: _decided(client, ref))
        assert (state.status, state.approvals_seen, state.by) == ("timed out", 0, "")
        await eventually(lambda: _dead_letters(client, ref, 1))


async def test_a_timed_out_wait_stays_timed_out_across_a_kill_in_the_next_step(
    spawn_worker, connect, tmp_path
) -> None:
    """The wait times out; the worker is SIGKILLed inside the step after it; a late approval
    arrives; the recovered turn must replay the timeout, not take the approval and pay."""
    log = tmp_path / "steps.log"
    worker = spawn_worker(WORKFLOWS)
    async with connect(app=app) as client:
        ref = Payer.ref("p")
        await client.send(ref, Refund(request_id="r", timeout=0.5))
        first = await eventually(lambda: _decisions(log, "p"), timeout=30)
        assert [d[2] for d in first] == ["timeout"]
        worker.signal(signal.SIGKILL)
        assert worker.proc is not None
        worker.proc.wait()
        await client.approve(ref, "r", by="late")
        spawn_worker(WORKFLOWS)

        async def finished() -> Any:
            for words in _decisions(log, "p"):
                release(tmp_path, words[3])
            return await _decided(client, ref)

        state = await eventually(finished, timeout=30)
        assert (state.status, state.approvals_seen) == ("timeout", 0)
        decisions = [d[2] for d in _decisions(log, "p")]
        assert decisions and set(decisions) == {"timeout"}, decisions
        assert not [line for line in _lines(log) if line[0] == "pay"], "a timed-out refund was paid"
        await eventually(lambda: _dead_letters(client, ref, 1))


async def test_late_and_unmatched_approvals_are_dead_lettered_with_their_reasons_and_inspect_shows_them(
    connect, start_worker, redis_url, namespace
) -> None:
    await start_worker(app)
    async with connect(app=app) as client:
        ref = Approver.ref("seen")
        await client.send(ref, Refund(request_id="r", timeout=1.0))
        due_ms = await _hold_timer(client, ref)
        await eventually(lambda: _redis_past(client, due_ms))
        await client.approve(ref, "r", by="late")
        assert (await eventually(lambda: _decided(client, ref))).status == "timed out"
        await eventually(lambda: _turn_gone(client, ref))
        await client.approve(ref, "r", by="after the turn")  # no turn is open at all now
        dead = await eventually(lambda: _dead_letters(client, ref, 2))
        assert [d.reason for d in dead] == [LATE, NO_WAIT]
        assert "Approver/seen waited for Approval until" in dead[0].detail
        assert "Approver has no handler for Approval" in dead[1].detail

        view = await client.inspect(ref)
        assert [d.reason for d in view.dead_letters] == [LATE, NO_WAIT]
        assert [d.message_type for d in view.dead_letters] == ["Approval", "Approval"]
        shown = ok(
            await actors_cli("inspect", "Approver/seen", "--redis", redis_url, "--namespace", namespace)
        )
        assert "dead letters  2" in shown and LATE in shown and NO_WAIT in shown, shown


async def test_a_match_deferred_behind_more_than_a_thousand_messages_satisfies_the_wait(
    connect, start_worker
) -> None:
    await start_worker(app)
    async with connect(app=app) as client:
        ref = Staged.ref("deep")
        await client.send(ref, Refund(request_id="r", timeout=5.0))
        await eventually(lambda: _turn_status(client, ref, "waiting"))
        notes = [(ref, Note(text=f"n{n}")) for n in range(1200)]
        await client.send_many(notes)
        await client.approve(ref, "r", by="first")
        await client.approve(ref, "r", by="second")  # the same request again: the first one counts
        await eventually(lambda: _deferred(client, ref, 1202), timeout=30)
        await client.send(ref, Proceed())
        state = await eventually(lambda: _decided(client, ref), timeout=30)
        assert (state.status, state.by, state.approvals_seen) == ("approved", "first", 1)
        state = await eventually(lambda: _notes(client, ref, 1200), timeout=60)
        assert state.notes == [f"n{n}" for n in range(1200)], "the other messages kept their order"
        [dead] = await eventually(lambda: _dead_letters(client, ref, 1))
        assert dead.reason == NO_WAIT


# ---- helpers -----------------------------------------------------------------------------
async def _hold_timer(client: actors.Client, ref: actors.ActorRef[Any]) -> int:
    """Once the turn waits, push its timer out of reach, as if it had not fired yet: the turn
    then resumes only when a message of its type arrives. Returns the wait's deadline (ms)."""
    view = await eventually(lambda: _turn_status(client, ref, "waiting"))
    await client.store.redis.zadd(client.store.keys.timers(view.shard), {ref.id: FOREVER_MS})
    return _due_ms(view)


def _due_ms(view: Any) -> int:
    assert view.turn.due is not None
    return round(view.turn.due.timestamp() * 1000)


async def _redis_past(client: actors.Client, ms: int) -> bool:
    seconds, micros = await client.store.redis.time()
    return seconds * 1000 + micros // 1000 > ms


async def _turn_status(client: actors.Client, ref: actors.ActorRef[Any], status: str) -> Any:
    view = await client.inspect(ref)
    return view if view.turn is not None and view.turn.status == status else None


async def _turn_gone(client: actors.Client, ref: actors.ActorRef[Any]) -> bool:
    view = await client.inspect(ref)
    return view.turn is None and view.deferred == 0


async def _deferred(client: actors.Client, ref: actors.ActorRef[Any], n: int) -> bool:
    return (await client.inspect(ref)).deferred == n


async def _decided(client: actors.Client, ref: actors.ActorRef[Any]) -> Any:
    """The actor's state once its turn has committed a decision (any: the test asserts which)."""
    state = await client.state(ref)
    return state if state is not None and state.status not in ("", "waiting") else None


async def _notes(client: actors.Client, ref: actors.ActorRef[Any], n: int) -> Any:
    state = await client.state(ref)
    return state if state is not None and len(state.notes) >= n else None


async def _dead_letters(client: actors.Client, ref: actors.ActorRef[Any], n: int) -> list[Any] | None:
    """The actor's dead letters, oldest first, once there are exactly ``n``."""
    shard = (await client.inspect(ref)).shard
    found = [
        dl
        for dl in await client.store.dead_letters(shard, 10_000)
        if decode_envelope(dl.envelope).actor_id == ref.id
    ]
    return found if len(found) == n else None


def _lines(log: Path) -> list[list[str]]:
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def _decisions(log: Path, key: str) -> list[list[str]]:
    return [words for words in _lines(log) if words[:2] == ["decide", key]]

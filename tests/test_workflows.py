"""Durable primitives in one worker: journaled steps, durable sleep, waits for approval,
journaled ask, cancel and journal mismatches. Crashes are in test_workflow_crash.py."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

import actors
from tests.conftest import eventually
from tests.workflow_apps import (
    CALLS,
    UNJOURNALABLE_CALLS,
    Approver,
    Attempts,
    Callee,
    Caller,
    Changing,
    Go,
    Nap,
    Note,
    Odd,
    Pipeline,
    Refund,
    Retrier,
    Sleeper,
    Stubborn,
    app,
    release,
)


@pytest.fixture(autouse=True)
def step_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ACTORS_TEST_DIR", str(tmp_path))
    return tmp_path / "steps.log"


def lines(log: Path) -> list[list[str]]:
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


async def test_steps_run_once_and_their_results_come_back(connect, start_worker, step_log) -> None:
    await start_worker(app)
    async with connect(app=app) as client:
        done = await client.ask(Pipeline.ref("p"), Go(steps=4), timeout=20)
        assert len(done.tokens) == 4
        ends = [words[3] for words in lines(step_log) if words[0] == "end"]
        assert ends == done.tokens, "each step ran once, in order, and returned its token"
        state = await client.state(Pipeline.ref("p"))
        assert state.tokens == done.tokens and state.finished == 1
        view = await client.inspect(Pipeline.ref("p"))
        assert view.turn is None and view.deferred == 0, "the turn closed when it committed"


async def test_a_step_is_retried_then_its_final_error_is_raised_in_the_handler(connect, start_worker) -> None:
    CALLS.clear()  # counted per actor key in this process: the single-server run counted too
    await start_worker(app)
    async with connect(app=app) as client:
        ok = await client.ask(Retrier.ref("twice"), Attempts(fail=2, retries=3), timeout=20)
        assert ok.value == "ok after 3" and ok.calls == 3 and ok.error == ""
        failed = await client.ask(Retrier.ref("always"), Attempts(fail=100, retries=2), timeout=20)
        assert failed.value == "" and failed.calls == 3
        assert failed.error == "ConnectionError: flaky call #3"


async def test_sleep_suspends_the_turn_and_never_wakes_early(connect, start_worker) -> None:
    worker = await start_worker(app)
    async with connect(app=app) as client:
        ref = Sleeper.ref(f"s-{uuid.uuid4().hex[:6]}")
        await client.send(ref, Nap(seconds=1.5))
        view = await eventually(lambda: _turn_status(client, ref, "sleeping"))
        assert view.turn.due is not None
        assert not any(ref.id in r.activations and r.activations[ref.id].task for r in worker.runners)
        await client.send(ref, Note(text="during"))  # waits behind the sleeping turn
        await eventually(lambda: _deferred(client, ref, 1))
        state = await eventually(lambda: _woke(client, ref), timeout=15)
        assert state.woke_at_ms - state.slept_from_ms >= 1500
        await eventually(lambda: _has_note(client, ref, "during"))
        assert (await client.inspect(ref)).deferred == 0


async def test_an_approval_on_time_completes_the_wait(connect, start_worker) -> None:
    await start_worker(app)
    async with connect(app=app) as client:
        ref = Approver.ref("on-time")
        await client.send(ref, Refund(request_id="r1"))
        await eventually(lambda: _turn_status(client, ref, "waiting"))
        await client.approve(ref, "other-request", by="mallory")  # does not match: waits behind
        await client.send(ref, Note(text="n1"))
        await client.approve(ref, "r1", by="alice", comment="fine")
        state = await eventually(lambda: _status(client, ref, "approved"))
        assert state.by == "alice" and state.approvals_seen == 1
        # The note waited for the turn to end; the unmatched approval has no handler.
        state = await eventually(lambda: _notes(client, ref, 1))
        assert state.notes == ["n1@approved"]
        dead = await _dead_letters(client, ref)
        no_wait = "Approver has no handler for Approval and no open wait_for received it"
        assert [(d.reason, d.detail) for d in dead] == [("no wait was open", no_wait)]


async def test_an_approval_sent_before_the_wait_satisfies_it(connect, start_worker) -> None:
    async with connect(app=app, shards=4) as client:
        ref = Approver.ref("early")
        await client.send(ref, Refund(request_id="r2"))
        await client.approve(ref, "r2", approved=False, by="bob")  # queued before the turn runs
        await start_worker(app)
        state = await eventually(lambda: _status(client, ref, "rejected"))
        assert state.by == "bob" and state.approvals_seen == 1


async def test_a_late_approval_finds_the_wait_timed_out(connect, start_worker) -> None:
    await start_worker(app)
    async with connect(app=app) as client:
        ref = Approver.ref("late")
        reply = await client.ask(ref, Refund(request_id="r3", timeout=0.5), timeout=20)
        assert reply.status == "timed out"
        await client.approve(ref, "r3", by="carol")
        await eventually(lambda: _dead_letter_count(client, ref, 1))
        assert (await client.state(ref)).status == "timed out"


async def test_a_duplicated_approval_counts_once(connect, start_worker) -> None:
    await start_worker(app)
    async with connect(app=app) as client:
        ref = Approver.ref("dup")
        await client.send(ref, Refund(request_id="r4"))
        await eventually(lambda: _turn_status(client, ref, "waiting"))
        await client.approve(ref, "r4", by="dave")
        await client.approve(ref, "r4", by="dave")
        await eventually(lambda: _dead_letter_count(client, ref, 1))
        state = await client.state(ref)
        assert state.status == "approved" and state.approvals_seen == 1


async def test_cancel_ends_an_open_turn_and_lets_later_messages_run(connect, start_worker) -> None:
    await start_worker(app)
    async with connect(app=app) as client:
        ref = Approver.ref("cancelled")
        await client.send(ref, Refund(request_id="r5"))
        await eventually(lambda: _turn_status(client, ref, "waiting"))
        await client.send(ref, Note(text="after"))
        await client.cancel(ref)
        state = await eventually(lambda: _notes(client, ref, 1))
        assert state.notes == ["after@"], "the cancelled turn's changes were never committed"
        [dead] = await _dead_letters(client, ref)
        assert dead.reason == "cancelled"
        assert (await client.inspect(ref)).turn is None


async def test_a_journal_mismatch_parks_the_turn_with_a_readable_error(
    connect, start_worker, step_log
) -> None:
    worker = await start_worker(app)
    async with connect(app=app) as client:
        ref = Changing.ref("c")
        Changing.variant = "a"
        try:
            await client.send(ref, Go(gate=True))
            token = await eventually(lambda: _started(step_log, "c"))  # its first step runs
            Changing.variant = "b"  # the code changes while the turn is open
            release(step_log.parent, token)  # then it sleeps, and its re-run calls "first-b"
            view = await eventually(lambda: _turn_status(client, ref, "parked"), timeout=10)
        finally:
            Changing.variant = "a"
        assert "journal position 0 holds step 'first-a'" in view.turn.parked
        assert "now calls step 'first-b'" in view.turn.parked
        assert view.turn.journal == ["step first-a", "sleep"]
        await client.send(ref, Go())  # waits behind the parked turn
        await eventually(lambda: _deferred(client, ref, 1))
        await client.cancel(ref)
        await eventually(lambda: _gone(client, ref))
        assert worker.runners


async def test_a_handler_that_swallows_the_mismatch_is_parked_all_the_same(
    connect, start_worker, step_log
) -> None:
    await start_worker(app)
    async with connect(app=app) as client:
        ref = Stubborn.ref("s")
        Stubborn.variant = "a"
        try:
            await client.send(ref, Go(gate=True))
            token = await eventually(lambda: _started(step_log, "s"))
            Stubborn.variant = "b"
            release(step_log.parent, token)
            view = await eventually(lambda: _turn_status(client, ref, "parked"), timeout=10)
        finally:
            Stubborn.variant = "a"
        assert "now calls step 'first-b'" in view.turn.parked
        assert await client.state(ref) is None, "nothing it did after the mismatch was committed"


async def test_a_step_result_that_cannot_be_journaled_is_its_error_and_never_re_runs(
    connect, start_worker
) -> None:
    await start_worker(app)
    UNJOURNALABLE_CALLS.clear()
    async with connect(app=app) as client:
        ref = Odd.ref("o")
        await client.send(ref, Go())
        state = await eventually(lambda: _odd_done(client, ref), timeout=10)
        assert state.error == "TypeError"
    assert len(UNJOURNALABLE_CALLS) == 1


async def test_ask_between_actors_is_journaled(connect, start_worker) -> None:
    await start_worker(app)
    async with connect(app=app) as client:
        done = await client.ask(Caller.ref("k"), Go(), timeout=20)
        assert done.tokens == ["hi #1"], "the re-run after the sleep read the journaled reply"
        assert (await client.state(Callee.ref("k"))).asked == 1


async def test_waits_lists_every_open_turn(connect, start_worker) -> None:
    await start_worker(app)
    async with connect(app=app) as client:
        for n in range(3):
            await client.send(Approver.ref(f"w{n}"), Refund(request_id=f"q{n}", timeout=3600))
        await client.send(Sleeper.ref("zz"), Nap(seconds=3600))
        views = await eventually(lambda: _waits(client, 4))
        by_actor = {v.actor: v for v in views}
        assert by_actor["Approver/w0"].status == "waiting"
        assert by_actor["Approver/w0"].waiting_for == "Approval"
        assert by_actor["Sleeper/zz"].status == "sleeping"
        now = time.time()
        for view in views:
            assert view.due is not None and 3500 < view.due.timestamp() - now < 3700
            assert view.since is not None and abs(view.since.timestamp() - now) < 30


# ---- helpers -----------------------------------------------------------------------------
def _started(log: Path, key: str) -> str | None:
    """The token of the first step of ``key`` that started, once one has."""
    return next((words[3] for words in lines(log) if words[:3] == ["start", key, "0"]), None)


async def _turn_status(client: actors.Client, ref: actors.ActorRef, status: str):  # type: ignore[no-untyped-def]
    view = await client.inspect(ref)
    return view if view.turn is not None and view.turn.status == status else None


async def _deferred(client: actors.Client, ref: actors.ActorRef, n: int) -> bool:
    return (await client.inspect(ref)).deferred == n


async def _woke(client: actors.Client, ref: actors.ActorRef):  # type: ignore[no-untyped-def]
    state = await client.state(ref)
    return state if state is not None and state.woke_at_ms else None


async def _has_note(client: actors.Client, ref: actors.ActorRef, text: str) -> bool:
    state = await client.state(ref)
    return state is not None and text in state.after


async def _status(client: actors.Client, ref: actors.ActorRef, status: str):  # type: ignore[no-untyped-def]
    state = await client.state(ref)
    return state if state is not None and state.status == status else None


async def _notes(client: actors.Client, ref: actors.ActorRef, n: int):  # type: ignore[no-untyped-def]
    state = await client.state(ref)
    return state if state is not None and len(state.notes) >= n else None


async def _dead_letters(client: actors.Client, ref: actors.ActorRef) -> list:  # type: ignore[type-arg]
    shard = (await client.inspect(ref)).shard
    found = []
    for dl in await client.store.dead_letters(shard, 100):
        if ref.key.encode() in dl.envelope:
            found.append(dl)
    return found


async def _dead_letter_count(client: actors.Client, ref: actors.ActorRef, n: int) -> bool:
    return len(await _dead_letters(client, ref)) == n


async def _odd_done(client: actors.Client, ref: actors.ActorRef):  # type: ignore[no-untyped-def]
    state = await client.state(ref)
    return state if state is not None and state.error else None


async def _gone(client: actors.Client, ref: actors.ActorRef) -> bool:
    view = await client.inspect(ref)
    return view.turn is None and view.deferred == 0


async def _waits(client: actors.Client, n: int):  # type: ignore[no-untyped-def]
    views = await client.waits()
    return views if len(views) >= n else None


async def test_a_new_owner_wakes_every_actor_left_at_zero_not_just_one_batch(
    connect, start_worker, monkeypatch
) -> None:
    import actors.shard.timers

    monkeypatch.setattr(actors.shard.timers, "TIMER_BATCH", 20)
    worker = await start_worker(app)
    async with connect(app=app) as client:
        refs = [Sleeper.ref(f"z{n}") for n in range(200)]
        await client.send_many([(ref, Nap(seconds=3600)) for ref in refs])
        await eventually(lambda: _timers(client, lambda score: score > 0, 200), timeout=30)
        worker.stop()
        await eventually(lambda: not worker.runners, timeout=20)
        # As if the owner had died right after taking every timer (they sit at 0).
        for shard in range(client.shards):
            key = client.store.keys.timers(shard)
            members = await client.store.redis.zrange(key, 0, -1)
            if members:
                await client.store.redis.zadd(key, {m: 0 for m in members})
        await start_worker(app)
        # Every one is resumed, finds its sleep not yet due, and goes back to its due time.
        await eventually(lambda: _timers(client, lambda score: score > 0, 200), timeout=30)


async def _timers(client: actors.Client, check, n: int) -> bool:  # type: ignore[no-untyped-def]
    scores = []
    for shard in range(client.shards):
        rows = await client.store.redis.zrange(client.store.keys.timers(shard), 0, -1, withscores=True)
        scores += [score for _, score in rows]
    return len(scores) == n and all(check(s) for s in scores)

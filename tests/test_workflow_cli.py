"""``actors approve``, ``waits``, ``inspect`` and ``cancel``: the real command, run as a
subprocess against real workers (a worker process, or in-process where a test must change
an actor's code while its turn is open) and a real server."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

import actors
from actors.codec import decode_envelope

from .conftest import eventually
from .test_cli import actors_cli, failed, ok
from .workflow_apps import Approver, Changing, Go, Nap, Note, Refund, Sleeper, app, release

WORKFLOWS = "tests.workflow_apps:app"

Run = Callable[..., Awaitable[subprocess.CompletedProcess[str]]]


@pytest.fixture
def cli(redis_url: str, namespace: str) -> Run:
    """``actors SUBCOMMAND ... --redis URL --namespace NS``, on the test's server and namespace."""

    async def run(*args: str) -> subprocess.CompletedProcess[str]:
        return await actors_cli(*args, "--redis", redis_url, "--namespace", namespace)

    return run


# ---- approve ------------------------------------------------------------------------------------


async def test_approve_and_reject_from_the_cli_complete_the_waits(spawn_worker, cli, connect) -> None:
    spawn_worker(WORKFLOWS)
    async with connect(app=app) as client:
        ref = Approver.ref("x")
        await client.send(ref, Refund(request_id="r1"))
        await eventually(lambda: _turn_status(client, ref, "waiting"))

        approved = await cli(
            "approve", "Approver/x", "--request-id", "r1", "--approve", "--by", "alice", "--comment", "ok"
        )
        assert re.fullmatch(r"[0-9a-f]{32}\n", ok(approved)), approved.stdout
        state = await eventually(lambda: _status(client, ref, "approved"))
        assert state.by == "alice" and state.approvals_seen == 1
        await eventually(lambda: _turn_gone(client, ref))

        other = Approver.ref("y")
        await client.send(other, Refund(request_id="r2"))
        await eventually(lambda: _turn_status(client, other, "waiting"))
        ok(await cli("approve", "Approver/y", "--request-id", "r2", "--reject", "--by", "bob"))
        state = await eventually(lambda: _status(client, other, "rejected"))
        assert state.by == "bob" and state.approvals_seen == 1
        assert await _dead_letters(client, ref) == [] and await _dead_letters(client, other) == []


async def test_approve_sends_exactly_the_approval_given(cli, connect) -> None:
    """No worker: the message stays in the inbox, to be read back as sent."""
    result = await cli(
        "approve", "Approver/q", "--request-id", "r9", "--reject", "--by", "bob", "--comment", "too much"
    )
    message_id = ok(result).strip()
    async with connect() as client:
        [envelope] = await _inbox(client, "Approver/q")
    assert envelope.id == message_id
    assert (envelope.actor, envelope.key, envelope.type) == ("Approver", "q", "Approval")
    assert envelope.payload == {"request_id": "r9", "approved": False, "by": "bob", "comment": "too much"}


async def test_bad_approve_and_cancel_input_exits_nonzero_and_writes_nothing(cli, connect) -> None:
    neither = failed(await cli("approve", "Approver/x", "--request-id", "r1"))
    assert "one of the arguments --approve --reject is required" in neither
    both = failed(await cli("approve", "Approver/x", "--request-id", "r1", "--approve", "--reject"))
    assert "not allowed with argument" in both
    assert "--request-id" in failed(await cli("approve", "Approver/x", "--approve"))

    malformed = await cli("approve", "Approver", "--request-id", "r1", "--approve")
    assert malformed.returncode == 2 and malformed.stdout == ""
    assert "must look like 'Type/key', got 'Approver'" in failed(malformed)
    assert "Type/key" in failed(await cli("approve", "/x", "--request-id", "r1", "--approve"))
    assert "Type/key" in failed(await cli("cancel", "Approver"))
    assert "Type/key" in failed(await cli("inspect", "Approver/", "--app", WORKFLOWS))

    empty = await cli("approve", "Approver/x", "--request-id", "", "--approve")
    assert empty.returncode == 2 and "invalid message" in failed(empty) and "request_id" in empty.stderr
    assert "--limit" in failed(await cli("waits", "--limit", "0"))

    async with connect() as client:
        for shard in range(client.shards):
            assert (await client.store.shard_info(shard)).length == 0, "a refused command wrote nothing"


# ---- waits ---------------------------------------------------------------------------------------


async def test_waits_lists_every_open_turn(spawn_worker, cli, connect) -> None:
    spawn_worker(WORKFLOWS)
    async with connect(app=app) as client:
        assert json.loads(ok(await cli("waits", "--json"))) == []
        assert ok(await cli("waits")) == "no open turns\n"

        await client.send(Approver.ref("w0"), Refund(request_id="q0"))
        await client.send(Approver.ref("w1"), Refund(request_id="q1", timeout=3600))
        await client.send(Sleeper.ref("zz"), Nap(seconds=3600))
        await eventually(lambda: _suspended(client, 3))

    before = time.time()
    shown = {t["actor"]: t for t in json.loads(ok(await cli("waits", "--json")))}
    assert set(shown) == {"Approver/w0", "Approver/w1", "Sleeper/zz"}
    w0, w1, zz = shown["Approver/w0"], shown["Approver/w1"], shown["Sleeper/zz"]
    assert (w0["status"], w0["waiting_for"], w0["message_type"], w0["due"]) == (
        "waiting", "Approval", "Refund", None,
    )  # fmt: skip
    assert re.fullmatch(r"[0-9a-f]{32}", w0["message_id"]) and w0["parked"] == ""
    assert (w1["status"], w1["waiting_for"]) == ("waiting", "Approval")
    assert 3500 < _timestamp(w1["due"]) - before < 3700
    assert (zz["status"], zz["waiting_for"], zz["message_type"]) == ("sleeping", None, "Nap")
    assert 3500 < _timestamp(zz["due"]) - before < 3700
    for turn in shown.values():
        assert abs(_timestamp(turn["since"]) - before) < 60
        assert turn["journal"], "each turn journaled its wait or sleep"

    table = ok(await cli("waits")).splitlines()
    assert table[0].split() == ["actor", "status", "waiting", "for", "since", "due", "message", "parked"]
    rows = {line.split()[0]: line for line in table[1:]}
    assert set(rows) == set(shown)
    assert rows["Approver/w0"].split()[1:3] == ["waiting", "Approval"]
    assert "never" in rows["Approver/w0"] and "Refund" in rows["Approver/w0"]
    assert "never" not in rows["Approver/w1"] and "never" not in rows["Sleeper/zz"]
    assert rows["Sleeper/zz"].split()[1:3] == ["sleeping", "-"]

    limited = await cli("waits", "--json", "--limit", "1")
    assert len(json.loads(ok(limited))) == 1
    assert "--limit" in limited.stderr


# ---- inspect ---------------------------------------------------------------------------------------


async def test_inspect_shows_the_open_turn_then_the_committed_state(spawn_worker, cli, connect) -> None:
    spawn_worker(WORKFLOWS)
    async with connect(app=app) as client:
        ref = Approver.ref("x")
        await client.send(ref, Refund(request_id="r1"))
        await eventually(lambda: _turn_status(client, ref, "waiting"))
        await client.send(ref, Note(text="behind"))  # deferred behind the waiting turn
        await eventually(lambda: _deferred(client, ref, 1))

        view = json.loads(ok(await cli("inspect", "Approver/x", "--app", WORKFLOWS, "--json")))
        assert (view["actor"], view["shard"]) == ("Approver/x", (await client.inspect(ref)).shard)
        assert view["state"] is None, "the waiting turn has committed nothing yet"
        assert view["deferred"] == 1
        turn = view["turn"]
        assert (turn["status"], turn["waiting_for"]) == ("waiting", "Approval")
        assert turn["message_type"] == "Refund"
        assert turn["due"] is None and turn["since"] is not None and turn["parked"] == ""
        assert turn["journal"] == ["wait Approval"]

        text = ok(await cli("inspect", "Approver/x", "--app", WORKFLOWS))
        assert re.search(r"^turn +waiting$", text, re.M), text
        assert re.search(r"^ +waiting for +Approval$", text, re.M), text
        assert re.search(r"^ +due +never$", text, re.M), text
        assert re.search(r"^ +message +Refund [0-9a-f]{32}$", text, re.M), text
        assert re.search(r"^deferred +1 message$", text, re.M), text
        assert re.search(r"^ +journal +1 entry\n +0 +wait Approval$", text, re.M), text

        ok(await cli("approve", "Approver/x", "--request-id", "r1", "--approve", "--by", "alice"))
        await eventually(lambda: _notes(client, ref, 1))

    view = json.loads(ok(await cli("inspect", "Approver/x", "--app", WORKFLOWS, "--json")))
    assert view["turn"] is None and view["deferred"] == 0
    assert view["state"] == {
        "status": "approved", "by": "alice", "notes": ["behind@approved"], "approvals_seen": 1,
    }  # fmt: skip
    raw = json.loads(ok(await cli("inspect", "Approver/x", "--json")))
    assert raw["state"] == view["state"], "without --app: the raw snapshot"
    text = ok(await cli("inspect", "Approver/x"))
    assert re.search(r"^turn +none$", text, re.M) and '"approved"' in text, text

    never = json.loads(ok(await cli("inspect", "Approver/never", "--app", WORKFLOWS, "--json")))
    assert (never["state"], never["turn"], never["deferred"]) == (None, None, 0)


async def test_a_parked_turn_shows_its_reason_and_can_be_cancelled(
    start_worker, cli, connect, tmp_path, monkeypatch
) -> None:
    """In-process worker: the test "changes the code" of Changing while its turn is open."""
    monkeypatch.setenv("ACTORS_TEST_DIR", str(tmp_path))
    await start_worker(app)
    async with connect(app=app) as client:
        ref = Changing.ref("c")
        Changing.variant = "a"
        try:
            await client.send(ref, Go(gate=True))
            token = await eventually(lambda: _first_step_started(tmp_path / "steps.log", "c"))
            Changing.variant = "b"  # after the first step took its name, before the re-run
            release(tmp_path, token)
            await eventually(lambda: _turn_status(client, ref, "parked"), timeout=10)
        finally:
            Changing.variant = "a"
        reason = (await client.inspect(ref)).turn.parked
        assert len(reason) > 60, "long enough for the table to clip it"

        [turn] = json.loads(ok(await cli("waits", "--json")))
        assert (turn["actor"], turn["status"], turn["parked"]) == ("Changing/c", "parked", reason)
        [row] = ok(await cli("waits")).splitlines()[1:]
        assert "parked" in row and "journal position 0" in row and row.endswith("...")
        assert reason not in row

        text = ok(await cli("inspect", "Changing/c", "--app", WORKFLOWS))
        assert re.search(r"^turn +parked$", text, re.M), text
        assert reason in text, "inspect shows the reason in full"
        assert re.search(r"^ +0 +step first-a$", text, re.M) and re.search(r"^ +1 +sleep$", text, re.M), text

        ok(await cli("cancel", "Changing/c"))
        await eventually(lambda: _turn_gone(client, ref))
        assert [d.reason for d in await _dead_letters(client, ref)] == ["cancelled"]
    assert ok(await cli("waits")) == "no open turns\n"


# ---- cancel ----------------------------------------------------------------------------------------


async def test_cancel_ends_a_waiting_turn(spawn_worker, cli, connect) -> None:
    spawn_worker(WORKFLOWS)
    async with connect(app=app) as client:
        ref = Approver.ref("c")
        await client.send(ref, Refund(request_id="r5"))
        await eventually(lambda: _turn_status(client, ref, "waiting"))
        cancel_id = ok(await cli("cancel", "Approver/c")).strip()
        assert re.fullmatch(r"[0-9a-f]{32}", cancel_id), cancel_id
        await eventually(lambda: _turn_gone(client, ref))
        [dead] = await _dead_letters(client, ref)
        assert dead.reason == "cancelled" and cancel_id in dead.detail
        assert decode_envelope(dead.envelope).type == "Refund", "the cancelled turn's message"

        # An approval now finds no wait: it is dead-lettered, and the request stays undecided.
        ok(await cli("approve", "Approver/c", "--request-id", "r5", "--approve", "--by", "late"))
        await eventually(lambda: _dead_letter_count(client, ref, 2))
        assert await client.state(ref) is None, "the cancelled turn committed nothing"
        assert json.loads(ok(await cli("waits", "--json"))) == []


async def test_cancel_without_an_open_turn_does_nothing(spawn_worker, cli, connect) -> None:
    spawn_worker(WORKFLOWS)
    async with connect(app=app) as client:
        ref = Approver.ref("idle")
        ok(await cli("cancel", "Approver/idle"))
        await client.send(ref, Note(text="after"))  # same shard, after the cancel
        state = await eventually(lambda: _notes(client, ref, 1))
        assert state.notes == ["after@"]
        assert await _dead_letters(client, ref) == [], "the cancel was dropped, not dead-lettered"


# ---- helpers ---------------------------------------------------------------------------------------
async def _turn_status(client: actors.Client, ref: actors.ActorRef[Any], status: str) -> Any:
    view = await client.inspect(ref)
    return view if view.turn is not None and view.turn.status == status else None


async def _turn_gone(client: actors.Client, ref: actors.ActorRef[Any]) -> bool:
    return (await client.inspect(ref)).turn is None


async def _deferred(client: actors.Client, ref: actors.ActorRef[Any], n: int) -> bool:
    return (await client.inspect(ref)).deferred == n


async def _suspended(client: actors.Client, n: int) -> bool:
    return sum(v.status in ("waiting", "sleeping") for v in await client.waits()) == n


async def _status(client: actors.Client, ref: actors.ActorRef[Any], status: str) -> Any:
    state = await client.state(ref)
    return state if state is not None and state.status == status else None


async def _notes(client: actors.Client, ref: actors.ActorRef[Any], n: int) -> Any:
    state = await client.state(ref)
    return state if state is not None and len(state.notes) >= n else None


async def _dead_letters(client: actors.Client, ref: actors.ActorRef[Any]) -> list[Any]:
    shard = (await client.inspect(ref)).shard
    return [
        dl
        for dl in await client.store.dead_letters(shard, 100)
        if decode_envelope(dl.envelope).actor_id == ref.id
    ]


async def _dead_letter_count(client: actors.Client, ref: actors.ActorRef[Any], n: int) -> bool:
    return len(await _dead_letters(client, ref)) == n


async def _inbox(client: actors.Client, actor: str) -> list[Any]:
    found = []
    for shard in range(client.shards):
        for _, raw in await client.store.redis.xrange(client.store.keys.inbox(shard)):
            envelope = decode_envelope(raw[b"e"])
            if envelope.actor_id == actor:
                found.append(envelope)
    return found


def _timestamp(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _first_step_started(log: Path, key: str) -> str | None:
    """The token of the first step of ``key`` that started (workflow_apps' steps.log), if any."""
    lines = log.read_text().splitlines() if log.exists() else []
    return next((w[3] for w in map(str.split, lines) if w[:3] == ["start", key, "0"]), None)

"""Knowing that everything is processed without reading internal keys: ``actors status`` shows
the outboxes and deferred messages, ``Client.wait_idle`` and ``actors status --wait-idle``
wait until nothing is left to do (issue #15 item 11). Sleeping and waiting turns are not work
to do; the messages deferred behind them are."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import actors
from actors.codec import Envelope, encode_envelope, new_message_id
from actors.routing import shard_of

from .apps import Add, Counter, Get, Mirror, Tally, Total
from .conftest import eventually, raw_redis
from .test_cli import actors_cli, failed, ok
from .workflow_apps import Approver, Nap, Note, Refund, Sleeper

IDLE_APP = actors.App(Counter, Mirror, Tally, Sleeper, Approver)

Run = Callable[..., Awaitable[subprocess.CompletedProcess[str]]]


@pytest.fixture
def cli(redis_url: str, namespace: str) -> Run:
    async def run(*args: str) -> subprocess.CompletedProcess[str]:
        return await actors_cli(*args, "--redis", redis_url, "--namespace", namespace)

    return run


async def test_wait_idle_returns_once_every_message_is_handled_and_forwarded(
    start_worker: Callable[..., Any], connect: Callable[..., Any]
) -> None:
    await start_worker(IDLE_APP)
    async with connect(app=IDLE_APP) as client:
        await client.send(Sleeper.ref("zz"), Nap(seconds=3600))  # asleep for an hour: not work
        await client.send_many([(Mirror.ref(f"m-{n}"), Add(by=1)) for n in range(300)])
        work = await client.wait_idle(timeout=120)
        assert work.idle and work.describe().startswith("idle")
        # Nothing left to wait for: every forwarded add is counted now.
        tallies = [await client.state(Tally.ref(f"tally-{k}")) for k in range(7)]
        assert sum(t.total for t in tallies if t is not None) == 300
        assert work.total("suspended") == 1, "the sleeper, which an idle namespace may hold"
        assert (await client.work()).idle


async def test_messages_deferred_behind_a_waiting_turn_are_work_left(
    start_worker: Callable[..., Any], connect: Callable[..., Any], cli: Run
) -> None:
    await start_worker(IDLE_APP)
    async with connect(app=IDLE_APP) as client:
        ref = Approver.ref("a")
        await client.send(ref, Refund(request_id="r"))
        await eventually(lambda: _turn_status(client, ref, "waiting"))
        for n in range(3):
            await client.send(ref, Note(text=f"n{n}"))
        work = await eventually(lambda: _deferred(client, 3))
        assert not work.idle and "3 deferred" in work.describe()
        shard = shard_of("Approver/a", client.shards)

        shown = json.loads(ok(await cli("status", "--json")))
        assert shown["idle"] is False and shown["shards"][shard]["deferred"] == 3
        assert shown["shards"][shard]["suspended"] == 1
        text = ok(await cli("status"))
        assert "work: busy: 3 deferred (1 suspended" in text, text
        header = next(line.split() for line in text.splitlines() if line.split()[:2] == ["shard", "owner"])
        assert header[-6:] == ["pending", "outbox", "deferred", "due", "suspended", "dlq"]

        with pytest.raises(actors.IdleTimeout, match=r"not idle after 0\.5s") as late:
            await client.wait_idle(timeout=0.5)
        assert late.value.work.total("deferred") == 3

        await client.approve(ref, "r")
        await client.wait_idle(timeout=60)
        state = await client.state(ref)
        assert state.status == "approved" and state.notes == ["n0@approved", "n1@approved", "n2@approved"]


async def test_an_outbox_a_dead_worker_left_is_work_until_forwarded(
    start_worker: Callable[..., Any], connect: Callable[..., Any], redis_url: str, cli: Run
) -> None:
    async with connect(app=IDLE_APP, shards=4) as client:
        # A committed send to another shard, as a worker that died before forwarding leaves it.
        target = shard_of("Tally/t-x", client.shards)
        source = (target + 1) % client.shards
        env = Envelope(id=new_message_id(), actor="Tally", key="t-x", type="Add", payload={"by": 5})
        raw = raw_redis(redis_url)
        try:
            await raw.xadd(
                client.store.keys.outbox(source), {"s": str(target), "e": encode_envelope(env, 1 << 20)}
            )
        finally:
            await raw.aclose()
        work = await client.work()
        assert not work.idle and work.shards[source].outbox == 1 and "1 in outboxes" in work.describe()
        row = json.loads(ok(await cli("status", "--json")))["shards"][source]
        assert row["outbox"] == 1

        await start_worker(IDLE_APP)
        await client.wait_idle(timeout=60)
        assert await client.ask(Tally.ref("t-x"), Get(), timeout=10) == Total(total=5)


async def test_status_wait_idle_from_the_cli(
    start_worker: Callable[..., Any], connect: Callable[..., Any], cli: Run
) -> None:
    async with connect(app=IDLE_APP, shards=4) as client:
        await client.send(Counter.ref("w"), Add(by=2))
    late = await cli("status", "--wait-idle", "--timeout", "1")
    assert late.returncode == 1 and "work: busy: 1 unread" in late.stdout
    assert "error: not idle after 1s: busy: 1 unread" in failed(late)

    await start_worker(IDLE_APP)
    async with connect(app=IDLE_APP) as client:
        await client.send_many([(Counter.ref(f"w{n}"), Add(by=1)) for n in range(200)])
    done = ok(await cli("status", "--wait-idle", "--timeout", "120"))
    assert "work: idle" in done
    async with connect(app=IDLE_APP) as client:
        totals = [await client.state(Counter.ref(f"w{n}")) for n in range(200)]
        assert all(t is not None and t.total == 1 for t in totals), "handled before the command returned"


async def _turn_status(client: actors.Client, ref: Any, status: str) -> bool:
    view = await client.inspect(ref)
    return view.turn is not None and view.turn.status == status


async def _deferred(client: actors.Client, n: int) -> Any:
    work = await client.work()
    return work if work.total("deferred") == n else None

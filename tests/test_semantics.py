"""Message semantics at the edges: order across send and ask from one turn, and sends that
leave only with the turn's commit (or suspension)."""

from __future__ import annotations

import pytest

import actors
from actors.routing import shard_of

from .conftest import eventually
from .semantics_apps import Leaky, Mix, Note, Query, Recorder, Relay, Sender, app


def _key_in(shard: int, prefix: str, shards: int, actor: str = "Recorder") -> str:
    return next(f"{prefix}-{n}" for n in range(1000) if shard_of(f"{actor}/{prefix}-{n}", shards) == shard)


async def test_an_ask_does_not_overtake_the_sends_before_it(start_worker, connect) -> None:
    """send, send, ask, send to one actor in one turn: handled in that order, whether the
    actor is on the sender's shard or another."""
    await start_worker(app)
    async with connect(app=app) as client:
        sender = Sender.ref("s")
        home = shard_of(sender.id, client.shards)
        same = _key_in(home, "same", client.shards)
        other = _key_in((home + 1) % client.shards, "other", client.shards)
        for target in (same, other):
            await client.send(sender, Mix(target=target))
        expected = ["sent first", "sent second", "asked third", "sent fourth"]
        for target in (same, other):
            state = await eventually(lambda t=target: _logged(client, t, 4), timeout=20)
            assert state.log == expected, target


async def test_a_turn_that_fails_for_good_sends_nothing(start_worker, connect) -> None:
    """send, then a step (a journal write), then a failure for good: the turn is
    dead-lettered and its send is never delivered."""
    await start_worker(app)
    async with connect(app=app) as client:
        leaky = Leaky.ref("l")
        await client.send(leaky, Mix(target="victim"))
        shard = shard_of(leaky.id, client.shards)
        await eventually(lambda: client.store.dead_letters(shard, 10), timeout=20)
        await client.send(Recorder.ref("victim"), Note(text="after"))
        state = await eventually(lambda: _logged(client, "victim", 1), timeout=20)
        assert state.log == ["after"], "the failed turn's send was delivered"


async def _logged(client: actors.Client, key: str, n: int):  # type: ignore[no-untyped-def]
    state = await client.state(Recorder.ref(key))
    return state if state is not None and len(state.log) >= n else None


@pytest.mark.chaos
async def test_an_ask_sent_before_a_crash_is_not_sent_again(spawn_worker, connect, tmp_path) -> None:
    """The worker dies after the turn's journal write sent its ask and before the reply:
    the recovered turn waits for the reply to that request instead of asking again."""
    import signal

    from .semantics_apps import Asker, SlowTarget

    worker = spawn_worker("tests.semantics_apps:app")
    async with connect(app=app) as client:
        await client.send(Asker.ref("a"), Mix(target="t"))
        await eventually(lambda: list(tmp_path.glob(f"asked-{worker.pid}")), timeout=20)
        worker.signal(signal.SIGKILL)
        worker.proc.wait()  # type: ignore[union-attr]
        spawn_worker("tests.semantics_apps:app")
        (tmp_path / "open").touch()
        asker = await eventually(lambda: _answered(client, Asker.ref("a")), timeout=30)
        assert asker.log == ["answered 1"]
        target = await client.state(SlowTarget.ref("t"))
        assert target.log == ["q"], "the target handled one query"


async def _answered(client: actors.Client, ref: actors.ActorRef):  # type: ignore[no-untyped-def]
    state = await client.state(ref)
    return state if state is not None and state.log else None


async def test_a_target_shard_that_refuses_forwards_costs_only_its_messages(
    start_worker, connect, fast_settings, caplog
) -> None:
    """A send to an actor of a shard whose inbox refuses writes (here: the key holds a
    string, so XADD fails) waits in the outbox; the sending shard's other actors go on, its
    runner does not restart, and the messages go through once the target accepts writes."""
    settings = fast_settings.model_copy(update={"shards": 2})
    await start_worker(app, settings)
    async with connect(app=app, shards=2) as client:
        store = client.store
        sender = Relay.ref(_key_in(0, "s", 2, "Relay"))
        bystander = Recorder.ref(_key_in(0, "b", 2))
        target = _key_in(1, "t", 2)
        await store.redis.delete(store.keys.inbox(1))
        await store.redis.set(store.keys.inbox(1), "not a stream")  # refuses XADD (WRONGTYPE)
        await client.send(sender, Mix(target=target))
        await eventually(lambda: "forwarding" in caplog.text or "shard 0: runner failed" in caplog.text)
        reply = await client.ask(bystander, Query(text="still here"), timeout=10)
        assert reply.log == ["still here"], "the sending shard's other actors go on"
        assert "shard 0: runner failed" not in caplog.text, "the sending shard did not restart"
        assert await store.redis.xlen(store.keys.outbox(0)) >= 1, "the messages wait in the outbox"
        await store.redis.delete(store.keys.inbox(1))
        await eventually(lambda: _outbox_empty(store), timeout=40)


async def _outbox_empty(store) -> bool:  # type: ignore[no-untyped-def]
    return int(await store.redis.xlen(store.keys.outbox(0))) == 0

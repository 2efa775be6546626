"""Message semantics at the edges: order across send and ask from one turn, and sends that
leave only with the turn's commit (or suspension)."""

from __future__ import annotations

import pytest

import actors
from actors.routing import shard_of

from .conftest import eventually
from .semantics_apps import Leaky, Mix, Note, Recorder, Sender, app


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

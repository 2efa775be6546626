"""How long replies are kept: a keyed ask's reply as long as its idempotency marker (an
un-keyed one for ``reply_ttl``), and a replayed dead letter asks again instead of finding
its first run's ask deduplicated."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

import actors
from actors import MessageSettings, WorkerSettings
from actors.codec import actor_id
from actors.routing import shard_of

from .conftest import eventually


class Bump(BaseModel):
    pass


class Count(BaseModel):
    n: int


class Go(BaseModel):
    pass


class Counted(actors.Actor):
    """Counts the asks it handles."""

    class State(BaseModel):
        n: int = 0

    async def on_bump(self, msg: Bump) -> Count:
        self.state.n += 1
        return Count(n=self.state.n)


class Asker(actors.Actor):
    """Asks a Counted actor, then fails while ``failing`` is set (after the ask's reply was
    journaled: every attempt replays it), so its message is dead-lettered."""

    class State(BaseModel):
        answers: list[int] = []

    failing = True

    async def on_go(self, msg: Go) -> None:
        answer = await self.ask(Counted.ref(self.key), Bump())
        if type(self).failing:
            raise RuntimeError("fails after its ask")
        self.state.answers.append(answer.n)


app = actors.App(Counted, Asker)


def _locate(client: Any, ref: actors.ActorRef[Any]) -> tuple[int, str]:
    aid = actor_id(ref.type, ref.key)
    return shard_of(aid, client.shards), aid


async def _reply_keys(client: Any) -> set[str]:
    pattern = f"{client.store.keys.namespace}:*:reply:*"
    return {k.decode() async for k in client.store.redis.scan_iter(match=pattern)}


async def test_a_keyed_ask_gets_its_reply_after_reply_ttl(start_worker, connect, fast_settings) -> None:
    messages = MessageSettings(reply_ttl=0.5, idempotency_ttl=120)
    settings: WorkerSettings = fast_settings.model_copy(update={"messages": messages})
    await start_worker(app, settings)
    async with connect(app=app, messages=messages) as client:
        redis, keys = client.store.redis, client.store.keys
        keyed = Counted.ref("keyed")
        assert await client.ask(keyed, Bump(), idempotency_key="order-1", timeout=10) == Count(n=1)
        shard, aid = _locate(client, keyed)
        marker = keys.idempotency(shard, aid, "order-1")
        keyed_reply = keys.reply(shard, (await redis.get(marker)).decode().partition(":")[2])

        assert await client.ask(Counted.ref("plain"), Bump(), timeout=10) == Count(n=1)
        [plain_reply] = await _reply_keys(client) - {keyed_reply}
        assert 0 < await redis.pttl(plain_reply) <= 500, "an un-keyed ask's reply is kept for reply_ttl"

        # Past reply_ttl by Redis's clock: the un-keyed reply, stored after the keyed one, expired.
        async def plain_expired() -> bool:
            return not await redis.exists(plain_reply)

        await eventually(plain_expired, timeout=10)
        assert await client.ask(keyed, Bump(), idempotency_key="order-1", timeout=3) == Count(n=1)
        assert await client.state(keyed) == Counted.State(n=1), "the retry was not handled again"
        # The keyed reply outlives its marker (which deduplicates the retries that read it).
        assert await redis.pttl(keyed_reply) > await redis.pttl(marker) > 0


async def test_a_replayed_dead_letter_asks_again(start_worker, connect, monkeypatch) -> None:
    monkeypatch.setattr(Asker, "failing", True)
    await start_worker(app)
    async with connect(app=app) as client:
        ref = Asker.ref("r")
        await client.send(ref, Go())
        shard, _ = _locate(client, ref)
        # Replayed once while it still fails, then once it succeeds: each run asks afresh.
        for asked in (1, 2):
            [dead] = await eventually(lambda: client.store.dead_letters(shard, 10), timeout=10)
            assert dead.reason.startswith("handler Asker.on_go failed 3 times")
            assert await client.state(Counted.ref("r")) == Counted.State(n=asked), "retries replay the ask"
            if asked == 2:
                monkeypatch.setattr(Asker, "failing", False)
            assert await client.store.replay_dead_letter(shard, dead.id) is not None

        async def answered() -> Any:
            return await client.state(ref)

        assert await eventually(answered, timeout=10) == Asker.State(answers=[3]), "asked anew"
        assert await client.state(Counted.ref("r")) == Counted.State(n=3)
        assert await client.store.dead_letters(shard, 10) == []

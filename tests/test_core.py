"""The runtime core against a real server: send, ask, state, idempotency, order, forwarding."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

import actors
from actors import ConfigurationError, WorkerSettings
from actors.codec import Envelope, actor_id, encode_envelope, message_digest
from actors.routing import shard_of

from .apps import Add, Back, Counter, Front, Get, Lookup, Mirror, Tally, Total, app
from .conftest import eventually


async def test_send_ask_and_state(start_worker, connect) -> None:
    await start_worker(app)
    async with connect(app=app) as client:
        for _ in range(5):
            await client.send(Counter.ref("a"), Add(by=2))
        reply = await client.ask(Counter.ref("a"), Get())
        assert reply == Total(total=10)
        state = await client.state(Counter.ref("a"))
        assert isinstance(state, Counter.State) and state.total == 10
        assert await client.state(Counter.ref("never")) is None


async def test_client_without_app_uses_the_refs_class(start_worker, connect) -> None:
    await start_worker(app)
    async with connect() as client:
        await client.send(Counter.ref("b"), Add(by=3))
        assert await client.ask(Counter.ref("b"), Get()) == Total(total=3)


async def test_same_idempotency_key_sent_three_times_counts_once(start_worker, connect) -> None:
    await start_worker(app)
    async with connect(app=app) as client:
        ids = [
            await client.send(Counter.ref("idem"), Add(by=1), idempotency_key="order-42") for _ in range(3)
        ]
        assert len(set(ids)) == 1, "duplicates return the first message id"
        await client.send(Counter.ref("idem"), Add(by=1), idempotency_key="order-43")
        assert await client.ask(Counter.ref("idem"), Get()) == Total(total=2)


async def test_ask_with_repeated_idempotency_key_gets_the_first_reply(start_worker, connect) -> None:
    await start_worker(app)
    async with connect(app=app) as client:
        first = await client.ask(Counter.ref("q"), Get(), idempotency_key="k")
        await client.send(Counter.ref("q"), Add(by=5))
        again = await client.ask(Counter.ref("q"), Get(), idempotency_key="k", timeout=5)
        assert first == again == Total(total=0)


def same_shard(pairs: list[tuple[str, str]], shards: int) -> tuple[str, str]:
    """The first pair of Counter keys whose actors share a shard."""
    for a, b in pairs:
        if shard_of(actor_id("Counter", a), shards) == shard_of(actor_id("Counter", b), shards):
            return a, b
    raise AssertionError("no pair of keys on one shard")


async def test_one_idempotency_key_for_two_actors_of_one_shard_reaches_both(start_worker, connect) -> None:
    """Keys are scoped by target actor, not by shard: both messages are delivered."""
    await start_worker(app)
    async with connect(app=app) as client:
        a, b = same_shard([(f"twin-{i}", f"twin-{i + 1}") for i in range(50)], client.shards)
        first = await client.send(Counter.ref(a), Add(by=1), idempotency_key="order-1")
        second = await client.send(Counter.ref(b), Add(by=2), idempotency_key="order-1")
        assert first != second
        assert await client.ask(Counter.ref(a), Get(), idempotency_key="read-1") == Total(total=1)
        assert await client.ask(Counter.ref(b), Get(), idempotency_key="read-1") == Total(total=2)
        # Still deduplicated per actor: a retry to each returns its own first id.
        assert await client.send(Counter.ref(a), Add(by=1), idempotency_key="order-1") == first
        assert await client.send(Counter.ref(b), Add(by=2), idempotency_key="order-1") == second
        assert await client.ask(Counter.ref(b), Get()) == Total(total=2)


async def test_actor_key_and_idempotency_key_do_not_run_together(start_worker, connect) -> None:
    """Counter/<k>:q with key "z" and Counter/<k> with key "q:z" are two scopes, though
    joining actor id and key with ':' would spell the same text for both."""
    await start_worker(app)
    async with connect(app=app) as client:
        a, b = same_shard([(f"p{i}:q", f"p{i}") for i in range(50)], client.shards)
        first = await client.send(Counter.ref(a), Add(by=1), idempotency_key="z")
        second = await client.send(Counter.ref(b), Add(by=1), idempotency_key="q:z")
        assert first != second
        assert await client.ask(Counter.ref(b), Get()) == Total(total=1)


async def test_reused_idempotency_key_with_a_different_message_is_refused(start_worker, connect) -> None:
    await start_worker(app)
    async with connect(app=app) as client:
        ref = Counter.ref("pay")
        first = await client.send(ref, Add(by=1), idempotency_key="charge-1")
        attempts = (
            lambda: client.send(ref, Add(by=2), idempotency_key="charge-1"),  # another payload
            lambda: client.send(ref, Get(), idempotency_key="charge-1"),  # another type
            lambda: client.ask(ref, Add(by=2), idempotency_key="charge-1", timeout=5),
        )
        for attempt in attempts:
            with pytest.raises(actors.IdempotencyConflict, match="charge-1") as refused:
                await attempt()
            assert refused.value.key == "charge-1"
            assert refused.value.actor == "Counter/pay"
            assert refused.value.message_id == first
        # The same message again is a retry, not a conflict.
        assert await client.send(ref, Add(by=1), idempotency_key="charge-1") == first
        assert await client.ask(ref, Get()) == Total(total=1)


async def test_reused_ask_key_with_a_different_message_is_refused(start_worker, connect) -> None:
    await start_worker(app)
    async with connect(app=app) as client:
        ref = Counter.ref("asked")
        assert await client.ask(ref, Get(), idempotency_key="read-1") == Total(total=0)
        with pytest.raises(actors.IdempotencyConflict):
            await client.ask(ref, Add(by=3), idempotency_key="read-1", timeout=5)
        with pytest.raises(actors.IdempotencyConflict):
            await client.send(ref, Add(by=3), idempotency_key="read-1")
        assert await client.ask(ref, Get(), idempotency_key="read-1", timeout=5) == Total(total=0)
        assert await client.ask(ref, Get()) == Total(total=0), "neither refused message was stored"


def test_message_digest_covers_type_and_payload_only() -> None:
    """A retry has a new id, new trace headers and maybe another reply channel; a payload
    dict may be filled in another order. None of that makes it another message."""
    first = Envelope("id-1", "Counter", "k", "Add", {"by": 1, "tags": {"a": 1, "b": 2}})
    retry = Envelope("id-2", "Counter", "k", "Add", {"tags": {"b": 2, "a": 1}, "by": 1}, {"t": "x"}, "ch")
    assert message_digest(first) == message_digest(retry)
    assert message_digest(first) != message_digest(replace(first, type="Sub"))
    assert message_digest(first) != message_digest(replace(first, payload={"by": 2, "tags": {}}))


async def test_a_key_without_digest_keeps_the_first_message(start_worker, connect) -> None:
    """The runtime's own keys (a turn's ask ids, queued item ids) pass no digest: a re-run
    turn may build its ask anew (a fresh uuid in it), and the first message still wins."""
    await start_worker(app)
    async with connect(app=app) as client:
        ref = Counter.ref("rerun")
        aid, shard = actor_id(ref.type, ref.key), shard_of(actor_id(ref.type, ref.key), client.shards)

        async def append(message_id: str, by: int) -> tuple[bool, str]:
            data = encode_envelope(Envelope(message_id, ref.type, ref.key, "Add", {"by": by}), 1000)
            return await client.store.append_once(shard, aid, "m.ask0", message_id, data, 60_000, digest="")

        assert (await append("m.ask1", 1))[0]
        assert await append("m.ask2", 2) == (False, "m.ask1")
        assert await client.ask(ref, Get()) == Total(total=1)


async def test_per_sender_order_holds_with_concurrent_senders(start_worker, connect) -> None:
    await start_worker(app)
    senders, per_sender, keys = 4, 150, 5

    async def sender(client: actors.Client, name: str) -> None:
        for seq in range(per_sender):
            await client.send(Counter.ref(f"o-{seq % keys}"), Add(sender=name, seq=seq))

    async with connect(app=app) as client:
        await asyncio.gather(*(sender(client, f"s{n}") for n in range(senders)))
        await client.send_many(
            (Counter.ref(f"o-{seq % keys}"), Add(sender="batch", seq=seq)) for seq in range(per_sender)
        )
        for k in range(keys):
            await client.ask(Counter.ref(f"o-{k}"), Get())
            state = await client.state(Counter.ref(f"o-{k}"))
            assert set(state.seqs) == {"batch", *(f"s{n}" for n in range(senders))}
            for seqs in state.seqs.values():
                assert seqs == sorted(seqs) and len(seqs) == per_sender // keys


async def test_ask_across_two_actors(start_worker, connect) -> None:
    await start_worker(app)
    async with connect(app=app) as client:
        reply = await client.ask(Front.ref("f1"), Lookup(name="x"))
        assert reply.value == "front saw back:x"


async def test_sends_between_actors_commit_with_the_turn(start_worker, connect) -> None:
    """Mirror forwards every add to one of 7 Tally actors, most in other shards (outbox path)."""
    await start_worker(app)
    async with connect(app=app) as client:
        await client.send_many((Mirror.ref(f"m-{i}"), Add(by=1)) for i in range(70))

        async def tallied() -> bool:
            totals = [await client.state(Tally.ref(f"tally-{t}")) for t in range(7)]
            return all(s is not None and s.total == 10 for s in totals)

        await eventually(tallied)
        await asyncio.sleep(0.3)
        assert [(await client.state(Tally.ref(f"tally-{t}"))).total for t in range(7)] == [10] * 7


async def test_worker_refuses_a_different_shard_count(start_worker, connect) -> None:
    await start_worker(app)  # records 4 shards
    with pytest.raises(ConfigurationError, match="records 4 shards"):
        await start_worker(app, WorkerSettings(shards=8))


async def test_idle_actors_are_deactivated(start_worker, connect, fast_settings) -> None:
    settings = fast_settings.model_copy(update={"idle_timeout": 0.2, "trim_interval": 0.2})
    worker = await start_worker(app, settings)
    async with connect(app=app) as client:
        for i in range(50):
            await client.send(Counter.ref(f"idle-{i}"), Add())
        await client.ask(Counter.ref("idle-0"), Get())

        def activations() -> int:
            return sum(len(runner.activations) for runner in worker.runners)

        assert activations() > 0
        await eventually(lambda: activations() == 0, timeout=10)
        assert (await client.ask(Counter.ref("idle-3"), Get())).total == 1, "state comes back from Redis"


async def test_ask_between_actors_is_routed_by_class(start_worker, connect) -> None:
    await start_worker(app)
    async with connect(app=app) as client:
        assert (await client.ask(Back.ref("z"), Lookup(name="z"))).value == "back:z"

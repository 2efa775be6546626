"""Bad input, at the edge and inside the worker: refused or dead-lettered with a reason,
and never a crashed worker or a stalled shard. After each bad message the next good
one to the same actor (so the same shard) must still be handled."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest
from pydantic import BaseModel, Field, ValidationError, field_validator

import actors
from actors import (
    ActorRef,
    HandlerError,
    MessageSettings,
    MessageTooLarge,
    RedisSettings,
    UnknownMessageType,
    Worker,
    WorkerSettings,
)
from actors.codec import Envelope, decode_envelope, encode_envelope, new_message_id
from actors.routing import shard_of
from actors.store import DeadLetter, Store

from .apps import Add, Boom, Counter, Flaky, Get, Lookup, Total, app
from .conftest import eventually

# ---- an app of our own, for messages tests.apps has no use for -------------------------


class Deposit(BaseModel):
    amount: int = Field(gt=0)
    note: str = ""


class Balance(BaseModel):
    balance: int


class Account(actors.Actor):
    class State(BaseModel):
        balance: int = 0

    async def on_deposit(self, msg: Deposit) -> Balance:
        self.state.balance += msg.amount
        return Balance(balance=self.state.balance)

    async def on_get(self, msg: Get) -> Balance:
        return Balance(balance=self.state.balance)


class Rename(BaseModel):
    name: str

    @field_validator("name", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        # A validator with a bug: on a non-string it raises AttributeError, which pydantic
        # does not turn into a ValidationError. Such a payload is still bad input.
        return value.lower()


class Name(BaseModel):
    name: str


class Named(actors.Actor):
    class State(BaseModel):
        name: str = ""

    async def on_rename(self, msg: Rename) -> None:
        self.state.name = msg.name

    async def on_get(self, msg: Get) -> Name:
        return Name(name=self.state.name)


own_app = actors.App(Account, Named)


# ---- helpers --------------------------------------------------------------------------------


def raw_envelope(actor: str, key: str, mtype: str, payload: Any, reply_to: str | None = None) -> bytes:
    """An encoded envelope that skips every client-side check."""
    env = Envelope(new_message_id(), actor, key, mtype, payload, reply_to=reply_to)
    return encode_envelope(env, 1 << 20)


async def dead_letters_of(client: actors.Client, shard: int, count: int) -> list[DeadLetter]:
    """Wait until the shard's dead-letter stream holds ``count`` entries; return them."""

    async def enough() -> list[DeadLetter] | None:
        found = await client.store.dead_letters(shard, 100)
        return found if len(found) >= count else None

    found = await eventually(enough, timeout=10)
    assert len(found) == count, found
    return found


async def nothing_pending(client: actors.Client, shard: int) -> None:
    async def check() -> bool:
        info = await client.store.shard_info(shard)
        return info.pending == 0 and info.lag == 0

    await eventually(check, timeout=10)


async def counter_still_counts(client: actors.Client, key: str, expected: int) -> None:
    """The next good message to Counter/key is handled: the worker and the shard are alive."""
    await client.send(Counter.ref(key), Add(by=1))
    assert await client.ask(Counter.ref(key), Get(), timeout=10) == Total(total=expected)


@contextlib.asynccontextmanager
async def bounded_worker(
    app: actors.App, redis_url: str, namespace: str, settings: WorkerSettings, stop_within: float = 10.0
) -> AsyncIterator[Worker]:
    """Like the start_worker fixture, but its stop is bounded: a worker that does not stop
    within ``stop_within`` seconds fails the test instead of hanging the session. Its
    leftover tasks are then cancelled again and again until they end (a single cancel can
    be lost, see the report on redis-py's wait_for under Python 3.11)."""
    before = asyncio.all_tasks()
    worker = Worker(app, RedisSettings(url=redis_url, namespace=namespace), settings, shutdown_grace=1.0)
    task = asyncio.create_task(worker.run())
    ready = asyncio.create_task(worker.ready.wait())
    await asyncio.wait({ready, task}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        task.result()

    async def stopped() -> bool:
        worker.stop()
        done, _ = await asyncio.wait({task}, timeout=stop_within)
        if done:
            return True
        for _ in range(40):
            leftover = [
                t for t in asyncio.all_tasks() - before if t is not asyncio.current_task() and not t.done()
            ]
            if not leftover:
                break
            for t in leftover:
                t.cancel()
            await asyncio.wait(leftover, timeout=0.25)
        return False

    problem = f"the worker did not stop within {stop_within}s of worker.stop()"
    try:
        yield worker
    except BaseException as exc:
        if not await stopped():
            exc.add_note(f"and then {problem}")
        raise
    if not await stopped():
        raise AssertionError(problem)


# ---- 1. refused at send -----------------------------------------------------------------------


async def test_constructed_invalid_payload_is_refused_at_send(start_worker, connect) -> None:
    await start_worker(app)
    async with connect(app=app) as client:
        shard = shard_of("Counter/v", client.shards)
        with pytest.raises(ValidationError, match="by"):
            await client.send(Counter.ref("v"), Add.model_construct(by="x"))
        mutated = Add()
        mutated.by = "x"  # type: ignore[assignment]  # no validate_assignment: only the client's check
        with pytest.raises(ValidationError, match="by"):
            await client.ask(Counter.ref("v"), mutated, timeout=5)
        assert (await client.store.shard_info(shard)).length == 0, "nothing reached Redis"
        await counter_still_counts(client, "v", 1)


async def test_constructed_payload_breaking_a_constraint_is_refused_at_send(start_worker, connect) -> None:
    await start_worker(own_app)
    async with connect(app=own_app) as client:
        shard = shard_of("Account/a", client.shards)
        with pytest.raises(ValidationError, match="greater than 0"):
            await client.send(Account.ref("a"), Deposit.model_construct(amount=-5, note=""))
        # Without an app the ref's class is used for the same check.
        async with connect() as bare:
            with pytest.raises(ValidationError, match="greater than 0"):
                await bare.send(Account.ref("a"), Deposit.model_construct(amount=0, note=""))
        assert (await client.store.shard_info(shard)).length == 0
        assert await client.ask(Account.ref("a"), Deposit(amount=7), timeout=10) == Balance(balance=7)


async def test_unknown_message_type_is_refused_at_send(start_worker, connect) -> None:
    await start_worker(app)
    async with connect(app=app) as client:
        shard = shard_of("Counter/u", client.shards)
        with pytest.raises(UnknownMessageType, match="Lookup"):
            await client.send(Counter.ref("u"), Lookup(name="x"))
        with pytest.raises(UnknownMessageType, match="Lookup"):
            await client.send(ActorRef("Counter", "u"), Lookup(name="x"))  # class found through the app
        with pytest.raises(UnknownMessageType, match="Lookup"):
            await client.ask(Counter.ref("u"), Lookup(name="x"), timeout=5)
        with pytest.raises(UnknownMessageType):
            await client.send_many([(Counter.ref("u"), Add()), (Counter.ref("u"), Lookup(name="x"))])
        assert (await client.store.shard_info(shard)).length == 0, "send_many wrote none of its batch"
        await counter_still_counts(client, "u", 1)


async def test_message_over_the_size_limit_is_refused_at_send(start_worker, connect) -> None:
    await start_worker(app)
    async with connect(app=app, messages=MessageSettings(max_message_bytes=200)) as client:
        shard = shard_of("Counter/big", client.shards)
        with pytest.raises(MessageTooLarge, match="max_message_bytes"):
            await client.send(Counter.ref("big"), Add(sender="x" * 500))
        with pytest.raises(MessageTooLarge):
            await client.ask(Counter.ref("big"), Add(sender="x" * 500), timeout=5)
        with pytest.raises(MessageTooLarge):
            await client.send(Counter.ref("big"), Add(sender="x" * 500), idempotency_key="big-1")
        assert (await client.store.shard_info(shard)).length == 0
        # The idempotency key of the refused send was not used up.
        await client.send(Counter.ref("big"), Add(by=1), idempotency_key="big-1")
        assert await client.ask(Counter.ref("big"), Get(), timeout=10) == Total(total=1)


@pytest.mark.parametrize("key", [5, b"k-1", "", "k" * 257], ids=["int", "bytes", "empty", "257-chars"])
async def test_bad_idempotency_key_is_refused_at_the_call(start_worker, connect, key: Any) -> None:
    await start_worker(app)
    async with connect(app=app) as client:
        shard = shard_of("Counter/keyed", client.shards)
        attempts = (
            lambda: client.send(Counter.ref("keyed"), Add(by=1), idempotency_key=key),
            lambda: client.ask(Counter.ref("keyed"), Get(), idempotency_key=key, timeout=5),
        )
        for attempt in attempts:
            with pytest.raises(actors.InvalidIdempotencyKey, match="idempotency key") as refused:
                await attempt()
            assert isinstance(refused.value, ValueError)
        assert (await client.store.shard_info(shard)).length == 0, "nothing was written"
        await counter_still_counts(client, "keyed", 1)


async def test_idempotency_keys_are_text_up_to_256_characters(start_worker, connect) -> None:
    await start_worker(app)
    async with connect(app=app) as client:
        with pytest.raises(actors.InvalidIdempotencyKey):
            await client.send(Counter.ref("text"), Add(by=1), idempotency_key=5)  # type: ignore[arg-type]
        # "5" was not taken by the refused int 5: it is a key of its own.
        five = await client.send(Counter.ref("text"), Add(by=1), idempotency_key="5")
        assert await client.send(Counter.ref("text"), Add(by=1), idempotency_key="5") == five
        longest = "k" * 256
        first = await client.send(Counter.ref("text"), Add(by=1), idempotency_key=longest)
        assert await client.send(Counter.ref("text"), Add(by=1), idempotency_key=longest) == first
        assert await client.ask(Counter.ref("text"), Get(), timeout=10) == Total(total=2)


# ---- 2. reaching a worker ------------------------------------------------------------------------

WORKER_LIMIT = 400
"""max_message_bytes of the worker in these tests; every good message is far below it."""

KEY = "target"

BAD_ENTRIES: dict[str, tuple[str, bytes, str]] = {
    # case id: (expected reason, raw entry, a piece of the expected detail)
    "not-msgpack": ("undecodable", b"\xc1\xc1 this is not msgpack", "not valid msgpack"),
    "msgpack-not-envelope": ("undecodable", msgpack.packb({"a": 1}), "not a version-1 envelope"),
    "wrong-version": (
        "undecodable",
        msgpack.packb([2, "id", "Counter", KEY, "Add", {"by": 1}, {}, None]),
        "not a version-1 envelope",
    ),
    "unknown-actor-type": ("unknown actor type", raw_envelope("Nope", KEY, "Add", {"by": 1}), "'Nope'"),
    "unknown-message-type": (
        "unknown message type",
        raw_envelope("Counter", KEY, "Lookup", {"name": "x"}),
        "'Lookup'",
    ),
    "invalid-payload": ("invalid payload", raw_envelope("Counter", KEY, "Add", {"by": "x"}), "by"),
    "payload-not-a-map": ("invalid payload", raw_envelope("Counter", KEY, "Add", "x"), "dictionary"),
    "too-large": (
        "too large",
        raw_envelope("Counter", KEY, "Add", {"by": 1, "sender": "x" * (2 * WORKER_LIMIT)}),
        "max_message_bytes",
    ),
}


@pytest.fixture
def small_limit(fast_settings: WorkerSettings) -> WorkerSettings:
    return fast_settings.model_copy(update={"messages": MessageSettings(max_message_bytes=WORKER_LIMIT)})


@pytest.mark.parametrize("case", list(BAD_ENTRIES))
async def test_bad_entry_is_dead_lettered_and_the_shard_goes_on(
    case, start_worker, connect, small_limit
) -> None:
    reason, raw, detail = BAD_ENTRIES[case]
    await start_worker(app, small_limit)
    async with connect(app=app) as client:
        shard = shard_of(f"Counter/{KEY}", client.shards)
        await counter_still_counts(client, KEY, 1)  # the actor is active before the bad entry
        entry_id = await client.store.append(shard, raw)
        [dl] = await dead_letters_of(client, shard, 1)
        assert dl.reason == reason
        assert detail in dl.detail
        assert dl.entry_id == entry_id
        assert dl.envelope == raw, "the dead letter keeps the entry as it was"
        await counter_still_counts(client, KEY, 2)
        await nothing_pending(client, shard)
        assert len(await client.store.dead_letters(shard, 100)) == 1
        assert (await client.state(Counter.ref(KEY))).total == 2, "the bad entry changed nothing"


async def test_entry_without_the_envelope_field_is_dead_lettered(start_worker, connect) -> None:
    await start_worker(app)
    async with connect(app=app) as client:
        shard = shard_of(f"Counter/{KEY}", client.shards)
        entry_id = (await client.store.redis.xadd(client.store.keys.inbox(shard), {b"x": b"y"})).decode()
        [dl] = await dead_letters_of(client, shard, 1)
        assert (dl.reason, dl.entry_id) == ("undecodable", entry_id)
        await counter_still_counts(client, KEY, 1)
        await nothing_pending(client, shard)


async def test_every_kind_of_bad_entry_in_a_row(start_worker, connect, small_limit) -> None:
    """All of them back to back, interleaved with good messages, in one shard."""
    await start_worker(app, small_limit)
    async with connect(app=app) as client:
        shard = shard_of(f"Counter/{KEY}", client.shards)
        for _, raw, _ in BAD_ENTRIES.values():
            await client.store.append(shard, raw)
            await client.send(Counter.ref(KEY), Add(by=1))
        assert await client.ask(Counter.ref(KEY), Get(), timeout=10) == Total(total=len(BAD_ENTRIES))
        found = await dead_letters_of(client, shard, len(BAD_ENTRIES))
        assert [dl.reason for dl in found] == [reason for reason, _, _ in BAD_ENTRIES.values()]
        await nothing_pending(client, shard)


async def test_asker_of_a_refused_message_gets_the_reason(start_worker, connect) -> None:
    """A client without an app cannot check a message; the worker refuses it and answers the ask."""

    class Add(BaseModel):  # same name as the real message, another schema
        by: str

    await start_worker(app)
    async with connect() as client:
        with pytest.raises(HandlerError) as refused:
            await client.ask(ActorRef("Counter", KEY), Add(by="many"), timeout=10)
        assert refused.value.reason == "invalid payload"
        assert "by" in refused.value.detail
        with pytest.raises(HandlerError) as unknown:
            await client.ask(ActorRef("Nope", KEY), Get(), timeout=10)
        assert unknown.value.reason == "unknown actor type"
        assert await client.ask(Counter.ref(KEY), Get(), timeout=10) == Total(total=0)
        for ref in (Counter.ref(KEY), ActorRef("Nope", KEY)):
            await nothing_pending(client, shard_of(ref.id, client.shards))


async def test_payload_whose_validator_raises_is_dead_lettered(
    redis_url, namespace, fast_settings, connect
) -> None:
    """A payload that makes a message validator raise something other than ValidationError
    (here AttributeError) is still bad input: it must be dead-lettered, not crash the shard
    runner over and over on the same pending entry."""
    async with bounded_worker(own_app, redis_url, namespace, fast_settings):
        async with connect(app=own_app) as client:
            shard = shard_of("Named/n", client.shards)
            entry_id = await client.store.append(shard, raw_envelope("Named", "n", "Rename", {"name": 3}))
            [dl] = await dead_letters_of(client, shard, 1)
            assert (dl.reason, dl.entry_id) == ("invalid payload", entry_id)
            assert "lower" in dl.detail
            await client.send(Named.ref("n"), Rename(name="Bob"))
            assert await client.ask(Named.ref("n"), Get(), timeout=5) == Name(name="bob")
            await nothing_pending(client, shard)


# ---- 3. handlers that raise -------------------------------------------------------------------------


async def test_handler_that_keeps_failing_is_retried_then_dead_lettered(
    start_worker, connect, fast_settings, monkeypatch
) -> None:
    monkeypatch.setattr(Flaky, "attempts", 0)
    await start_worker(app)
    async with connect(app=app) as client:
        ref = Flaky.ref("always")
        shard = shard_of(ref.id, client.shards)
        with pytest.raises(HandlerError) as failed:
            await client.ask(ref, Boom(times=1000), timeout=10)
        assert Flaky.attempts == fast_settings.retry.max_attempts == 3
        assert "Flaky.on_boom" in failed.value.reason
        assert "RuntimeError: boom" in failed.value.detail

        [dl] = await dead_letters_of(client, shard, 1)
        assert "Flaky.on_boom" in dl.reason and "3 times" in dl.reason
        assert "Traceback" in dl.detail and "RuntimeError: boom #3" in dl.detail
        env = decode_envelope(dl.envelope)
        assert (env.actor_id, env.type, env.payload) == (ref.id, "Boom", {"times": 1000})
        await nothing_pending(client, shard)
        assert Flaky.attempts == 3, "a dead letter is not retried any more"

        # The failed attempts left no trace: the next good message sees the initial state.
        assert await client.ask(ref, Add(by=1), timeout=10) == Total(total=1)
        assert (await client.state(ref)).ok == 1


async def test_handler_that_fails_twice_then_succeeds(start_worker, connect, monkeypatch) -> None:
    monkeypatch.setattr(Flaky, "attempts", 0)
    await start_worker(app)
    async with connect(app=app) as client:
        ref = Flaky.ref("twice")
        shard = shard_of(ref.id, client.shards)
        # Attempts 1 and 2 add 1000 then raise; each is rolled back, so the third starts at 0.
        assert await client.ask(ref, Boom(times=2), timeout=10) == Total(total=1)
        assert Flaky.attempts == 3
        assert (await client.state(ref)).ok == 1
        assert await client.store.dead_letters(shard, 100) == []
        assert await client.ask(ref, Add(by=1), timeout=10) == Total(total=2)
        await nothing_pending(client, shard)


async def test_one_failing_actor_does_not_hold_up_its_shard(start_worker, connect, monkeypatch) -> None:
    """While one actor's handler fails and is retried, the other actors keep their order."""
    monkeypatch.setattr(Flaky, "attempts", 0)
    await start_worker(app)
    async with connect(app=app) as client:
        shard = shard_of("Flaky/bad", client.shards)
        good = next(f"good-{i}" for i in range(1000) if shard_of(f"Flaky/good-{i}", client.shards) == shard)
        await client.send(Flaky.ref("bad"), Boom(times=1000))
        await client.send(Flaky.ref(good), Add(by=5))
        assert await client.ask(Flaky.ref(good), Add(by=1), timeout=10) == Total(total=6)
        await dead_letters_of(client, shard, 1)
        assert await client.state(Flaky.ref("bad")) is None, "nothing was committed for it"
        await nothing_pending(client, shard)


# ---- 4. replaying a dead letter -------------------------------------------------------------------------


async def test_replayed_dead_letter_is_handled_once_the_handler_succeeds(
    start_worker, connect, monkeypatch
) -> None:
    monkeypatch.setattr(Flaky, "attempts", 0)
    await start_worker(app)
    async with connect(app=app) as client:
        ref = Flaky.ref("replay")
        shard = shard_of(ref.id, client.shards)
        await client.send(ref, Boom(times=3))  # fails 3 times: all of its attempts
        [dl] = await dead_letters_of(client, shard, 1)
        assert Flaky.attempts == 3
        await nothing_pending(client, shard)
        assert await client.state(ref) is None

        # The 4th attempt succeeds.
        new_entry = await client.store.replay_dead_letter(shard, dl.id)
        assert new_entry is not None and new_entry != dl.entry_id

        async def handled() -> bool:
            state = await client.state(ref)
            return state is not None and state.ok == 1

        await eventually(handled, timeout=10)
        assert Flaky.attempts == 4
        assert await client.store.dead_letters(shard, 100) == []
        await nothing_pending(client, shard)
        assert await client.store.replay_dead_letter(shard, dl.id) is None, "it is gone from the dlq"
        assert await client.ask(ref, Add(by=1), timeout=10) == Total(total=2)


# ---- 5. found on the way: a failing shard runner must still stop ---------------------------------------
# A shard runner that fails (e.g. on a payload it could not check) is torn down by cancelling
# its tasks; worker.stop() waits for that. If a Redis call swallows the cancellation, a task
# that loops (the forwarder, the committer) never ends and the worker never stops.


async def test_a_cancelled_store_call_raises_cancelled_error(redis_url, namespace) -> None:
    store = Store.from_url(redis_url, namespace)
    calls = {
        "load_state (retrying client)": lambda: store.load_state(0, "Counter/x"),
        "append (no-retry appender)": lambda: store.append(0, b"x"),
    }
    landed: list[str] = []
    lost: list[str] = []
    try:
        for name, call in calls.items():
            for steps in (1, 2, 3):
                await call()  # leaves a connected connection in the pool
                task = asyncio.create_task(call())
                for _ in range(steps):
                    await asyncio.sleep(0)
                if not task.cancel():
                    await task
                    continue  # finished before the cancel: nothing to learn
                landed.append(f"{name} after {steps} steps")
                try:
                    await task
                except asyncio.CancelledError:
                    continue
                lost.append(f"{name} after {steps} steps")
    finally:
        await store.close()
    assert landed, "no cancel reached a call in flight"
    assert lost == [], f"the call returned normally although its task was cancelled: {lost}"

"""Bad input, at the edge and inside the worker: refused or dead-lettered with a reason,
and never a crashed worker or a stalled shard. After each bad message the next good
one to the same actor (so the same shard) must still be handled."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
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
from actors.keys import GROUP
from actors.routing import route, shard_of
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


def raw_items(
    mid: Any = None,
    actor: Any = "Counter",
    key: Any = "target",
    mtype: Any = "Add",
    payload: Any = None,
    headers: Any = None,
    reply_to: Any = None,
) -> bytes:
    """A version-1 envelope array holding whatever each field is given, as a raw write could."""
    mid = new_message_id() if mid is None else mid
    payload = {"by": 1} if payload is None else payload
    fields = [1, mid, actor, key, mtype, payload, {} if headers is None else headers, reply_to]
    data: bytes = msgpack.packb(fields, use_bin_type=True)
    return data


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
    # Fields of the envelope the runtime would otherwise trust (found by raw writes).
    "queue-header-not-a-string": ("invalid headers", raw_items(headers={"queue": 5}), "'queue'"),
    "header-value-not-a-string": (
        "invalid headers",
        raw_items(headers={"traceparent": None}),
        "'traceparent'",
    ),
    "header-name-not-a-string": ("invalid headers", raw_items(headers={b"queue": "q"}), "b'queue'"),
    "headers-not-a-map": ("invalid headers", raw_items(headers=["queue", "q"]), "list"),
    "empty-id": ("invalid id", raw_items(mid=""), "empty"),
    "id-not-a-string": ("invalid id", raw_items(mid=5), "int"),
    "reply-to-not-a-string": ("invalid reply_to", raw_items(reply_to=5), "int"),
    "reply-to-another-namespace": (
        "invalid reply_to",
        raw_items(reply_to="elsewhere:replies:x"),
        "'elsewhere:replies:x'",
    ),
    "actor-type-not-a-string": ("undecodable", raw_items(actor=5), "actor"),
    "key-not-a-string": ("undecodable", raw_items(key=b"target"), "key"),
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


# ---- 6. found by raw writes to the documented streams ------------------------------------------------


async def test_an_envelope_in_the_wrong_shard_is_dead_lettered_there(start_worker, connect) -> None:
    """An envelope appended to a shard that is not its actor's must not run there: that would
    be a second live copy of the actor, beside the one its own shard holds."""
    await start_worker(app)
    async with connect(app=app) as client:
        aid = f"Counter/{KEY}"
        home = shard_of(aid, client.shards)
        wrong = (home + 1) % client.shards
        await counter_still_counts(client, KEY, 1)  # the actor is active in its own shard
        raw = raw_envelope("Counter", KEY, "Add", {"by": 100})
        entry_id = await client.store.append(wrong, raw)
        [dl] = await dead_letters_of(client, wrong, 1)
        assert (dl.reason, dl.entry_id, dl.envelope) == ("wrong shard", entry_id, raw)
        assert f"shard {home}" in dl.detail and aid in dl.detail
        assert await client.store.load_state(wrong, aid) is None, "no second copy of the actor"

        # An ask put in the wrong shard is answered with the reason.
        replies = await client._listener()
        routed = route(app, Counter.ref(KEY), Get(), client.shards, 1 << 20, reply_to=replies.channel)
        reply = await replies.request(wrong, routed.envelope.id, routed.data, None, 60_000, 10)
        assert (reply.ok, reply.error) == (False, "wrong shard")
        await dead_letters_of(client, wrong, 2)

        await counter_still_counts(client, KEY, 2)  # the handler never ran for either
        await nothing_pending(client, wrong)
        await nothing_pending(client, home)
        assert await client.store.dead_letters(home, 100) == []


async def append_with_two_envelope_fields(
    client: actors.Client, shard: int, first: bytes, second: bytes
) -> str:
    """An entry with the field ``e`` twice: XADD accepts it, redis-py's xadd (a dict) cannot."""
    entry_id = await client.store.redis.execute_command(
        "XADD", client.store.keys.inbox(shard), "*", "e", first, "e", second
    )
    return str(entry_id.decode())


TWO_FIELDS = "the entry has 2 'e' fields"


async def assert_two_fields_refused(client: actors.Client, shard: int, entry_id: str, first: bytes) -> None:
    [dl] = await dead_letters_of(client, shard, 1)
    assert (dl.reason, dl.entry_id) == ("undecodable", entry_id)
    assert TWO_FIELDS in dl.detail
    assert dl.envelope == first, "the dead letter keeps the first of the two"
    await nothing_pending(client, shard)


async def test_an_entry_with_two_envelope_fields_is_refused_by_the_fenced_read(
    start_worker, connect, fast_settings
) -> None:
    """A fresh runner reads with read_inbox.lua (``read_new``)."""
    async with connect(app=app, shards=fast_settings.shards) as client:
        shard = shard_of(f"Counter/{KEY}", client.shards)
        first = raw_envelope("Counter", KEY, "Add", {"by": 100})
        entry_id = await append_with_two_envelope_fields(
            client, shard, first, raw_envelope("Counter", KEY, "Add", {"by": 1000})
        )
        await start_worker(app)
        await assert_two_fields_refused(client, shard, entry_id, first)
        await counter_still_counts(client, KEY, 1)  # neither of the two was handled


async def test_an_entry_with_two_envelope_fields_is_refused_by_the_blocking_read(
    start_worker, connect, fast_settings
) -> None:
    """An idle runner waits with a plain XREAD (``read_after``); a long block keeps it there."""
    await start_worker(app, fast_settings.model_copy(update={"block_ms": 10_000}))
    async with connect(app=app) as client:
        shard = shard_of(f"Counter/{KEY}", client.shards)
        await counter_still_counts(client, KEY, 1)
        await asyncio.sleep(0.2)  # the runner is blocked on XREAD after what it has seen
        first = raw_envelope("Counter", KEY, "Add", {"by": 100})
        entry_id = await append_with_two_envelope_fields(
            client, shard, first, raw_envelope("Counter", KEY, "Add", {"by": 1000})
        )
        await assert_two_fields_refused(client, shard, entry_id, first)
        await counter_still_counts(client, KEY, 2)


async def test_an_entry_with_two_envelope_fields_is_refused_when_claimed(
    start_worker, connect, fast_settings
) -> None:
    """A runner that starts claims the entries pending in the group (``claim_pending``)."""
    async with connect(app=app, shards=fast_settings.shards) as client:
        shard = shard_of(f"Counter/{KEY}", client.shards)
        inbox = client.store.keys.inbox(shard)
        await client.store.redis.xgroup_create(inbox, GROUP, id="0", mkstream=True)
        first = raw_envelope("Counter", KEY, "Add", {"by": 100})
        entry_id = await append_with_two_envelope_fields(
            client, shard, first, raw_envelope("Counter", KEY, "Add", {"by": 1000})
        )
        # A runner that died after reading it left it pending.
        await client.store.redis.xreadgroup(GROUP, "gone", {inbox: ">"}, count=10)
        assert (await client.store.shard_info(shard)).pending == 1
        await start_worker(app)
        await assert_two_fields_refused(client, shard, entry_id, first)
        await counter_still_counts(client, KEY, 1)


async def test_invalid_headers_are_refused_before_a_turn_without_retries(start_worker, connect) -> None:
    """A ``queue`` header that is not a string used to fail every attempt outside the handler,
    and the dead letter blamed the handler. It is bad input: refused before any turn, and an
    asker gets the reason."""
    await start_worker(app)
    async with connect(app=app) as client:
        shard = shard_of(f"Counter/{KEY}", client.shards)
        replies = await client._listener()
        mid = new_message_id()
        raw = raw_items(mid=mid, mtype="Get", payload={}, headers={"queue": 5}, reply_to=replies.channel)
        reply = await replies.request(shard, mid, raw, None, 60_000, 10)
        assert (reply.ok, reply.error) == (False, "invalid headers")
        assert "'queue'" in reply.detail and "int" in reply.detail
        [dl] = await dead_letters_of(client, shard, 1)
        assert dl.reason == "invalid headers" and "failed" not in dl.reason
        await counter_still_counts(client, KEY, 1)
        await nothing_pending(client, shard)


async def test_a_reply_to_outside_the_namespace_gets_no_reply(start_worker, connect) -> None:
    """The worker never publishes on (or stores a reply for) a channel that is not a reply
    channel of its namespace: it could be anyone's."""
    await start_worker(app)
    async with connect(app=app) as client:
        shard = shard_of(f"Counter/{KEY}", client.shards)
        mid = new_message_id()
        await client.store.append(shard, raw_items(mid=mid, mtype="Get", payload={}, reply_to="elsewhere:x"))
        [dl] = await dead_letters_of(client, shard, 1)
        assert dl.reason == "invalid reply_to"
        assert await client.store.get_reply(shard, mid) is None
        await counter_still_counts(client, KEY, 1)


@pytest.mark.single("an ACL user made on the one server (a cluster's nodes each have their own ACL)")
async def test_a_refused_reply_publish_loses_no_message(
    redis_server, namespace, fast_settings, connect
) -> None:
    """A worker whose Redis user may not publish on the reply channels (an ACL without channel
    rights) still commits and dead-letters: a reply's PUBLISH is a notification, and the
    asker reads the stored reply when none is published."""
    user, password = f"nochannels-{uuid.uuid4().hex[:12]}", uuid.uuid4().hex
    async with connect(app=app, shards=fast_settings.shards) as client:
        admin = client.store.redis
        # Every command and key; channels too at first, so that the worker can start (its
        # reply listener subscribes before it is ready).
        await admin.execute_command(
            "ACL", "SETUSER", user, "on", f">{password}", "~*", "+@all", "allchannels"
        )
        try:
            url = f"redis://{user}:{password}@127.0.0.1:{redis_server.port}/0"
            async with bounded_worker(app, url, namespace, fast_settings):
                await admin.execute_command("ACL", "SETUSER", user, "resetchannels")
                with pytest.raises(Exception, match=r"NOPERM|No permissions"):  # the server refuses it
                    await _publish_as(url, f"{namespace}:replies:probe")

                assert await client.ask(Counter.ref(KEY), Add(by=5), timeout=10) is None
                assert await client.ask(Counter.ref(KEY), Get(), timeout=10) == Total(total=5)

                class Add2(BaseModel):  # refused by the worker: an ask that is dead-lettered
                    by: str

                Add2.__name__ = "Add"
                async with connect() as bare:
                    with pytest.raises(HandlerError) as refused:
                        await bare.ask(ActorRef("Counter", KEY), Add2(by="many"), timeout=10)
                assert refused.value.reason == "invalid payload"
                shard = shard_of(f"Counter/{KEY}", client.shards)
                [dl] = await dead_letters_of(client, shard, 1)
                assert dl.reason == "invalid payload"
                await nothing_pending(client, shard)
                assert await client.ask(Counter.ref(KEY), Get(), timeout=10) == Total(total=5)
        finally:
            await admin.execute_command("ACL", "DELUSER", user)


async def _publish_as(url: str, channel: str) -> None:
    store = Store.from_url(url, "probe")
    try:
        await store.redis.publish(channel, b"x")
    finally:
        await store.close()

"""Input that used to be accepted and must not be: each is refused at the call with a typed
error, before anything is written (issue #15 item 9)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

import actors
from actors import ActorRef

from .apps import Add, Counter, Get, Tally, Total, app
from .conftest import raw_redis
from .test_cli import actors_cli, failed, ok

APP = "tests.apps:app"


async def nothing_written(client: actors.Client) -> None:
    for shard in range(client.shards):
        info = await client.store.shard_info(shard)
        assert (info.length, info.dead_letters) == (0, 0), info


async def test_the_cli_refuses_a_misspelt_field(
    redis_url: str, namespace: str, connect: Callable[..., Any]
) -> None:
    where = ["--redis", redis_url, "--namespace", namespace]
    result = await actors_cli("send", "Counter/k", "Add", '{"By": 3}', "--app", APP, *where)
    assert result.returncode == 2 and result.stdout == ""
    assert "By" in failed(result) and "Extra inputs are not permitted" in result.stderr
    extra = await actors_cli(
        "ask", "Counter/k", "Get", '{"total": 1}', "--app", APP, "--timeout", "5", *where
    )
    assert extra.returncode == 2 and "total" in failed(extra)
    async with connect(app=app) as client:
        await nothing_written(client)
    ok(await actors_cli("send", "Counter/k", "Add", '{"by": 3}', "--app", APP, *where))


async def test_a_client_with_an_app_refuses_actor_types_it_does_not_define(
    connect: Callable[..., Any],
) -> None:
    only_counters = actors.App(Counter)
    async with connect(app=only_counters) as client:
        for ref in (Tally.ref("t"), ActorRef("Tally", "t"), ActorRef("Nope", "n")):
            with pytest.raises(actors.UnknownActorType, match="this app defines: Counter"):
                await client.send(ref, Add())
            with pytest.raises(actors.UnknownActorType):
                await client.ask(ref, Get(), timeout=5)
            with pytest.raises(actors.UnknownActorType):
                await client.send_many([(Counter.ref("c"), Add()), (ref, Add())])
            with pytest.raises(actors.UnknownActorType):
                await client.cancel(ref)
            with pytest.raises(actors.UnknownActorType):
                await client.approve(ref, "r1")
        await nothing_written(client)
        await client.send(Counter.ref("c"), Add())  # its own types still go
    async with connect() as client:
        await client.send(ActorRef("Tally", "t"), Add()), "without an app: unchecked, as before"


@pytest.mark.parametrize("key", ["", None, 5])
def test_an_actor_key_must_be_non_empty_text(key: Any) -> None:
    with pytest.raises(actors.InvalidActorRef) as refused:
        ActorRef("Counter", key)
    assert isinstance(refused.value, ValueError)
    with pytest.raises(actors.InvalidActorRef):
        Counter.ref(key)


@pytest.mark.parametrize("actor_type", ["", "a/b", None])
def test_an_actor_type_must_be_a_name(actor_type: Any) -> None:
    with pytest.raises(actors.InvalidActorRef):
        ActorRef(actor_type, "k")


@pytest.mark.parametrize("timeout", [0, -1, math.nan, math.inf, True], ids=["0", "-1", "nan", "inf", "True"])
async def test_an_ask_timeout_must_be_a_positive_finite_number(
    timeout: Any, start_worker: Callable[..., Any], connect: Callable[..., Any]
) -> None:
    await start_worker(app)
    async with connect(app=app) as client:
        with pytest.raises(actors.InvalidArgument, match="timeout") as refused:
            await client.ask(Counter.ref("t"), Add(by=1), timeout=timeout)
        assert isinstance(refused.value, ValueError)
        assert await client.ask(Counter.ref("t"), Get(), timeout=10) == Total(total=0), (
            "the Add was never sent"
        )


async def test_an_integer_too_large_to_encode_is_a_typed_error(connect: Callable[..., Any]) -> None:
    async with connect(app=app) as client:
        for by in (2**64, -(2**63) - 1):
            with pytest.raises(actors.MessageNotEncodable, match="integer outside") as refused:
                await client.send(Counter.ref("big"), Add(by=by))
            assert isinstance(refused.value, ValueError)
        await nothing_written(client)
        await client.send(Counter.ref("big"), Add(by=2**63 - 1))


@pytest.mark.parametrize("shards", [0, -4, 4097, True, 2.5], ids=["0", "-4", "4097", "True", "2.5"])
async def test_connect_refuses_a_shard_count_outside_1_to_4096(
    shards: Any, redis_url: str, namespace: str, connect: Callable[..., Any]
) -> None:
    with pytest.raises(actors.ConfigurationError, match="1 to 4096"):
        async with connect(shards=shards):
            pass
    async with connect(shards=8) as client:
        assert client.shards == 8, "nothing was recorded by the refused one"


async def test_a_bad_recorded_shard_count_is_a_clear_error(redis_url: str, namespace: str) -> None:
    """A namespace whose record an older version let be 0: every client gets a ConfigurationError
    naming the record, not a ZeroDivisionError at its first send."""
    raw = raw_redis(redis_url)
    try:
        await raw.hset(f"{namespace}:meta", "shards", "0")
    finally:
        await raw.aclose()
    for shards in (None, 16):
        with pytest.raises(actors.ConfigurationError, match="invalid shard count '0'"):
            async with actors.connect(redis_url, namespace=namespace, shards=shards):
                pass
    result = await actors_cli("status", "--redis", redis_url, "--namespace", namespace)
    assert "invalid shard count" in failed(result)

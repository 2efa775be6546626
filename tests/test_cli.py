"""The real ``actors`` command, run as a subprocess against real workers and a real server."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

import actors
from actors import EmbeddedServer
from actors.routing import shard_of

from .apps import Boom, Counter, Flaky, Get, Total, app
from .conftest import ROOT, eventually, raw_redis

APP = "tests.apps:app"

Run = Callable[..., Awaitable[subprocess.CompletedProcess[str]]]


def _env(**extra: str) -> dict[str, str]:
    # Nothing the test did not choose: no URL, namespace, app or server dir from outside.
    env = {k: v for k, v in os.environ.items() if k not in _OURS}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


_OURS = {
    "ACTORS_REDIS_URL",
    "ACTORS_NAMESPACE",
    "ACTORS_APP",
    "ACTORS_SERVER_DIR",
    "ACTORS_LOG_LEVEL",
    "PYTHONPATH",
}


async def actors_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``actors ARGS...`` in a thread, so the event loop (and an in-process worker) keeps running."""
    argv = [sys.executable, "-m", "actors.cli", "--log-level", "WARNING", *args]
    return await asyncio.to_thread(
        subprocess.run, argv, cwd=ROOT, env=env or _env(), capture_output=True, text=True, timeout=90
    )


@pytest.fixture
def cli(redis_url: str, namespace: str) -> Run:
    """``actors SUBCOMMAND ... --redis URL --namespace NS``, on the test's server and namespace."""

    async def run(*args: str) -> subprocess.CompletedProcess[str]:
        return await actors_cli(*args, "--redis", redis_url, "--namespace", namespace)

    return run


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (
        f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    )
    return result.stdout


def failed(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, f"exit 0\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr


# ---- send / ask / state ------------------------------------------------------------------------


async def test_send_ask_and_state(spawn_worker, cli, connect) -> None:
    spawn_worker()
    message_id = ok(await cli("send", "Counter/k", "Add", '{"by": 3}', "--app", APP)).strip()
    assert re.fullmatch(r"[0-9a-f]{32}", message_id), message_id

    assert json.loads(ok(await cli("ask", "Counter/k", "Get", "--app", APP))) == {"total": 3}

    state = json.loads(ok(await cli("state", "Counter/k", "--app", APP)))
    assert state["total"] == 3 and state["seqs"] == {}
    assert Counter.State.model_validate(state).total == 3
    assert json.loads(ok(await cli("state", "Counter/k"))) == state, "without --app: the raw snapshot"
    assert json.loads(ok(await cli("state", "Counter/never", "--app", APP))) is None

    async with connect(app=app) as client:
        assert await client.ask(Counter.ref("k"), Get(), timeout=10) == Total(total=3)


async def test_send_with_an_idempotency_key_counts_once(spawn_worker, cli) -> None:
    spawn_worker()
    first = ok(await cli("send", "Counter/i", "Add", '{"by": 2}', "--app", APP, "--idempotency-key", "o-1"))
    again = ok(await cli("send", "Counter/i", "Add", '{"by": 2}', "--app", APP, "--idempotency-key", "o-1"))
    assert first == again, "the second send returns the first message id"
    assert json.loads(ok(await cli("ask", "Counter/i", "Get", "--app", APP))) == {"total": 2}


async def test_bad_messages_exit_nonzero_and_write_nothing(start_worker, cli, connect) -> None:
    await start_worker(app)
    invalid = failed(await cli("send", "Counter/k", "Add", '{"by": "x"}', "--app", APP))
    assert "validation error for Add" in invalid and "by" in invalid
    assert "Invalid JSON" in failed(await cli("send", "Counter/k", "Add", '{"by": ', "--app", APP))
    assert "validation error for Add" in failed(
        await cli("ask", "Counter/k", "Add", '{"by": []}', "--app", APP)
    )
    assert "no handler for message type 'Nope'" in failed(
        await cli("send", "Counter/k", "Nope", "{}", "--app", APP)
    )
    assert "unknown actor type 'Nope'" in failed(await cli("send", "Nope/k", "Add", "{}", "--app", APP))
    assert "--app" in failed(await cli("send", "Counter/k", "Add", '{"by": 1}'))

    async with connect(app=app) as client:
        for shard in range(client.shards):
            info = await client.store.shard_info(shard)
            assert (info.length, info.dead_letters) == (0, 0), info
        assert await client.state(Counter.ref("k")) is None

        # The next good one goes through.
        ok(await cli("send", "Counter/k", "Add", '{"by": 3}', "--app", APP))
        assert await client.ask(Counter.ref("k"), Get(), timeout=10) == Total(total=3)


async def test_invalid_payload_exits_2_with_the_message_on_stderr_only(start_worker, cli) -> None:
    await start_worker(app)
    result = await cli("send", "Counter/k", "Add", '{"by": "x"}', "--app", APP)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("invalid message: ")


async def test_malformed_actor_reference_is_reported_without_a_traceback(start_worker, cli) -> None:
    await start_worker(app)
    assert "Type/key" in failed(await cli("send", "Counter", "Add", "{}", "--app", APP))
    assert "Type/key" in failed(await cli("state", "Counter"))


# ---- status ------------------------------------------------------------------------------------------


async def test_status_lists_the_live_worker_and_every_shard_owner(spawn_worker, cli, connect) -> None:
    spawn_worker()
    async with connect() as client:

        async def one_worker_owns_all() -> str | None:
            workers = await client.store.live_workers()
            if len(workers) != 1:
                return None
            infos = [await client.store.shard_info(s) for s in range(client.shards)]
            return workers[0] if all(i.owner == workers[0] for i in infos) else None

        worker_id = await eventually(one_worker_owns_all, timeout=30)
        shards = client.shards
    assert shards == 16

    text = ok(await cli("status"))
    lines = text.splitlines()
    assert lines[0].endswith(f": {shards} shards, 1 live workers"), lines[0]
    assert f"  worker {worker_id}: shards {list(range(shards))}" in lines
    header = next(n for n, line in enumerate(lines) if line.split()[:2] == ["shard", "owner"])
    rows = [line.split() for line in lines[header + 1 :]]
    assert [int(r[0]) for r in rows] == list(range(shards))
    assert {r[1] for r in rows} == {worker_id}
    assert all(int(r[2]) >= 1 for r in rows), "every shard has an epoch"

    status = json.loads(ok(await cli("status", "--json")))
    assert status["workers"] == [worker_id]
    assert [s["shard"] for s in status["shards"]] == list(range(shards))
    assert {s["owner"] for s in status["shards"]} == {worker_id}
    assert all(s["epoch"] >= 1 and s["pending"] == 0 and s["dead_letters"] == 0 for s in status["shards"])


async def test_status_after_a_send_shows_the_entry(start_worker, fast_settings, cli, connect) -> None:
    # No trim of the inbox while the test looks (every 5 s by default: a slow machine may take
    # longer than that from the send to the status, and then the entry is gone).
    await start_worker(app, fast_settings.model_copy(update={"trim_interval": 3600.0}))
    ok(await cli("send", "Counter/s", "Add", "{}", "--app", APP))
    assert json.loads(ok(await cli("ask", "Counter/s", "Get", "--app", APP))) == {"total": 1}
    async with connect() as client:
        shard = shard_of("Counter/s", client.shards)
    status = json.loads(ok(await cli("status", "--json")))
    row = status["shards"][shard]
    assert row["length"] >= 1 and row["pending"] == 0 and row["lag"] == 0


# ---- dead letters -------------------------------------------------------------------------------------


async def _two_dead_letters(client: actors.Client) -> tuple[str, str]:
    """A handler failure (Flaky/d, Boom(times=3)) and an undecodable entry in shard 0.
    Returns their addresses as SHARD/ID."""
    await client.send(Flaky.ref("d"), Boom(times=3))
    await client.store.append(0, b"\xc1\xc1 not msgpack")
    flaky_shard = shard_of("Flaky/d", client.shards)

    async def both() -> tuple[str, str] | None:
        flaky = await client.store.dead_letters(flaky_shard, 100)
        junk = [dl for dl in await client.store.dead_letters(0, 100) if dl.reason == "undecodable"]
        if not (any(dl.reason != "undecodable" for dl in flaky) and junk):
            return None
        [failure] = [dl for dl in flaky if dl.reason != "undecodable"]
        return f"{flaky_shard}/{failure.id}", f"0/{junk[0].id}"

    return await eventually(both, timeout=10)


async def test_dlq_list_show_replay_drop(start_worker, cli, connect, monkeypatch) -> None:
    monkeypatch.setattr(Flaky, "attempts", 0)
    await start_worker(app)
    async with connect(app=app) as client:
        failure, junk = await _two_dead_letters(client)
        assert Flaky.attempts == 3

        listed = ok(await cli("dlq", "list")).splitlines()
        assert sorted(listed) == sorted(
            [
                f"{failure}  Boom -> Flaky/d  handler Flaky.on_boom failed 3 times: RuntimeError('boom #3')",
                f"{junk}  (undecodable entry)  undecodable",
            ]
        )
        only_junk = ok(await cli("dlq", "list", "--shard", "0")).splitlines()
        assert f"{junk}  (undecodable entry)  undecodable" in only_junk
        assert all(line.startswith("0/") for line in only_junk)

        shown = ok(await cli("dlq", "show", failure))
        assert shown.startswith(f"{failure}: Boom -> Flaky/d\n")
        assert "reason: handler Flaky.on_boom failed 3 times" in shown
        assert "Traceback (most recent call last)" in shown and "RuntimeError: boom #3" in shown
        assert "not valid msgpack" in ok(await cli("dlq", "show", junk))

        # Replay once the handler would succeed: the 4th attempt does.
        replayed = ok(await cli("dlq", "replay", failure))
        assert re.fullmatch(r"replayed as inbox entry \d+-\d+\n", replayed), replayed

        async def handled() -> bool:
            state = await client.state(Flaky.ref("d"))
            return state is not None and state.ok == 1

        await eventually(handled, timeout=10)
        assert Flaky.attempts == 4

        assert ok(await cli("dlq", "drop", junk)) == "dropped\n"
        assert ok(await cli("dlq", "list")) == ""
        for shard in range(client.shards):
            info = await client.store.shard_info(shard)
            assert (info.dead_letters, info.pending) == (0, 0), info


async def test_dlq_commands_on_a_missing_dead_letter_fail(start_worker, cli, connect) -> None:
    """Asking for a dead letter that is not there is an error, for show, replay and drop alike."""
    await start_worker(app)
    async with connect(app=app) as client:
        _, junk = await _two_dead_letters(client)
    ok(await cli("dlq", "drop", junk))
    assert "no dead letter" in failed(await cli("dlq", "show", junk))
    for action in ("replay", "drop"):
        result = await cli("dlq", action, junk)
        assert "no dead letter" in result.stdout + result.stderr
        failed(result)


async def test_dlq_address_must_be_shard_slash_id(start_worker, cli) -> None:
    await start_worker(app)
    for action in ("show", "replay", "drop"):
        assert "SHARD/ID" in failed(await cli("dlq", action, "1700000000000-0"))
        assert "SHARD/ID" in failed(await cli("dlq", action))


async def test_dlq_purge_removes_all_or_the_older_ones_and_says_what(start_worker, cli, connect) -> None:
    await start_worker(app)
    async with connect(app=app) as client:
        store = client.store
        old = await store.server_time_ms() - 2 * 3600 * 1000
        fields = {"e": b"x", "entry": "", "reason": "test", "detail": "", "at": "0"}
        for shard, entry_id in ((1, f"{old}-0"), (1, f"{old}-1"), (1, "*"), (2, "*")):
            await store.redis.xadd(store.keys.dead_letters(shard), fields, id=entry_id)

        def left(shard: int) -> Awaitable[int]:
            return store.redis.xlen(store.keys.dead_letters(shard))

        assert ok(await cli("dlq", "purge", "--older-than", "1h")) == (
            "shard 1: removed 2 dead letters\nremoved 2 dead letters older than 1h\n"
        )
        assert (await left(1), await left(2)) == (1, 1), "the fresh ones are kept"
        assert ok(await cli("dlq", "purge", "--older-than", "1h")) == "removed 0 dead letters older than 1h\n"
        assert ok(await cli("dlq", "purge", "--shard", "2")) == (
            "shard 2: removed 1 dead letter\nremoved 1 dead letter\n"
        )
        assert (await left(1), await left(2)) == (1, 0)
        assert ok(await cli("dlq", "purge")) == "shard 1: removed 1 dead letter\nremoved 1 dead letter\n"
        assert (await left(1), await left(2)) == (0, 0)
    for bad in ("soon", "-1h", "0"):
        assert "--older-than" in failed(await cli("dlq", "purge", "--older-than", bad))


# ---- the embedded server ---------------------------------------------------------------------------------


async def test_server_start_status_stop(tmp_path: Path, namespace: str) -> None:
    directory = tmp_path / "server"
    env = _env(ACTORS_SERVER_DIR=str(directory))
    try:
        url = ok(await actors_cli("server", "start", env=env)).strip()
        assert re.fullmatch(r"redis://:[0-9a-f]{48}@127\.0\.0\.1:\d+/0", url), url
        assert ok(await actors_cli("server", "start", env=env)).strip() == url, "a second start adopts it"

        status = json.loads(ok(await actors_cli("server", "status", env=env)))
        assert status["running"] is True and status["url"] == url
        assert status["directory"] == str(directory) and isinstance(status["pid"], int)

        # With no --redis, commands use this server.
        ok(
            await actors_cli(
                "send", "Counter/e", "Add", '{"by": 4}', "--app", APP, "--namespace", namespace, env=env
            )
        )
        async with actors.connect(url, namespace=namespace) as client:
            shard = shard_of("Counter/e", client.shards)
            assert (await client.store.shard_info(shard)).length == 1
        shown = json.loads(ok(await actors_cli("status", "--json", "--namespace", namespace, env=env)))
        assert sum(s["length"] for s in shown["shards"]) == 1

        assert ok(await actors_cli("server", "stop", env=env)) == "stopped\n"
        status = json.loads(ok(await actors_cli("server", "status", env=env)))
        assert status["running"] is False and status["url"] is None
        assert ok(await actors_cli("server", "stop", env=env)) == "not running\n"
    finally:
        # Whatever happened above, no server outlives the test.
        await asyncio.to_thread(_stop_server, directory)


def _stop_server(directory: Path) -> None:
    if directory.exists():
        EmbeddedServer(directory).stop()


async def test_server_data_survives_a_restart(tmp_path: Path, namespace: str) -> None:
    directory = tmp_path / "server"
    env = _env(ACTORS_SERVER_DIR=str(directory))
    try:
        ok(await actors_cli("server", "start", env=env))
        ok(
            await actors_cli(
                "send", "Counter/p", "Add", '{"by": 5}', "--app", APP, "--namespace", namespace, env=env
            )
        )
        assert ok(await actors_cli("server", "stop", env=env)) == "stopped\n"
        url = ok(await actors_cli("server", "start", env=env)).strip()
        async with actors.connect(url, namespace=namespace, app=app) as client:
            shard = shard_of("Counter/p", client.shards)
            [(_, raw)] = await client.store.redis.xrange(client.store.keys.inbox(shard))
            assert raw[b"e"], "the message sent before the restart is still in its inbox"
    finally:
        await asyncio.to_thread(_stop_server, directory)


async def test_send_reaches_the_worker_spawned_by_the_cli(spawn_worker, cli, connect) -> None:
    """send from the CLI, handled by an `actors worker` process, read back in-process."""
    spawn_worker()
    for _ in range(3):
        ok(await cli("send", "Counter/w", "Add", '{"by": 2}', "--app", APP))
    async with connect(app=app) as client:
        assert await client.ask(Counter.ref("w"), Get(), timeout=30) == Total(total=6)
        state = await client.state(Counter.ref("w"))
        assert isinstance(state, Counter.State) and state.total == 6


async def test_bench_measures_with_real_workers_and_cleans_up(redis_url: str) -> None:
    result = await actors_cli(
        "bench", "--messages", "3000", "--actors", "50", "--processes", "2", "--asks", "50", "--json",
        "--redis", redis_url,
    )  # fmt: skip
    figures = json.loads(ok(result))
    assert figures["exactly_once"] is True and figures["messages"] == 3000 and figures["processes"] == 2
    assert figures["msgs_per_s"] > 0 and 0 < figures["ask_p50_ms"] <= figures["ask_p99_ms"]
    assert figures["commands_per_message"] > 1
    client = raw_redis(redis_url)
    try:
        assert [k async for k in client.scan_iter(match="bench-*")] == [], "its namespace was deleted"
    finally:
        await client.aclose()
    assert "must be at least 1" in failed(await actors_cli("bench", "--messages", "0", "--redis", redis_url))

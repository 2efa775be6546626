"""Size bounds (issue #14): a state, a journal record or a reply over its setting fails its
turn with a clear reason, and commits are packed by bytes as well as by count, so that no
write passes the server's ``proto-max-bulk-len``. Without them such a write resets the
connection, and the shard restarts in a loop, running the handler again each time.

The server here is private, with ``proto-max-bulk-len`` at 8 MB: any single argument over it
(the commit script takes its whole batch as one) resets the connection."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel

import actors
from actors import EmbeddedServer
from actors.shard.commits import batch_length
from actors.store import Write, write_bytes

from .conftest import eventually

MiB = 1024 * 1024
BULK_LIMIT = 8 * MiB
"""The private server's proto-max-bulk-len."""


class Grow(BaseModel):
    size: int


class Save(BaseModel):
    size: int


class Fetch(BaseModel):
    size: int


class Blob(BaseModel):
    data: str


class Ping(BaseModel):
    pass


class Pong(BaseModel):
    pass


class Hoarder(actors.Actor):
    class State(BaseModel):
        blob: str = ""
        saved: list[str] = []

    calls: ClassVar[dict[str, int]] = {}
    step_runs: ClassVar[int] = 0

    async def on_grow(self, msg: Grow) -> None:
        _count(self.key)
        self.state.blob = "x" * msg.size

    async def on_save(self, msg: Save) -> None:
        _count(self.key)
        try:
            await self.step(self._download, msg.size)
            self.state.saved.append("journaled")
        except actors.StepFailed as exc:
            self.state.saved.append(f"{exc.error_type}: {exc.message}")

    async def on_fetch(self, msg: Fetch) -> Blob:
        _count(self.key)
        return Blob(data="x" * msg.size)

    async def on_ping(self, msg: Ping) -> Pong:
        return Pong()

    def _download(self, size: int) -> str:
        type(self).step_runs += 1
        return "x" * size


def _count(key: str) -> None:
    Hoarder.calls[key] = Hoarder.calls.get(key, 0) + 1


app = actors.App(Hoarder)


@pytest.fixture(autouse=True)
def _fresh_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Hoarder, "calls", {})
    monkeypatch.setattr(Hoarder, "step_runs", 0)


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(Path(tmp_path_factory.mktemp("small-bulk"))).start()
    yield server
    server.stop()


@pytest.fixture
async def client(small_server: EmbeddedServer, namespace: str) -> AsyncIterator[actors.Client]:
    async with actors.connect(small_server.url, namespace=namespace, app=app, shards=1) as client:
        await client.store.redis.config_set("proto-max-bulk-len", str(BULK_LIMIT))
        yield client


def _settings() -> actors.WorkerSettings:
    """One shard (every actor shares it), fast leases and retries, the size settings' defaults."""
    return actors.WorkerSettings(
        shards=1,
        lease=actors.LeaseSettings(ttl=1.0, renew_interval=0.2),
        retry=actors.RetrySettings(max_attempts=3, backoff=0.01),
    )


async def _dead_letters(client: actors.Client) -> list[Any]:
    return list(await client.store.dead_letters(0, 100))


@pytest.mark.single("its own server with a small bulk limit")
async def test_a_state_over_max_state_bytes_is_dead_lettered_at_once(
    start_worker: Any, client: Any, small_server: EmbeddedServer
) -> None:
    size = 17 * MiB  # over the default max_state_bytes (16 MiB) and over the server's bulk limit
    await start_worker(app, _settings(), url=small_server.url)
    await client.send(Hoarder.ref("big"), Grow(size=size))

    [dead] = await eventually(lambda: _dead_letters(client), timeout=10)
    assert dead.reason.startswith("state too large: "), dead.reason
    assert "Hoarder/big" in dead.reason and "max_state_bytes" in dead.reason
    assert f"{16 * MiB}" in dead.reason, "the reason names the limit"
    # A bystander of the same shard is handled: the shard did not restart in a loop.
    assert await client.ask(Hoarder.ref("bystander"), Ping(), timeout=10) == Pong()
    assert Hoarder.calls == {"big": 1}, "not retried: the same state would be too large again"
    assert await client.state(Hoarder.ref("big")) is None, "the state was not written"
    # The actor goes on from its committed state.
    await client.send(Hoarder.ref("big"), Grow(size=10))
    await eventually(lambda: client.state(Hoarder.ref("big")), timeout=10)
    assert (await client.state(Hoarder.ref("big"))).blob == "x" * 10
    assert len(await _dead_letters(client)) == 1


@pytest.mark.single("its own server with a small bulk limit")
async def test_a_step_result_over_max_record_bytes_is_journaled_as_the_steps_error(
    start_worker: Any, client: Any, small_server: EmbeddedServer
) -> None:
    size = 9 * MiB  # over the default max_record_bytes (4 MiB) and over the server's bulk limit
    await start_worker(app, _settings(), url=small_server.url)
    await client.send(Hoarder.ref("saver"), Save(size=size))

    async def saved() -> list[str] | None:
        state = await client.state(Hoarder.ref("saver"))
        return None if state is None else list(state.saved)

    [outcome] = await eventually(saved, timeout=10)
    assert outcome.startswith("RecordTooLarge: "), outcome
    assert "max_record_bytes" in outcome and f"{4 * MiB}" in outcome
    assert Hoarder.step_runs == 1, "its function ran (its side effects happened): not run again"
    assert Hoarder.calls == {"saver": 1}
    assert await _dead_letters(client) == []
    assert await client.ask(Hoarder.ref("bystander"), Ping(), timeout=10) == Pong()


@pytest.mark.single("its own server with a small bulk limit")
async def test_a_reply_over_max_record_bytes_is_dead_lettered_and_the_asker_told(
    start_worker: Any, client: Any, small_server: EmbeddedServer
) -> None:
    size = 9 * MiB  # over the default max_record_bytes and over the server's bulk limit
    await start_worker(app, _settings(), url=small_server.url)
    with pytest.raises(actors.HandlerError) as caught:
        await client.ask(Hoarder.ref("fetcher"), Fetch(size=size), timeout=10)
    assert caught.value.reason.startswith("reply too large: "), caught.value.reason
    assert "max_record_bytes" in caught.value.reason
    assert Hoarder.calls == {"fetcher": 1}
    [dead] = await _dead_letters(client)
    assert dead.reason == caught.value.reason
    assert await client.ask(Hoarder.ref("fetcher"), Fetch(size=10), timeout=10) == Blob(data="x" * 10)


@pytest.mark.single("its own server with a small bulk limit")
async def test_big_writes_of_many_actors_are_committed_in_several_batches(
    start_worker: Any, client: Any, small_server: EmbeddedServer
) -> None:
    # Ten turns of ten actors, read in one batch and run together: their commits queue up at
    # once. Together they pass the server's bulk limit; each batch stays under
    # commit_batch_bytes (4 MiB by default).
    refs = [Hoarder.ref(f"a{i}") for i in range(10)]
    await client.send_many([(ref, Grow(size=MiB)) for ref in refs])
    await start_worker(app, _settings(), url=small_server.url)

    async def all_committed() -> bool:
        states = [await client.state(ref) for ref in refs]
        return all(s is not None and len(s.blob) == MiB for s in states)

    await eventually(all_committed, timeout=15)
    assert Hoarder.calls == {ref.key: 1 for ref in refs}, "each turn ran once: no restart"
    assert await _dead_letters(client) == []


def _write(i: int, size: int) -> Write:
    return Write("c", f"Hoarder/a{i}", "i", f"{i}-0", snapshot=b"x" * size)


def test_a_batch_stops_at_its_byte_bound_and_a_larger_write_goes_alone() -> None:
    def batches(writes: list[Write], count: int, max_bytes: int) -> list[int]:
        lengths = []
        while writes:
            n = batch_length(writes, count, max_bytes)
            lengths.append(n)
            writes = writes[n:]
        return lengths

    ten = [_write(i, MiB) for i in range(10)]
    assert all(MiB < write_bytes(w) < MiB + 100 for w in ten)
    assert batches(ten, 256, 4 * MiB) == [3, 3, 3, 1]
    assert batches(ten, 2, 4 * MiB) == [2] * 5, "the count bound still holds"
    assert batches([_write(i, 10) for i in range(600)], 256, 4 * MiB) == [256, 256, 88]
    mixed = [_write(0, 10), _write(1, 5 * MiB), _write(2, 10), _write(3, 10)]
    assert batches(mixed, 256, 4 * MiB) == [1, 1, 2], "a write larger than the bound goes alone"

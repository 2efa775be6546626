"""A worker process's start and end, as an operator sees them: it waits for a Redis that is
not there yet (one log line per attempt), says what it drains on SIGTERM or Ctrl-C, leaves
what it read ahead to the next owner instead of running it first, and stops now on a second
signal, losing nothing. Real ``actors worker`` processes, real servers, real signals."""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import actors
from actors import EmbeddedServer, RedisSettings, Worker, WorkerSettings

from .apps import Counter, Get, Held, Hold, Nap, Total, app
from .conftest import WorkerProcess, eventually, unused_port

pytestmark = pytest.mark.chaos


@pytest.fixture
def worker_at_info(spawn_worker: Callable[..., WorkerProcess]) -> Callable[..., WorkerProcess]:
    """Factory: ``actors worker tests.apps:app`` as a real process at URL, logging at INFO."""

    def factory(url: str, *extra: str) -> WorkerProcess:
        return spawn_worker("tests.apps:app", *extra, url=url, log_level="INFO")

    return factory


def log_lines(proc: WorkerProcess, pattern: str) -> list[str]:
    text = proc.log.read_text() if proc.log.exists() else ""
    return [line for line in text.splitlines() if re.search(pattern, line)]


def free_port() -> int:
    return unused_port()


# ---- start: Redis not there yet -------------------------------------------------------------------


async def test_a_worker_started_before_redis_waits_for_it(
    worker_at_info: Callable[..., WorkerProcess], namespace: str, tmp_path: Path
) -> None:
    port = free_port()
    # The embedded server keeps its password in its directory: made now, so the URL knows it.
    server_dir = tmp_path / "late-redis"
    server_dir.mkdir(mode=0o700)
    (server_dir / "password").write_text("late-secret\n")
    url = f"redis://:late-secret@127.0.0.1:{port}/0"
    worker = worker_at_info(url)
    attempts = await eventually(
        lambda: len(log_lines(worker, "not reachable")) >= 3 and log_lines(worker, "not reachable")
    )
    assert worker.proc is not None and worker.proc.poll() is None, "still waiting, not exited"
    assert "Traceback" not in worker.log.read_text()
    delays = [float(re.search(r"trying again in ([\d.]+)s", line).group(1)) for line in attempts]  # type: ignore[union-attr]
    assert delays[:3] == sorted(delays[:3]) and delays[2] > delays[0], f"backoff grows: {attempts}"
    assert all(f"attempt {n}" in line for n, line in enumerate(attempts[:3], 1))

    server = EmbeddedServer(server_dir, port=port).start()
    try:
        assert server.port == port, "the port was taken meanwhile"
        async with actors.connect(url, namespace=namespace, app=app) as client:
            assert await client.ask(Counter.ref("late"), Get(), timeout=60) == Total(total=0)
        assert worker.stop() == 0
    finally:
        server.stop()


async def test_a_connect_timeout_ends_the_wait_with_one_line(
    worker_at_info: Callable[..., WorkerProcess],
) -> None:
    worker = worker_at_info(f"redis://127.0.0.1:{free_port()}/0", "--connect-timeout", "1.5")
    assert worker.proc is not None
    assert worker.proc.wait(timeout=60) == 1
    text = worker.log.read_text()
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "could not be reached" in errors[0] and "connect timeout 1.5s" in errors[0], (
        text
    )


# ---- end: drain, and stop now ---------------------------------------------------------------------


async def test_sigterm_logs_the_drain_and_leaves_read_ahead_messages_to_the_next_owner(
    worker_at_info: Callable[..., WorkerProcess], redis_url: str, connect: Callable[..., Any]
) -> None:
    """200 naps of 0.05 s for one actor: 10 s of work, read ahead at once. On SIGTERM only the
    nap in progress finishes; the rest stay in Redis, and the next worker does each once."""
    leaving = worker_at_info(redis_url, "--shards", "1", "--grace", "30")
    async with connect(app=app, shards=1) as client:
        ref = Counter.ref("napper")
        await client.send_many([(ref, Nap(seconds=0.05)) for _ in range(200)])
        await eventually(lambda: _total(client, ref, at_least=3), timeout=30)
        leaving.signal(signal.SIGTERM)
        assert leaving.proc is not None and leaving.proc.wait(timeout=30) == 0
        done_by_first = await _total(client, ref, at_least=0)
        [draining] = log_lines(leaving, "stopping: draining")
        # One nap runs at a time (none, if the signal came while one was committing).
        assert re.search(r"draining [01] running turns? on 1 shards", draining), draining
        left = int(re.search(r"(\d+) messages? read ahead left in Redis", draining).group(1))  # type: ignore[union-attr]
        assert left > 100, draining
        assert log_lines(leaving, "SIGTERM: stopping gracefully")
        assert done_by_first < 60, f"the drain ran {done_by_first} naps: it worked through the read-ahead"

        worker_at_info(redis_url, "--shards", "1")
        assert await eventually(lambda: _total(client, ref, at_least=200), timeout=60) == 200
        info = await client.store.shard_info(0)
        assert (info.pending, info.lag) == (0, 0)
        assert await client.ask(ref, Get(), timeout=30) == Total(total=200), "each nap once"


async def test_a_second_signal_stops_now_and_loses_nothing(
    worker_at_info: Callable[..., WorkerProcess], redis_url: str, connect: Callable[..., Any], tmp_path: Path
) -> None:
    leaving = worker_at_info(redis_url, "--shards", "1", "--grace", "600")
    async with connect(app=app, shards=1) as client:
        ref = Held.ref("stuck")
        await client.send(ref, Hold())
        await eventually(lambda: _held_starts(tmp_path) == 1, timeout=30)
        leaving.signal(signal.SIGINT)
        await eventually(lambda: log_lines(leaving, "stopping: draining 1 running turn"), timeout=30)
        leaving.signal(signal.SIGINT)
        assert leaving.proc is not None
        assert leaving.proc.wait(timeout=30) == 128 + signal.SIGINT, "stopped now, not after the grace"
        assert log_lines(leaving, "SIGINT again: stopping now")
        assert (await client.store.shard_info(0)).pending == 1, "its message is still in Redis"

        staying = worker_at_info(redis_url, "--shards", "1")
        await eventually(lambda: _held_starts(tmp_path) == 2, timeout=30)
        (tmp_path / "release").touch()
        state = await eventually(lambda: client.state(ref), timeout=30)
        assert state.total == 1
        assert staying.stop() == 0


async def test_processes_pass_each_signal_on(
    worker_at_info: Callable[..., WorkerProcess], redis_url: str, connect: Callable[..., Any], tmp_path: Path
) -> None:
    """With --processes 2, a Ctrl-C drains the children and a second one stops them now."""
    parent = worker_at_info(redis_url, "--shards", "2", "--processes", "2", "--grace", "600")
    async with connect(app=app, shards=2) as client:
        await client.send(Held.ref("p"), Hold())
        await eventually(lambda: _held_starts(tmp_path) == 1, timeout=30)
        parent.signal(signal.SIGINT)
        await eventually(lambda: log_lines(parent, "stopping: draining 1 running turn"), timeout=30)
        assert log_lines(parent, "SIGINT: stopping 2 worker processes gracefully")
        parent.signal(signal.SIGINT)
        assert parent.proc is not None and parent.proc.wait(timeout=30) == 0
        assert log_lines(parent, "SIGTERM again: stopping now")
        assert sum([(await client.store.shard_info(s)).pending for s in range(2)]) == 1


async def _total(client: actors.Client, ref: actors.ActorRef[Any], at_least: int) -> int | None:
    state = await client.state(ref)
    total = 0 if state is None else state.total
    return total if total >= at_least else None


def _held_starts(directory: Path) -> int:
    log = directory / "held.log"
    return (
        len([line for line in log.read_text().splitlines() if line.startswith("start")])
        if log.exists()
        else 0
    )


# ---- a drain keeps what its own turns wait for ------------------------------------------------------


class Answer(BaseModel):
    text: str = ""


class Slow(actors.Actor):
    class State(BaseModel):
        naps: int = 0

    async def on_nap(self, msg: Nap) -> None:
        await asyncio.sleep(msg.seconds)
        self.state.naps += 1

    async def on_answer(self, msg: Answer) -> Answer:
        return Answer(text=f"answered by {self.key}")


class Asker(actors.Actor):
    class State(BaseModel):
        got: str = ""

    async def on_answer(self, msg: Answer) -> None:
        self.state.got = (await self.ask(Slow.ref("s"), msg, timeout=120)).text


ASKING = actors.App(Slow, Asker)


async def test_a_drain_still_answers_the_asks_of_its_own_turns(
    redis_url: str, namespace: str, connect: Callable[..., Any]
) -> None:
    """One shard. Slow/s naps, an Asker's turn asks it (the ask waits, read ahead, behind the
    nap), and 30 naps of Slow/x (6 s) are read ahead too. On stop, the ask is answered and the
    Asker's turn commits during the drain; the naps of Slow/x are left to the next owner."""
    settings = WorkerSettings(shards=1, lease=actors.LeaseSettings(ttl=1.0, renew_interval=0.2))
    worker = Worker(ASKING, RedisSettings(url=redis_url, namespace=namespace), settings, shutdown_grace=60)
    running = asyncio.create_task(worker.run())
    await worker.ready.wait()
    async with connect(app=ASKING, shards=1) as client:
        await client.send(Slow.ref("s"), Nap(seconds=1.0))
        await client.send(Asker.ref("a"), Answer())
        await client.send_many([(Slow.ref("x"), Nap(seconds=0.2)) for _ in range(30)])
        await eventually(lambda: _ask_queued(worker), timeout=30)
        worker.stop()
        await asyncio.wait_for(running, timeout=50)  # well before the grace: the ask was answered
        assert (await client.state(Asker.ref("a"))).got == "answered by s"
        x = await client.state(Slow.ref("x"))
        assert x is None or x.naps < 5, "the naps read ahead were left to the next owner"

        successor = Worker(ASKING, RedisSettings(url=redis_url, namespace=namespace), settings)
        again = asyncio.create_task(successor.run())
        try:
            await client.wait_idle(timeout=120)
            assert (await client.state(Slow.ref("x"))).naps == 30
        finally:
            successor.stop()
            await again


def _ask_queued(worker: Worker) -> bool:
    for runner in worker.runners:
        act = runner.activations.get("Slow/s")
        if act is not None and any(q.envelope.type == "Answer" for q in act.queue):
            return True
    return False


async def test_a_graceful_drain_hands_its_read_ahead_over_as_fresh_messages(
    worker_at_info: Callable[..., WorkerProcess], redis_url: str, connect: Callable[..., Any]
) -> None:
    """The messages a drain leaves pending (read ahead, never started) are not recovered
    turns for the next owner: it counts no start of theirs (no ``deliveries`` field, two round
    trips each) and runs them as the fresh messages they are, each once."""
    leaving = worker_at_info(redis_url, "--shards", "1", "--grace", "30")
    async with connect(app=app, shards=1) as client:
        ref = Counter.ref("napper")
        await client.send_many([(ref, Nap(seconds=0.05)) for _ in range(100)])
        await eventually(lambda: _total(client, ref, at_least=3), timeout=30)
        leaving.signal(signal.SIGTERM)
        assert leaving.proc is not None and leaving.proc.wait(timeout=30) == 0
        assert (await client.store.shard_info(0)).pending > 20, "the drain left its read-ahead pending"

        worker_at_info(redis_url, "--shards", "1")
        deliveries, counted = client.store.keys.deliveries(0), 0
        while await _total(client, ref, at_least=0) < 100:
            counted = max(counted, await client.store.redis.hlen(deliveries))
            await asyncio.sleep(0.005)
        assert counted == 0, "the next owner counted the starts of messages no one had started"
        assert await client.ask(ref, Get(), timeout=30) == Total(total=100), "each nap once"

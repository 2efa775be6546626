"""Durable workflows across real crashes: SIGKILL inside and between steps, and a sleep
across a full stop of every worker and of Redis. Real processes, real signals."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import actors
from actors import EmbeddedServer

from .conftest import WorkerProcess, eventually
from .workflow_apps import Go, Nap, Pipeline, Sleeper, app, release

WORKFLOW_APP = "tests.workflow_apps:app"


def read_log(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


async def wait_for_line(
    path: Path, after: int, match: Callable[[list[str]], bool], timeout: float = 30
) -> int:
    """Index of the first line past ``after`` that ``match`` accepts."""

    def found() -> int | None:
        lines = read_log(path)
        return next((n for n in range(after, len(lines)) if match(lines[n])), None)

    return int(await eventually(lambda: found() is not None and found() + 1, timeout=timeout)) - 1


class Gates:
    """Follows steps.log (workflow_apps' gated steps): hands the test the token of the next
    start of the step it waits for, and releases every other step that starts meanwhile."""

    def __init__(self, log: Path, key: str) -> None:
        self.log, self.key, self.seen = log, key, 0

    def _scan(self, step: int | None) -> str | None:
        lines = read_log(self.log)
        while self.seen < len(lines):
            words = lines[self.seen]
            self.seen += 1
            if words[0] == "start" and words[1] == self.key:
                if step is not None and words[2] == str(step):
                    return words[3]
                release(self.log.parent, words[3])
        return None

    async def next_start(self, step: int) -> str:
        return str(await eventually(lambda: self._scan(step), timeout=30))

    def release_all(self) -> None:
        self._scan(None)


@pytest.mark.chaos
async def test_a_workflow_killed_inside_and_between_every_step_runs_each_completed_step_once(
    spawn_worker, connect, tmp_path
) -> None:
    """Each step waits, once started, until the test releases it: the first kill lands inside
    step i for certain, the second just after step i ended (before or after its journal write)."""
    steps_log = tmp_path / "steps.log"
    key = "wf"
    gates = Gates(steps_log, key)
    worker = spawn_worker(WORKFLOW_APP)

    journaled_at_kill: list[tuple[int, int]] = []  # (lines logged, steps journaled) per kill

    async def restart() -> WorkerProcess:
        worker.signal(signal.SIGKILL)
        worker.proc.wait()  # type: ignore[union-attr]
        view = await client.inspect(Pipeline.ref(key))  # nothing runs now: what Redis holds
        journal = view.turn.journal if view.turn is not None else []
        journaled_at_kill.append((len(read_log(steps_log)), len(journal)))
        return spawn_worker(WORKFLOW_APP)  # type: ignore[no-any-return]

    async with connect(app=app) as client:
        await client.send(Pipeline.ref(key), Go(steps=5, gate=True))
        for i in range(5):
            await gates.next_start(i)  # held: step i is running
            worker = await restart()
            assert journaled_at_kill[-1][1] == i, f"steps before step {i} were journaled before it began"
            token = await gates.next_start(i)  # its re-run by the new worker
            release(tmp_path, token)
            await wait_for_line(steps_log, 0, lambda w, i=i, t=token: w == ["end", key, str(i), t])
            worker = await restart()

        async def finished():  # type: ignore[no-untyped-def]
            gates.release_all()  # a step whose end was not journaled runs again
            return await _finished(client, key)

        state = await eventually(finished, timeout=60)
        assert state.finished == 1, "the turn committed exactly once"
        lines = read_log(steps_log)
        for i in range(5):
            starts = [n for n, w in enumerate(lines) if w[:3] == ["start", key, str(i)]]
            ends = {w[3]: n for n, w in enumerate(lines) if w[:3] == ["end", key, str(i)]}
            assert len(starts) >= 2, f"step {i} was killed inside, so it ran again"
            journaled = state.tokens[i]
            assert journaled in ends, f"step {i}'s result comes from a run that completed"
            assert all(n < ends[journaled] for n in starts), (
                f"step {i} never ran again after the run whose result was journaled"
            )
        for logged, journaled in journaled_at_kill:
            again = [w for w in lines[logged:] if w[:2] == ["start", key] and int(w[2]) < journaled]
            assert again == [], f"steps journaled before a kill ran again after it: {again}"
        view = await client.inspect(Pipeline.ref(key))
        assert view.turn is None and view.deferred == 0
    worker.stop()


async def _finished(client: actors.Client, key: str):  # type: ignore[no-untyped-def]
    state = await client.state(Pipeline.ref(key))
    return state if state is not None and state.finished else None


@pytest.fixture
def private_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.mark.chaos
@pytest.mark.single("its own server, stopped and restarted")
async def test_a_sleep_outlasts_a_full_stop_of_workers_and_redis_and_never_wakes_early(
    private_server: EmbeddedServer, spawn_worker, namespace: str
) -> None:
    url = private_server.url
    worker: WorkerProcess = spawn_worker(WORKFLOW_APP, url=url)
    refs = [Sleeper.ref(f"s{n}") for n in range(20)]
    async with actors.connect(url, namespace=namespace, app=app) as client:
        for ref in refs:
            await client.send(ref, Nap(seconds=2.0))
        await eventually(lambda: _all_sleeping(client, refs), timeout=20)

    worker.signal(signal.SIGKILL)
    worker.proc.wait()  # type: ignore[union-attr]
    private_server.stop()  # graceful: the AOF is flushed
    await asyncio.sleep(3.0)  # every due time passes while nothing runs
    assert private_server.start().url == url
    restarted_ms = int(time.time() * 1000)
    worker = spawn_worker(WORKFLOW_APP, url=url)
    async with actors.connect(url, namespace=namespace, app=app) as client:
        for ref in refs:
            state = await eventually(lambda ref=ref: _woke(client, ref), timeout=30)
            assert state.woke_at_ms - state.slept_from_ms >= 2000, "never before the due time"
            assert state.woke_at_ms >= restarted_ms
    worker.stop()


async def test_sleeps_under_load_never_wake_early(start_worker, connect) -> None:
    """Many short sleeps while other actors are busy: each wakes after its due time."""
    from .apps import Add, Counter
    from .apps import app as counter_app

    both = actors.App(*counter_app.actor_types, *app.actor_types)
    await start_worker(both)
    async with connect(app=both) as client:
        sleepers = [Sleeper.ref(f"load-{n}") for n in range(100)]
        for n, ref in enumerate(sleepers):
            await client.send(ref, Nap(seconds=0.5 + (n % 10) / 10))
        for _ in range(20):
            await client.send_many([(Counter.ref(f"c{n}"), Add()) for n in range(200)])
        for n, ref in enumerate(sleepers):
            state = await eventually(lambda ref=ref: _woke(client, ref), timeout=30)
            assert state.woke_at_ms - state.slept_from_ms >= 500 + (n % 10) * 100


async def _all_sleeping(client: actors.Client, refs: list[actors.ActorRef]) -> bool:  # type: ignore[type-arg]
    for ref in refs:
        view = await client.inspect(ref)
        if view.turn is None or view.turn.status != "sleeping":
            return False
    return True


async def _woke(client: actors.Client, ref: actors.ActorRef):  # type: ignore[no-untyped-def, type-arg]
    state = await client.state(ref)
    return state if state is not None and state.woke_at_ms else None

"""Two apps on one server: a worker refuses a namespace that live workers of another app serve
(its shards would dead-letter their messages as 'unknown actor type'); apps in their own
namespaces run side by side; a new version that adds a type joins its old one."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import actors
from actors import ConfigurationError

from .apps import Add, Counter, Get, Total, app
from .conftest import ROOT, WorkerProcess, eventually
from .sharing_apps import Greeter, Greeting, Hello, greeters, greeters_v2
from .test_server_checks import readme_quick_start

COUNTERS = "tests.apps:app"
GREETERS = "tests.sharing_apps:greeters"
GREETERS_V2 = "tests.sharing_apps:greeters_v2"


async def _live(client: actors.Client, count: int) -> bool:
    return len(await client.store.live_workers()) == count


async def _exit_code(proc: WorkerProcess, timeout: float = 60.0) -> int:
    assert proc.proc is not None
    return await asyncio.to_thread(proc.proc.wait, timeout)


def _error_lines(proc: WorkerProcess) -> list[str]:
    return [line for line in proc.log.read_text().splitlines() if line.strip()]


async def _dead_letters(client: actors.Client) -> int:
    return sum([(await client.store.shard_info(s)).dead_letters for s in range(client.shards)])


async def test_a_worker_of_another_app_refuses_the_namespace_in_one_line(
    spawn_worker: Callable[..., WorkerProcess], connect: Callable[..., Any]
) -> None:
    counters = spawn_worker(COUNTERS)
    async with connect(app=app) as client:
        await eventually(lambda: _live(client, 1), timeout=30)
        intruder = spawn_worker(GREETERS)
        assert await _exit_code(intruder) != 0, "the second app must not start"
        lines = _error_lines(intruder)
        assert len(lines) == 1, lines
        line = lines[0]
        assert line.startswith("error: "), line
        assert "tests.apps" in line and "tests.sharing_apps" in line, "names both apps"
        assert "Counter" in line and "--namespace" in line, line
        assert "Traceback" not in intruder.log.read_text()

        # The first app never saw it: every message of its types is handled, none dead-lettered.
        for n in range(40):
            await client.send(Counter.ref(f"k{n}"), Add(by=1))
        for n in range(40):
            assert await client.ask(Counter.ref(f"k{n}"), Get(), timeout=20) == Total(total=1)
        assert await _dead_letters(client) == 0
        assert await _live(client, 1)
    assert counters.proc is not None and counters.proc.poll() is None


async def test_an_app_with_fewer_types_refuses_a_namespace_served_with_more(
    spawn_worker: Callable[..., WorkerProcess], connect: Callable[..., Any]
) -> None:
    """The order reversed: the app with more types runs first (the Quick start started
    beside your own app's workers)."""
    spawn_worker(GREETERS_V2)
    async with connect(app=greeters_v2) as client:
        await eventually(lambda: _live(client, 1), timeout=30)
        other = spawn_worker(COUNTERS)
        assert await _exit_code(other) != 0
        [line] = _error_lines(other)
        assert "Farewell" in line and "Greeter" in line and "--namespace" in line, line


async def test_two_apps_in_their_own_namespaces_run_side_by_side(
    spawn_worker: Callable[..., WorkerProcess], connect: Callable[..., Any], namespace: str
) -> None:
    spawn_worker(COUNTERS)
    spawn_worker(GREETERS, "--namespace", f"{namespace}-greet")
    async with connect(app=app) as counters, connect(app=greeters, namespace=f"{namespace}-greet") as greet:
        await counters.send(Counter.ref("c"), Add(by=1))
        assert await counters.ask(Counter.ref("c"), Get(), timeout=30) == Total(total=1)
        assert await greet.ask(Greeter.ref("g"), Hello(name="ann"), timeout=30) == Greeting(text="hello, ann")
        assert await _live(counters, 1) and await _live(greet, 1)


async def test_a_new_version_that_adds_a_type_joins_and_one_that_drops_it_needs_the_flag(
    spawn_worker: Callable[..., WorkerProcess], connect: Callable[..., Any]
) -> None:
    """A rolling upgrade: version 2 (one more type, same app) starts beside version 1. A
    version 1 process started while version 2 runs would dead-letter Farewell's messages:
    refused, unless --rolling-upgrade says this is on purpose (a rollback)."""
    spawn_worker(GREETERS)
    async with connect(app=greeters_v2) as client:
        await eventually(lambda: _live(client, 1), timeout=30)
        spawn_worker(GREETERS_V2)
        await eventually(lambda: _live(client, 2), timeout=30)

        old = spawn_worker(GREETERS)
        assert await _exit_code(old) != 0
        [line] = _error_lines(old)
        assert "Farewell" in line and "--rolling-upgrade" in line, line

        rollback = spawn_worker(GREETERS, "--rolling-upgrade")
        await eventually(lambda: _live(client, 3), timeout=30)
        assert rollback.proc is not None and rollback.proc.poll() is None
        assert await client.ask(Greeter.ref("g"), Hello(), timeout=30) == Greeting(text="hello, world")


async def test_an_in_process_worker_of_another_app_raises_configuration_error(
    start_worker: Callable[..., Any],
) -> None:
    await start_worker(app)
    with pytest.raises(ConfigurationError, match="--namespace"):
        await start_worker(greeters)
    await start_worker(app)  # the same app again is welcome


async def test_the_quick_start_beside_another_app_stops_with_the_reason_instead_of_hanging(
    spawn_worker: Callable[..., WorkerProcess],
    connect: Callable[..., Any],
    redis_url: str,
    namespace: str,
    tmp_path: Path,
) -> None:
    """``await worker.ready.wait()`` raises the worker's startup error: the README's Quick start
    run where another app's workers live exits with it (it waited for ever before)."""
    spawn_worker(GREETERS)
    async with connect(app=greeters) as client:
        await eventually(lambda: _live(client, 1), timeout=30)
    script = tmp_path / "quick_start.py"
    script.write_text(readme_quick_start())
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACTORS_")}
    env.update(ACTORS_REDIS_URL=redis_url, ACTORS_NAMESPACE=namespace, PYTHONPATH=str(ROOT))
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("actors.errors.ConfigurationError: namespace"), result.stderr
    assert "tests.sharing_apps" in last and "quick_start" in last and "--namespace" in last, last

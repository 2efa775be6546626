"""Fixtures: a real Valkey/Redis server per test session (loopback, temp dir), a fresh
namespace per test, in-process workers and real worker processes. No fakes."""

from __future__ import annotations

import asyncio
import compileall
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis.asyncio
from redis.asyncio.cluster import RedisCluster

import actors
from actors import App, EmbeddedServer, RedisSettings, Worker, WorkerSettings
from actors.cluster_server import LocalCluster
from actors.store.cluster import seed_url

ROOT = Path(__file__).resolve().parent.parent

TEARDOWN_GRACE = 0.5
"""Seconds an in-process worker still running at the end of its test drains before it stops."""


def pytest_sessionstart(session: pytest.Session) -> None:
    if "PYTEST_XDIST_WORKER" not in os.environ:  # once, before any worker process starts
        compile_sources()


def compile_sources() -> None:
    """Write the bytecode of the project's modules (to ``__pycache__``, which git ignores).
    With PYTHONDONTWRITEBYTECODE set (as on this machine, in CI and in the Docker image)
    Python writes none itself, so each of the hundreds of processes the tests start (CLI
    commands, workers, benchmarks) would compile the whole package again: a quarter of its
    start-up."""
    for folder in ("actors", "tests", "benchmarks", "examples"):
        compileall.compile_dir(ROOT / folder, quiet=1)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


CLUSTER_MODULES = {"test_core", "test_workflows", "test_limits"}
"""Modules whose tests run against a cluster as well as a single server. ``ACTORS_TEST_CLUSTER=all``
runs every test that takes ``redis_url`` on both (a longer run than CI's)."""


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "redis_url" not in metafunc.fixturenames:
        return
    module = metafunc.module.__name__.rpartition(".")[2]
    both = module in CLUSTER_MODULES or os.environ.get("ACTORS_TEST_CLUSTER") == "all"
    if metafunc.definition.get_closest_marker("cluster") is not None:
        backends = ["cluster"]
    elif metafunc.definition.get_closest_marker("single") is not None:
        backends = ["single"]  # single-server by nature (its reason is the marker's argument)
    else:
        backends = ["single", "cluster"] if both else ["single"]
    metafunc.parametrize("backend", backends, indirect=True)


def raw_redis(url: str) -> redis.asyncio.Redis:
    """A plain client for a test's own Redis calls: a cluster client for a cluster URL (a
    ``redis+cluster://`` URL is refused by ``Redis.from_url``), else a one-server client. Use it
    as ``async with raw_redis(url) as r`` or close it with ``aclose()``."""
    if (seed := seed_url(url)) is None:
        return redis.asyncio.Redis.from_url(url)
    # Typed as the one-server client, as the store does (the commands the tests use are shared).
    return cast(redis.asyncio.Redis, RedisCluster.from_url(seed))


async def raw_redis_of(url: str, key: str) -> redis.asyncio.Redis:
    """A one-server client to the server that holds ``key``: the server itself, or the primary of
    its slot on a cluster. A transaction there may mix ``key`` with keyless commands (``TIME``),
    which a cluster client refuses: a test that reads Redis's clock and a key at one instant."""
    if (seed := seed_url(url)) is None:
        return redis.asyncio.Redis.from_url(url)
    async with RedisCluster.from_url(seed) as cluster:
        await cluster.initialize()
        node = cluster.get_node_from_key(key)
    assert node is not None, f"no node serves {key!r}"
    parts = urlsplit(seed)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@{node.host}:{node.port}" if credentials else f"{node.host}:{node.port}"
    return redis.asyncio.Redis.from_url(urlunsplit(parts._replace(netloc=netloc)))


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A real 3 + 3 cluster from the shipped server binary, started once, when first asked for."""
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", "single"))


@pytest.fixture
def redis_url(backend: str, request: pytest.FixtureRequest) -> str:
    if backend == "cluster":
        cluster: LocalCluster = request.getfixturevalue("redis_cluster")
        return cluster.url
    server: EmbeddedServer = request.getfixturevalue("redis_server")
    return server.url


@pytest.fixture
def namespace() -> str:
    """A fresh key prefix per test, so tests sharing the server never see each other."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def fast_settings() -> WorkerSettings:
    return WorkerSettings(
        shards=4,
        lease=actors.LeaseSettings(ttl=1.0, renew_interval=0.2),
        retry=actors.RetrySettings(max_attempts=3, backoff=0.01),
    )


@pytest.fixture
async def connect(redis_url: str, namespace: str) -> AsyncIterator[Callable[..., Any]]:
    """Factory: ``async with connect(app=...) as client`` on the test's namespace."""

    def factory(**kwargs: Any) -> Any:
        kwargs.setdefault("namespace", namespace)
        return actors.connect(redis_url, **kwargs)

    yield factory


@pytest.fixture
async def start_worker(
    redis_url: str, namespace: str, fast_settings: WorkerSettings
) -> AsyncIterator[Callable[..., Any]]:
    """Factory: start an in-process Worker (ready when returned); all are stopped at teardown."""
    running: list[tuple[Worker, asyncio.Task[None]]] = []

    async def factory(app: App, settings: WorkerSettings | None = None, url: str | None = None) -> Worker:
        worker = Worker(
            app, RedisSettings(url=url or redis_url, namespace=namespace), settings or fast_settings
        )
        task = asyncio.create_task(worker.run())
        running.append((worker, task))
        ready = asyncio.create_task(worker.ready.wait())
        await asyncio.wait({ready, task}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
        if ready.done() and ready.exception() is not None:  # it refused to start: its error, once
            await asyncio.wait({task}, timeout=20)  # it has cleaned up
        if task.done():
            ready.cancel()
            task.result()  # raises the worker's startup error
        return worker

    yield factory
    for worker, _ in running:
        # Clean-up, not part of the test: a turn that is still running (a hung one, a long
        # sleep) need not be given the default grace of 10 s before it is abandoned.
        worker.shutdown_grace = min(worker.shutdown_grace, TEARDOWN_GRACE)
        worker.stop()
    for _, task in running:
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=20)


class WorkerProcess:
    """A real ``actors worker`` process that the test started (and may kill)."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.argv, self.env, self.log = argv, env, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=ROOT, stdout=out, stderr=out)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
        return self.proc.wait(timeout)


@pytest.fixture
def spawn_worker(redis_url: str, namespace: str, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Factory: start ``actors worker APP`` as a real process on the test's namespace."""
    procs: list[WorkerProcess] = []

    def factory(
        app: str = "tests.apps:app", *extra: str, url: str | None = None, log_level: str = "WARNING"
    ) -> WorkerProcess:
        argv = [sys.executable, "-m", "actors.cli", "--log-level", log_level, "worker", app,
                "--redis", url or redis_url, "--namespace", namespace,
                "--lease-ttl", "1.0", "--renew-interval", "0.2", *extra]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT), "ACTORS_TEST_DIR": str(tmp_path)}
        proc = WorkerProcess(argv, env, tmp_path / f"worker-{len(procs)}.log").start()
        procs.append(proc)
        return proc

    yield factory
    for proc in procs:
        proc.kill()


async def eventually(check: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Poll an async or sync ``check`` until it returns a truthy value."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {result!r})")
        await asyncio.sleep(interval)


HEAVY = ("test_chaos.py", "test_workflow_chaos.py", "test_benchmarks.py", "test_many_shards.py")
"""Modules whose tests each load the machine (many processes, or a process with 1,024 shards
on the default lease timing): `./dev test` (pytest-xdist, --dist loadgroup) runs them one at
a time on one of its processes, beside the lighter tests on the others."""


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in HEAVY:
            item.add_marker(pytest.mark.xdist_group("heavy"))


def unused_port() -> int:
    """A loopback port that is free now and that a test binds later (a server started after
    its clients, a health endpoint). Taken below the kernel's range for outgoing connections:
    a port from that range, free now, may meanwhile become the local end of a connection of
    some other process (with the tests running in parallel there are many)."""
    low = _outgoing_ports_from()
    for _ in range(200):
        port = random.randrange(10_000, low) if low > 10_000 else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError("no free loopback port")


def _outgoing_ports_from() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default

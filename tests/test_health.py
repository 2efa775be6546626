"""``actors worker --health-port PORT``: /livez and /readyz from the worker's own state, asked
of real worker processes over HTTP on loopback (as the kubelet asks them in a pod)."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from actors import EmbeddedServer

from .apps import Held, Hold
from .apps import app as held_app
from .conftest import ROOT, eventually, unused_port
from .fenced_apps import Block, Blocker
from .fenced_apps import app as blocker_app


def free_port() -> int:
    return unused_port()


def health_args(port: int) -> list[str]:
    return ["--health-port", str(port), "--health-host", "127.0.0.1"]


async def probe(port: int, path: str) -> tuple[int, str] | None:
    """The status and body of ``GET path``; None if nothing answered (refused, or silent for 5 s)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), 5)
    except (OSError, TimeoutError):
        return None
    finally:
        writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


async def answers(port: int, path: str, status: int) -> str | None:
    """The body, once ``GET path`` answers ``status`` (for ``eventually``)."""
    got = await probe(port, path)
    return got[1] if got is not None and got[0] == status else None


def held_started(tmp_path: Path) -> bool:
    log = tmp_path / "held.log"
    return log.exists() and "start" in log.read_text()


@pytest.mark.chaos
async def test_a_worker_is_ready_once_registered_and_not_ready_while_it_drains(
    spawn_worker, connect, tmp_path
) -> None:
    port = free_port()
    worker = spawn_worker("tests.apps:app", *health_args(port), "--grace", "60")
    body = await eventually(lambda: answers(port, "/readyz", 200), timeout=30)
    assert "shards" in body, body
    assert await answers(port, "/livez", 200) is not None
    missing = await probe(port, "/metrics")
    assert missing is not None and missing[0] == 404

    async with connect(app=held_app) as client:
        await client.send(Held.ref("h"), Hold())
        await eventually(lambda: held_started(tmp_path))
        worker.signal(signal.SIGTERM)
        body = await eventually(lambda: answers(port, "/readyz", 503))
        assert "draining" in body, body
        assert worker.proc is not None and worker.proc.poll() is None, "still draining the held turn"
        assert await answers(port, "/livez", 200) is not None, "a draining worker is live"
        (tmp_path / "release").touch()
        assert worker.proc.wait(30) == 0


@pytest.mark.chaos
async def test_a_worker_whose_event_loop_is_blocked_is_not_live(spawn_worker, connect) -> None:
    port = free_port()
    worker = spawn_worker("tests.fenced_apps:app", *health_args(port), "--stall-limit", "1.0")
    await eventually(lambda: answers(port, "/readyz", 200), timeout=30)
    assert await answers(port, "/livez", 200) is not None
    async with connect(app=blocker_app) as client:
        await client.send(Blocker.ref("b"), Block(seconds=8.0))
        body = await eventually(lambda: answers(port, "/livez", 503), timeout=8)
        assert "event loop has not run" in body, body
        assert await answers(port, "/readyz", 503) is not None, "a stuck worker is not ready either"
    assert worker.stop(timeout=30) == 0


@pytest.mark.chaos
async def test_processes_n_answer_for_every_process(spawn_worker, connect, tmp_path) -> None:
    """With --processes N the parent answers: ready once every process is, not ready while
    they drain, not live while one of them is stuck."""
    port = free_port()
    args = [*health_args(port), "--processes", "2", "--stall-limit", "1.0", "--grace", "60"]
    worker = spawn_worker("tests.fenced_apps:app", *args)
    body = await eventually(lambda: answers(port, "/readyz", 200), timeout=30)
    assert body.count("shards") == 2, body
    async with connect(app=blocker_app) as client:
        await client.send(Blocker.ref("b"), Block(seconds=3.0))
        body = await eventually(lambda: answers(port, "/livez", 503), timeout=6)
        assert "event loop has not run" in body, body
    await eventually(lambda: answers(port, "/readyz", 200), timeout=30)
    assert worker.stop(timeout=30) == 0

    drained = spawn_worker("tests.apps:app", *args)
    await eventually(lambda: answers(port, "/readyz", 200), timeout=30)
    async with connect(app=held_app) as client:
        await client.send(Held.ref("h"), Hold())
        await eventually(lambda: held_started(tmp_path))
        drained.signal(signal.SIGTERM)
        body = await eventually(lambda: answers(port, "/readyz", 503))
        assert "draining" in body, body
        assert await answers(port, "/livez", 200) is not None
        (tmp_path / "release").touch()
        assert drained.proc is not None and drained.proc.wait(30) == 0


@pytest.mark.chaos
async def test_a_worker_that_cannot_reach_redis_is_live_but_not_ready(spawn_worker, tmp_path) -> None:
    server = EmbeddedServer(tmp_path / "redis").start()
    try:
        port = free_port()
        spawn_worker("tests.apps:app", *health_args(port), "--stall-limit", "1.0", url=server.url)
        await eventually(lambda: answers(port, "/readyz", 200), timeout=30)
        server.stop()
        body = await eventually(lambda: answers(port, "/readyz", 503))
        assert "no successful heartbeat" in body, body
        assert await answers(port, "/livez", 200) is not None, "restarting the worker would not help"
        assert server.start().url
        await eventually(lambda: answers(port, "/readyz", 200), timeout=30)
    finally:
        server.stop()


def test_a_health_port_in_use_is_a_clear_error(redis_url: str, namespace: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for processes in ("1", "2"):
            result = subprocess.run(
                [sys.executable, "-m", "actors.cli", "worker", "tests.apps:app", "--redis", redis_url,
                 "--namespace", namespace, "--processes", processes, *health_args(port)],
                cwd=ROOT, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert result.returncode == 1, result.stderr
            assert f"--health-port {port}" in result.stderr, result.stderr
            assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("port", ["0", "65536", "http"])
def test_a_bad_health_port_is_refused_before_anything_starts(port: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "actors.cli", "worker", "tests.apps:app", "--health-port", port],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and "--health-port: must be a port" in result.stderr, result.stderr

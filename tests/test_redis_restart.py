"""Workers survive a Redis restart (AOF) and connection drops, and carry on."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

import actors
from actors import EmbeddedServer

from .apps import Add, Counter, Get, Total, app
from .conftest import eventually


@pytest.fixture
def private_server(tmp_path) -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.mark.single("its own server, restarted (a cluster's failover: test_cluster)")
async def test_worker_carries_on_after_redis_restarts(private_server, start_worker, namespace) -> None:
    url = private_server.url
    await start_worker(app, url=url)
    async with actors.connect(url, namespace=namespace, app=app) as client:
        for _ in range(50):
            await client.send(Counter.ref("r"), Add())
        assert await client.ask(Counter.ref("r"), Get(), timeout=10) == Total(total=50)

        private_server.stop()  # graceful: the AOF is flushed
        await asyncio.sleep(0.5)
        assert private_server.start().url == url, "same directory, same port"

        async def accepted() -> bool:
            try:
                await client.send(Counter.ref("r"), Add())
            except Exception:
                return False
            return True

        await eventually(accepted, timeout=20, interval=0.2)
        for _ in range(49):
            await client.send(Counter.ref("r"), Add())

        async def answered() -> Total | None:
            try:
                return await client.ask(Counter.ref("r"), Get(), timeout=2)
            except Exception:
                return None

        assert await eventually(answered, timeout=30, interval=0.2) == Total(total=100)

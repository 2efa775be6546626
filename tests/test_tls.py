"""A worker and a client over mutual TLS (``rediss://`` with the CA and a client certificate in
the URL), against a real server started with certificates made by the test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

import actors

from .apps import Add, Counter, Get, Total, app
from .conftest import WorkerProcess
from .test_doctor import lines_by_check, run_doctor
from .tls import TlsServer, Unavailable, tls_server

COUNTERS = "tests.apps:app"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    try:
        with tls_server(Path(tmp_path_factory.mktemp("tls"))) as server:
            yield server
    except Unavailable as why:
        pytest.skip(str(why))


@pytest.mark.single("its own TLS server")
async def test_a_worker_and_a_client_run_a_message_over_mutual_tls(
    tls: TlsServer, spawn_worker: Callable[..., WorkerProcess], namespace: str
) -> None:
    worker = spawn_worker(COUNTERS, url=tls.url())
    async with actors.connect(tls.url(), namespace=namespace, app=app) as client:
        await client.send(Counter.ref("tls"), Add(by=5))
        assert await client.ask(Counter.ref("tls"), Get(), timeout=30) == Total(total=5)
        assert await client.state(Counter.ref("tls")) is not None
        [worker_id] = await client.store.live_workers()
    assert worker.proc is not None and worker.proc.poll() is None, worker.log.read_text()
    assert "Traceback" not in worker.log.read_text()
    assert worker_id


async def test_the_server_refuses_a_client_without_its_certificate(tls: TlsServer, namespace: str) -> None:
    """The test server really requires client certificates: the URL's are what let them in."""
    with pytest.raises(redis.exceptions.ConnectionError):
        async with actors.connect(tls.url(client_cert=False), namespace=namespace):
            pass


async def test_doctor_over_tls_says_the_certificate_is_checked(tls: TlsServer, namespace: str) -> None:
    result = await run_doctor("--redis", tls.url(), "--namespace", namespace)
    level, text = lines_by_check(result)["tls"]
    assert level == "ok" and "rediss://" in text and str(tls.certs.ca) in text, text

"""Durability per namespace, on real servers: the level recorded once; ``fsync`` refused by a
server that cannot give it; every acknowledged write followed on its own connection by
WAITAOF (``fsync``) and nothing added by ``everysec``; with ``replica``, a send or an ask
answered only once a replica has it, a typed error rather than a hang without one, and
nothing acknowledged lost when the primary dies and its replica takes over."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from pydantic import BaseModel

import actors
from actors import ConfigurationError, EmbeddedServer, RedisSettings, Worker
from actors.cli import parser
from actors.cli_worker import _child_argv
from actors.codec import decode_envelope
from actors.errors import DurabilityTimeout
from actors.server_files import find_binary

from .apps import Add, Counter, Get, Mirror, Tally, Total
from .apps import app as counter_app
from .conftest import ROOT, WorkerProcess, eventually


# ---- actors of the in-process tests ------------------------------------------------------------
class Open(BaseModel):
    pass


class Gate(actors.Actor):
    """Answers an Open once the test lets it (``GATE``), so the test can act mid-turn."""

    async def on_open(self, msg: Open) -> Total:
        GATE.entered.set()
        await GATE.go.wait()
        return Total(total=1)


class _Gate:
    entered: asyncio.Event
    go: asyncio.Event


GATE = _Gate()
gate_app = actors.App(Gate, Counter, Mirror, Tally, limiters=[actors.Limiter("q", concurrency=2)])


# ---- servers ---------------------------------------------------------------------------------
@pytest.fixture
def always_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A private server that fsyncs its AOF before it answers (``appendfsync always``)."""
    server = EmbeddedServer(tmp_path / "always", appendfsync="always").start()
    yield server
    _end(server)


@pytest.fixture
async def replicated(tmp_path: Path) -> AsyncIterator[tuple[EmbeddedServer, EmbeddedServer]]:
    """A primary and a replica of it, the replication link up."""
    primary = EmbeddedServer(tmp_path / "primary").start()
    replica = EmbeddedServer(tmp_path / "replica").start()
    try:
        await follow(replica, primary)
        yield primary, replica
    finally:
        _end(replica)
        _end(primary)


async def follow(replica: EmbeddedServer, primary: EmbeddedServer) -> None:
    """Make ``replica`` a replica of ``primary`` and wait until it has synced."""
    p = aioredis.Redis.from_url(primary.url)
    try:
        await p.config_set("repl-diskless-sync-delay", 0)  # sync now, not after 5 s waiting for more
    finally:
        await p.aclose()
    r = aioredis.Redis.from_url(replica.url)
    try:
        await r.config_set("masterauth", primary.password)
        await r.replicaof("127.0.0.1", primary.port)

        async def synced() -> bool:
            info = await r.info("replication")
            return bool(info.get("master_link_status") == "up" and not info.get("master_sync_in_progress"))

        await eventually(synced, timeout=30)
    finally:
        await r.aclose()
    p = aioredis.Redis.from_url(primary.url)
    try:

        async def online() -> bool:
            info = await p.info("replication")
            return any(str(v).find("online") >= 0 for k, v in info.items() if k.startswith("slave"))

        await eventually(online, timeout=30)
    finally:
        await p.aclose()


def _end(server: EmbeddedServer) -> None:
    with contextlib.suppress(ProcessLookupError):
        if server.pid:
            os.kill(server.pid, signal.SIGCONT)
    with contextlib.suppress(actors.ServerError):
        server.stop()


@contextlib.contextmanager
def raw_server(tmp_path: Path, *options: str) -> Iterator[str]:
    """A server with ``options`` the embedded one does not take (no password); yields its URL."""
    port = _free_port()
    data = tmp_path / f"raw-{port}"
    data.mkdir()
    argv = [find_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--save", "",
            "--daemonize", "no", *options]  # fmt: skip
    with open(data / "log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _answers(port):
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(15)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


# ---- the level is the namespace's --------------------------------------------------------------
async def test_the_level_is_recorded_once_and_another_one_is_refused(
    redis_url: str, namespace: str, start_worker: Callable[..., Any]
) -> None:
    async with actors.connect(redis_url, namespace=namespace, durability="replica") as client:
        assert client.durability == "replica"
    async with actors.connect(redis_url, namespace=namespace) as client:  # no level: the record's
        assert client.durability == "replica"
        assert await client.store.redis.hget(client.store.keys.meta(), "durability") == b"replica"
    with pytest.raises(ConfigurationError, match=r"records durability 'replica'.*--durability replica"):
        async with actors.connect(redis_url, namespace=namespace, durability="everysec"):
            pass
    worker = Worker(counter_app, RedisSettings(url=redis_url, namespace=namespace, durability="everysec"))
    with pytest.raises(ConfigurationError, match="records durability 'replica'"):
        await asyncio.wait_for(worker.run(), 30)


async def test_a_namespace_records_everysec_by_default_and_adds_no_wait(
    redis_url: str, namespace: str
) -> None:
    async with actors.connect(redis_url, namespace=namespace) as client:
        assert client.durability == "everysec" and not client.store.ack.waits
        assert await client.store.redis.hget(client.store.keys.meta(), "durability") == b"everysec"


async def test_the_cli_refuses_another_level_and_passes_its_own_to_worker_children(
    redis_url: str, namespace: str
) -> None:
    async with actors.connect(redis_url, namespace=namespace, durability="everysec"):
        pass
    argv = [sys.executable, "-m", "actors.cli", "send", "Counter/a", "Add", "{}", "--app", "tests.apps:app",
            "--redis", redis_url, "--namespace", namespace, "--durability", "replica"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = await asyncio.to_thread(
        subprocess.run, argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=90
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "records durability 'everysec'" in result.stderr
    args = parser().parse_args(["worker", "tests.apps:app", "--processes", "2", "--durability", "fsync"])
    assert _child_argv(args)[-2:] == ["--durability", "fsync"]


async def test_fsync_is_refused_by_a_server_that_fsyncs_every_second(redis_url: str, namespace: str) -> None:
    """With ``appendfsync everysec`` this Valkey answers WAITAOF before the fsync (see
    ``DurabilityStore._check_fsync``): the level is refused, and nothing is recorded."""
    with pytest.raises(ConfigurationError, match="appendfsync always"):
        async with actors.connect(redis_url, namespace=namespace, durability="fsync"):
            pass
    async with actors.connect(redis_url, namespace=namespace) as client:
        assert client.durability == "everysec"


async def test_fsync_is_refused_without_waitaof_or_without_aof(tmp_path: Path, namespace: str) -> None:
    with raw_server(tmp_path, "--appendonly", "yes", "--rename-command", "WAITAOF", "") as url:
        with pytest.raises(ConfigurationError, match=r"needs WAITAOF \(Redis or Valkey 7.2 or newer\)"):
            async with actors.connect(url, namespace=namespace, durability="fsync"):
                pass
    with raw_server(tmp_path, "--appendonly", "no") as url:
        with pytest.raises(ConfigurationError, match="needs the server's AOF"):
            async with actors.connect(url, namespace=namespace, durability="fsync"):
                pass


# ---- fsync: WAITAOF after each acknowledged write, on its connection ------------------------------
ACKNOWLEDGED_SCRIPTS = ("commit", "enqueue_once", "queue_enqueue", "replay_dead_letter")


async def _workload(client: actors.Client) -> None:
    """Every kind of write that tells someone it happened: sends of every kind, asks (commits
    with replies), a turn's cross-shard sends, an enqueue, a cancel, a dead letter replayed."""
    await client.send(Counter.ref("a"), Add(by=1))
    await client.send(Counter.ref("a"), Add(by=2), idempotency_key="k1")
    await client.send_many([(Mirror.ref(f"m-{i}"), Add(by=1)) for i in range(20)])
    assert await client.ask(Counter.ref("a"), Get(), timeout=20) == Total(total=3)
    assert await client.ask(Counter.ref("b"), Get(), timeout=20, idempotency_key="k2") == Total(total=0)
    await client.enqueue("q", Counter.ref("c"), Add(by=5))
    await client.cancel(Counter.ref("a"))
    await eventually(lambda: _total(client, Counter.ref("c"), 5))
    await eventually(lambda: _tallied(client, 20))
    await client.store.append(0, b"not an envelope")  # dead-lettered as undecodable, then replayed
    dead = await eventually(lambda: client.store.dead_letters(0, 1))
    assert await client.store.replay_dead_letter(0, dead[0].id)


async def _total(client: actors.Client, ref: Any, total: int) -> bool:
    state = await client.state(ref)
    return state is not None and state.total == total


async def _tallied(client: actors.Client, total: int) -> bool:
    states = [await client.state(Tally.ref(f"tally-{i}")) for i in range(7)]
    return sum(s.total for s in states if s is not None) == total


async def _monitored(url: str, body: Callable[[], Any]) -> list[tuple[str, str, str]]:
    """Run ``body`` while MONITOR records every command: (connection, command, first argument)."""
    seen: list[tuple[str, str, str]] = []
    r = aioredis.Redis.from_url(url)

    async def watch(monitor: Any) -> None:
        async for info in monitor.listen():
            if info["client_type"] == "lua":
                continue
            command, _, rest = info["command"].partition(" ")
            conn = f"{info['client_address']}:{info['client_port']}"
            seen.append((conn, command.upper(), rest.partition(" ")[0]))

    try:
        async with r.monitor() as monitor:
            task = asyncio.create_task(watch(monitor))
            try:
                await body()
                await asyncio.sleep(0.5)  # the last commands reach the monitor
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
    finally:
        await r.aclose()
    return seen


@pytest.mark.single("its own appendfsync-always server, watched by MONITOR")
async def test_fsync_waits_for_waitaof_after_every_acknowledged_write_on_its_connection(
    always_server: EmbeddedServer, namespace: str, start_worker: Callable[..., Any]
) -> None:
    url = always_server.url
    async with actors.connect(url, namespace=namespace, app=gate_app, shards=4, durability="fsync") as client:
        shas = {client.store._scripts[name].sha for name in ACKNOWLEDGED_SCRIPTS}
        await start_worker(gate_app, url=url)
        seen = await _monitored(url, lambda: _workload(client))

    acknowledged = waited = 0
    pending: dict[str, str] = {}
    for conn, command, first in seen:
        if command == "XADD" or (command == "EVALSHA" and first in shas):
            pending[conn] = command
            acknowledged += 1
        elif command == "WAITAOF":
            waited += 1
            pending.pop(conn, None)
        else:
            assert conn not in pending, (
                f"{conn}: {command} after an acknowledged {pending[conn]}, before WAITAOF"
            )
    assert not pending, f"acknowledged writes never followed by WAITAOF: {pending}"
    assert acknowledged >= 10 and waited >= 8, (acknowledged, waited)
    assert any(c == "EVALSHA" for _, c, _ in seen) and not any(c == "WAIT" for _, c, _ in seen)


@pytest.mark.single("MONITOR of the one server")
async def test_everysec_adds_no_wait_to_any_write(
    redis_server: EmbeddedServer, namespace: str, start_worker: Callable[..., Any]
) -> None:
    url = redis_server.url
    async with actors.connect(url, namespace=namespace, app=gate_app, shards=4) as client:
        await start_worker(gate_app, url=url)
        seen = await _monitored(url, lambda: _workload(client))
    commands = {command for _, command, _ in seen}
    assert "XADD" in commands and "EVALSHA" in commands
    assert not commands & {"WAIT", "WAITAOF"}, "the default level must add nothing"


@pytest.mark.chaos
@pytest.mark.single("its own appendfsync-always server, SIGKILLed")
async def test_with_fsync_a_server_crash_loses_nothing_acknowledged(
    always_server: EmbeddedServer, spawn_worker: Callable[..., WorkerProcess], namespace: str
) -> None:
    url = always_server.url
    async with actors.connect(url, namespace=namespace, app=counter_app, durability="fsync") as client:
        worker = spawn_worker(url=url)
        acked = await _send_for(client, 1.5)
        always_server.kill()
    assert always_server.start().url == url
    await _every_acknowledged_handled_once(url, namespace, acked)
    worker.stop()


# ---- replica ----------------------------------------------------------------------------------
async def test_a_send_returns_only_once_a_replica_has_it(
    replicated: tuple[EmbeddedServer, EmbeddedServer], namespace: str
) -> None:
    primary, replica = replicated
    async with actors.connect(
        primary.url, namespace=namespace, app=counter_app, durability="replica", durability_timeout=60
    ) as client:
        await client.send(Counter.ref("warm"), Add())
        os.kill(replica.pid, signal.SIGSTOP)
        try:
            sending = asyncio.create_task(client.send(Counter.ref("k"), Add(by=7)))
            await asyncio.sleep(0.5)
            assert not sending.done(), "a send returned while the only replica was stopped"
        finally:
            os.kill(replica.pid, signal.SIGCONT)
        message_id = await asyncio.wait_for(sending, 30)
        on_replica = aioredis.Redis.from_url(replica.url)
        try:  # no waiting: acknowledged means the replica has it now
            entries = []
            for shard in range(client.shards):
                entries += await on_replica.xrange(client.store.keys.inbox(shard))
        finally:
            await on_replica.aclose()
        assert message_id in {decode_envelope(fields[b"e"]).id for _, fields in entries}


async def test_without_a_replica_writes_fail_with_durability_timeout_rather_than_hang(
    replicated: tuple[EmbeddedServer, EmbeddedServer], namespace: str
) -> None:
    primary, replica = replicated
    async with actors.connect(
        primary.url, namespace=namespace, app=counter_app, durability="replica", durability_timeout=1.0
    ) as client:
        await client.send(Counter.ref("k"), Add())
        replica.kill()
        for write in (
            lambda: client.send(Counter.ref("k"), Add()),
            lambda: client.send(Counter.ref("k"), Add(), idempotency_key="x"),
            lambda: client.send_many([(Counter.ref("k"), Add())]),
            lambda: client.ask(Counter.ref("k"), Get(), timeout=30),
        ):
            started = time.monotonic()
            with pytest.raises(DurabilityTimeout, match="no replica acknowledged"):
                await asyncio.wait_for(write(), 20)  # a hang would end here as TimeoutError
            assert time.monotonic() - started >= 0.9, "it waited for the replica for its timeout"


@pytest.mark.single("its own primary and replica pair")
async def test_an_ask_is_answered_only_once_its_commit_is_on_a_replica(
    replicated: tuple[EmbeddedServer, EmbeddedServer], namespace: str, start_worker: Callable[..., Any]
) -> None:
    primary, replica = replicated
    GATE.entered, GATE.go = asyncio.Event(), asyncio.Event()
    async with actors.connect(
        primary.url, namespace=namespace, app=gate_app, shards=4, durability="replica", durability_timeout=60
    ) as client:
        await start_worker(gate_app, url=primary.url)
        asking = asyncio.create_task(client.ask(Gate.ref("g"), Open(), timeout=60))
        await asyncio.wait_for(GATE.entered.wait(), 30)
        os.kill(replica.pid, signal.SIGSTOP)
        try:
            GATE.go.set()
            await asyncio.sleep(1.5)  # past the asker's first look at the stored reply, too
            assert not asking.done(), "the asker got its reply while the only replica was stopped"
        finally:
            os.kill(replica.pid, signal.SIGCONT)
        assert await asyncio.wait_for(asking, 30) == Total(total=1)


@pytest.mark.chaos
@pytest.mark.single("its own primary and replica pair")
async def test_with_replica_nothing_acknowledged_is_lost_when_the_primary_dies(
    replicated: tuple[EmbeddedServer, EmbeddedServer],
    spawn_worker: Callable[..., WorkerProcess],
    namespace: str,
) -> None:
    """Sends acknowledged up to the SIGKILL of the primary are all on its replica, which takes
    over (the old primary comes back as its replica), and each is handled exactly once."""
    primary, replica = replicated
    async with actors.connect(
        primary.url, namespace=namespace, app=counter_app, durability="replica"
    ) as client:
        worker = spawn_worker(url=primary.url)
        acked = await _send_for(client, 1.5)
        primary.kill()
        worker.kill()
    promoted = aioredis.Redis.from_url(replica.url)
    try:
        await promoted.replicaof("NO", "ONE")
    finally:
        await promoted.aclose()
    primary.start()  # its own data: it resyncs from the new primary, dropping what it had alone
    await follow(primary, replica)
    spawn_worker(url=replica.url)
    await _every_acknowledged_handled_once(replica.url, namespace, acked)


# ---- shared by the crash tests ------------------------------------------------------------------
KEYS = 20


async def _send_for(client: actors.Client, seconds: float) -> list[int]:
    """Send increments (sender ``s``, seq 0, 1, ...) for ``seconds``; the seqs acknowledged."""
    acked: list[int] = []
    started = time.monotonic()
    seq = 0
    while time.monotonic() - started < seconds:
        await client.send(Counter.ref(f"k{seq % KEYS}"), Add(sender="s", seq=seq))
        acked.append(seq)
        seq += 1
    assert len(acked) >= 50
    return acked


async def _every_acknowledged_handled_once(url: str, namespace: str, acked: list[int]) -> None:
    async with actors.connect(url, namespace=namespace, app=counter_app) as client:

        async def handled() -> set[int] | None:
            try:
                states = await asyncio.gather(*(client.state(Counter.ref(f"k{k}")) for k in range(KEYS)))
            except Exception:
                return None
            seqs = [s for state in states if state is not None for s in state.seqs.get("s", [])]
            assert len(seqs) == len(set(seqs)), "a message was handled twice"
            return set(seqs) if set(acked) <= set(seqs) else None

        await eventually(handled, timeout=60, interval=0.2)

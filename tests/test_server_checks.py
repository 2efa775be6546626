"""What a worker checks before it takes a shard, against real servers and real Redis users:
the eviction policy (refused unless --allow-eviction; one warning when it cannot be read), a
user without the namespace's channels (one clear error, not a flood of tracebacks), and the
minimal ACL user the README documents (runs the Quick start with no refusal in the ACL log)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis.asyncio

import actors
from actors import ConfigurationError, EmbeddedServer, RedisSettings, Worker, WorkerSettings
from actors.store import acl_rules

from .apps import Add, Counter, Get, Total, app
from .conftest import ROOT, WorkerProcess

COUNTERS = "tests.apps:app"
ACL_ON_ONE_SERVER = "an ACL user made on the one server (a cluster's nodes each have their own ACL)"


@pytest.fixture(scope="module")
def evicting_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """A private server whose maxmemory-policy is allkeys-lru."""
    server = EmbeddedServer(tmp_path_factory.mktemp("evicting")).start()

    async def configure() -> None:
        async with redis.asyncio.Redis.from_url(server.url) as admin:
            await admin.config_set("maxmemory-policy", "allkeys-lru")

    asyncio.run(configure())
    yield server
    server.stop()


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """The test server as its default user, who may do anything (to create users)."""
    async with redis.asyncio.Redis.from_url(redis_url) as client:
        yield client


async def make_user(admin: redis.asyncio.Redis, *rules: str) -> tuple[str, str]:
    user, password = f"u-{uuid.uuid4().hex[:12]}", uuid.uuid4().hex
    await admin.execute_command("ACL", "SETUSER", user, "on", f">{password}", *rules)
    return user, password


def url_of(server_url: str, user: str, password: str) -> str:
    """The server's URL with ``user``'s credentials instead of its own (the embedded server's
    URL carries the default user's password)."""
    parts = urlsplit(server_url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


async def exit_code(proc: WorkerProcess, timeout: float = 60.0) -> int:
    assert proc.proc is not None
    return await asyncio.to_thread(proc.proc.wait, timeout)


def log_lines(proc: WorkerProcess) -> list[str]:
    return [line for line in proc.log.read_text().splitlines() if line.strip()]


# ---- eviction policy -------------------------------------------------------------------------------------


@pytest.mark.single("its own evicting server")
async def test_a_worker_refuses_a_server_that_evicts_keys(
    spawn_worker: Callable[..., WorkerProcess], evicting_server: EmbeddedServer, namespace: str
) -> None:
    refused = spawn_worker(COUNTERS, url=evicting_server.url)
    assert await exit_code(refused) != 0
    [line] = log_lines(refused)
    assert line.startswith("error: ") and "maxmemory-policy is allkeys-lru" in line, line
    assert "noeviction" in line and "--allow-eviction" in line, line
    async with redis.asyncio.Redis.from_url(evicting_server.url) as admin:
        assert await admin.keys(f"{namespace}:*") == [], "a refused worker writes nothing"


@pytest.mark.single("its own evicting server")
async def test_allow_eviction_starts_with_a_warning(
    spawn_worker: Callable[..., WorkerProcess], evicting_server: EmbeddedServer, namespace: str
) -> None:
    worker = spawn_worker(COUNTERS, "--allow-eviction", url=evicting_server.url)
    async with actors.connect(evicting_server.url, namespace=namespace, app=app) as client:
        await client.send(Counter.ref("e"), Add(by=2))
        assert await client.ask(Counter.ref("e"), Get(), timeout=30) == Total(total=2)
    warnings = [line for line in log_lines(worker) if "maxmemory-policy" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0] and "--allow-eviction" in warnings[0], warnings


async def test_an_in_process_worker_raises_configuration_error_on_an_evicting_server(
    evicting_server: EmbeddedServer, namespace: str
) -> None:
    worker = Worker(
        app, RedisSettings(url=evicting_server.url, namespace=namespace), WorkerSettings(shards=4)
    )
    with pytest.raises(ConfigurationError, match="maxmemory-policy is allkeys-lru"):
        await asyncio.wait_for(worker.run(), timeout=30)


@pytest.mark.single(ACL_ON_ONE_SERVER)
async def test_a_policy_the_user_may_not_read_is_one_warning(
    spawn_worker: Callable[..., WorkerProcess],
    admin: redis.asyncio.Redis,
    redis_url: str,
    namespace: str,
    connect: Callable[..., Any],
) -> None:
    """A managed service (or an ACL) that refuses INFO and CONFIG: warn once and go on."""
    user, password = await make_user(admin, f"~{namespace}:*", f"&{namespace}:*", "+@all", "-info", "-config")
    worker = spawn_worker(COUNTERS, url=url_of(redis_url, user, password))
    async with connect(app=app) as client:
        await client.send(Counter.ref("p"), Add(by=1))
        assert await client.ask(Counter.ref("p"), Get(), timeout=30) == Total(total=1)
    warnings = [line for line in log_lines(worker) if "maxmemory-policy" in line]
    assert len(warnings) == 1 and "could not read" in warnings[0], log_lines(worker)


# ---- rights ----------------------------------------------------------------------------------------------


@pytest.mark.single(ACL_ON_ONE_SERVER)
async def test_a_user_without_the_channels_gets_one_clear_error_not_a_flood(
    spawn_worker: Callable[..., WorkerProcess], admin: redis.asyncio.Redis, redis_url: str, namespace: str
) -> None:
    user, password = await make_user(admin, f"~{namespace}:*", "resetchannels", "+@all")
    refused = spawn_worker(COUNTERS, url=url_of(redis_url, user, password))
    assert await exit_code(refused) != 0
    assert "Traceback" not in refused.log.read_text(), refused.log.read_text()
    [line] = log_lines(refused)
    assert line.startswith("error: ") and user in line, line
    assert f"&{namespace}:*" in line and "channels" in line and "subscribe" in line, line
    assert await admin.exists(f"{namespace}:meta") == 0, "refused before it recorded anything"


@pytest.mark.single(ACL_ON_ONE_SERVER)
async def test_a_user_missing_a_command_is_named(
    admin: redis.asyncio.Redis, redis_url: str, namespace: str
) -> None:
    user, password = await make_user(admin, f"~{namespace}:*", f"&{namespace}:*", "+@all", "-evalsha")
    settings = RedisSettings(url=url_of(redis_url, user, password), namespace=namespace)
    with pytest.raises(ConfigurationError, match=r"run scripts .*evalsha"):
        await asyncio.wait_for(Worker(app, settings, WorkerSettings(shards=4)).run(), timeout=30)


# ---- the minimal user of the README ---------------------------------------------------------------------


def readme_acl() -> tuple[str, list[str]]:
    """The README's ``ACL SETUSER`` line: the user's name and its rules (after the password)."""
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"^ACL SETUSER (\S+) on >\S+ (.+)$", readme, re.MULTILINE)
    assert found, "the README documents a minimal ACL user"
    return found.group(1), found.group(2).split()


def readme_quick_start() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Quick start") :]
    code = section[section.index("```python\n") + len("```python\n") :]
    return code[: code.index("\n```")]


def test_the_readme_acl_user_is_the_one_the_runtime_needs() -> None:
    _, rules = readme_acl()
    assert rules == acl_rules("actors").split()


@pytest.mark.single(ACL_ON_ONE_SERVER)
async def test_the_minimal_acl_user_runs_the_quick_start_with_nothing_refused(
    admin: redis.asyncio.Redis, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    name, rules = readme_acl()
    rules = [rule.replace("actors:*", f"{namespace}:*") for rule in rules]
    user, password = await make_user(admin, *rules)
    await admin.execute_command("ACL", "LOG", "RESET")
    script = tmp_path / "quick_start.py"
    script.write_text(readme_quick_start())
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACTORS_")}
    env.update(
        ACTORS_REDIS_URL=url_of(redis_url, user, password), ACTORS_NAMESPACE=namespace, PYTHONPATH=str(ROOT)
    )
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["total=4", "total=4", "total=1"], result.stdout
    assert "maxmemory-policy" not in result.stderr, "the minimal user may read the eviction policy"
    log = await admin.execute_command("ACL", "LOG")
    refused = [entry for entry in log if _field(entry, "username") == user]
    assert refused == [], refused
    assert name  # the README's user name is the reader's to choose


def _field(entry: Any, name: str) -> str:
    fields = dict(zip(entry[::2], entry[1::2], strict=True)) if isinstance(entry, list) else entry
    value = fields.get(name.encode(), fields.get(name))
    return value.decode() if isinstance(value, bytes) else str(value)


@pytest.mark.single(ACL_ON_ONE_SERVER)
async def test_channels_revoked_while_running_are_reported_once_per_channel_not_in_a_flood(
    spawn_worker: Callable[..., WorkerProcess],
    admin: redis.asyncio.Redis,
    redis_url: str,
    namespace: str,
    connect: Callable[..., Any],
) -> None:
    user, password = await make_user(admin, f"~{namespace}:*", f"&{namespace}:*", "+@all")
    worker = spawn_worker(COUNTERS, url=url_of(redis_url, user, password))
    async with connect(app=app) as client:
        assert await client.ask(Counter.ref("r"), Get(), timeout=30) == Total(total=0)
        await admin.execute_command("ACL", "SETUSER", user, "resetchannels")  # drops its subscriptions
        await asyncio.sleep(8)
        await admin.execute_command("ACL", "SETUSER", user, f"&{namespace}:*")
        await client.send(Counter.ref("r"), Add(by=1))
        assert await client.ask(Counter.ref("r"), Get(), timeout=30) == Total(total=1), "it recovers"
    text = worker.log.read_text()
    assert text.count("Traceback") == 0, text[:3000]
    refusals = [line for line in text.splitlines() if "may not subscribe" in line]
    assert 1 <= len(refusals) <= 3, refusals  # one per channel: replies, lease events, limiter events

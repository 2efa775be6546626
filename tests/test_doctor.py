"""``actors doctor``, run as a subprocess against real servers: one line per check (ok, warn or
fail, and what to do), a non-zero exit on a fail, and nothing written or started."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from actors import EmbeddedServer

from .conftest import ROOT, WorkerProcess, eventually, raw_redis

CHECKS = ["server", "persistence", "eviction", "acl", "tls", "clock", "namespace", "workers", "memory"]


def doctor(
    *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("ACTORS_")}
    base["PYTHONPATH"] = str(ROOT)
    argv = [sys.executable, "-m", "actors.cli", "--log-level", "WARNING", "doctor", *args]
    return subprocess.run(
        argv, cwd=cwd, env={**base, **(env or {})}, capture_output=True, text=True, timeout=120
    )


async def run_doctor(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(doctor, *args, **kwargs)


def lines_by_check(result: subprocess.CompletedProcess[str]) -> dict[str, tuple[str, str]]:
    """check name -> (level, text); every line must be ``<level> <check> <text>``."""
    found: dict[str, tuple[str, str]] = {}
    for line in result.stdout.splitlines():
        level, name, text = line.split(maxsplit=2)
        assert level in ("ok", "warn", "fail"), line
        found[name] = (level, text)
    assert "Traceback" not in result.stderr, result.stderr
    return found


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    async with raw_redis(redis_url) as client:
        yield client


async def keys_like(client: redis.asyncio.Redis, pattern: str) -> list[bytes]:
    """The keys matching ``pattern`` (SCAN: on a cluster it visits every primary)."""
    return sorted([key async for key in client.scan_iter(match=pattern)])


@pytest.fixture(scope="module")
def neglected_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """A server set up the way that loses data: no AOF, evicting, memory nearly full."""
    server = EmbeddedServer(tmp_path_factory.mktemp("neglected")).start()

    async def neglect() -> None:
        async with redis.asyncio.Redis.from_url(server.url) as client:
            await client.config_set("appendonly", "no")
            await client.config_set("maxmemory-policy", "allkeys-lru")
            used = (await client.info("memory"))["used_memory"]
            await client.config_set("maxmemory", str(int(used) + 20_000))

    asyncio.run(neglect())
    yield server
    server.stop()


async def test_a_healthy_deployment_is_all_ok_with_the_live_app(
    spawn_worker: Callable[..., WorkerProcess], redis_url: str, namespace: str, admin: redis.asyncio.Redis
) -> None:
    spawn_worker("tests.apps:app")

    async def settled() -> bool:  # live, holding every shard: its keys stay the same
        leases = await keys_like(admin, f"{namespace}:{{*}}:lease")
        return bool(await admin.zcard(f"{namespace}:workers")) and len(leases) == 16

    await eventually(settled, timeout=30)
    keys_before = await keys_like(admin, f"{namespace}:*")
    result = await run_doctor("--redis", redis_url, "--namespace", namespace)
    assert result.returncode == 0, result.stdout + result.stderr
    checks = lines_by_check(result)
    assert list(checks) == CHECKS, result.stdout
    assert all(level == "ok" for level, _ in checks.values()), result.stdout
    assert "Valkey" in checks["server"][1] or "Redis" in checks["server"][1]
    assert "everysec" in checks["persistence"][1]
    assert "noeviction" in checks["eviction"][1]
    assert "16 shards" in checks["namespace"][1]
    assert "1 live" in checks["workers"][1] and "tests.apps" in checks["workers"][1]
    assert "more actors" in checks["memory"][1]
    assert await keys_like(admin, f"{namespace}:*") == keys_before, "doctor writes nothing"
    assert not await admin.exists(f"{namespace}:probe")


async def test_a_server_that_loses_data_fails_and_says_what_to_do(
    neglected_server: EmbeddedServer, namespace: str
) -> None:
    result = await run_doctor("--redis", neglected_server.url, "--namespace", namespace)
    assert result.returncode == 1, result.stdout
    checks = lines_by_check(result)
    assert checks["persistence"][0] == "warn" and "appendonly yes" in checks["persistence"][1]
    assert checks["eviction"] == ("fail", checks["eviction"][1])
    assert "allkeys-lru" in checks["eviction"][1] and "noeviction" in checks["eviction"][1]
    assert checks["memory"][0] == "fail" and "maxmemory" in checks["memory"][1], checks["memory"]
    assert checks["namespace"][0] == "warn" and "no shard count" in checks["namespace"][1]
    assert checks["workers"][0] == "warn" and "no live worker" in checks["workers"][1]


@pytest.mark.single("an ACL user made on one server (a cluster's nodes each have their own ACL)")
async def test_a_user_without_the_channels_fails_the_acl_check(
    admin: redis.asyncio.Redis, redis_server: EmbeddedServer, namespace: str
) -> None:
    user, password = f"u-{uuid.uuid4().hex[:12]}", uuid.uuid4().hex
    await admin.execute_command("ACL", "SETUSER", user, "on", f">{password}", f"~{namespace}:*", "+@all",
                                "-acl", "resetchannels")  # fmt: skip
    url = f"redis://{user}:{password}@127.0.0.1:{redis_server.port}/0"
    result = await run_doctor("--redis", url, "--namespace", namespace)
    assert result.returncode == 1
    level, text = lines_by_check(result)["acl"]
    assert level == "fail" and user in text and f"&{namespace}:*" in text, text


@pytest.mark.single("an ACL user made on one server (a cluster's nodes each have their own ACL)")
async def test_an_admin_checks_every_command_of_another_user(
    admin: redis.asyncio.Redis, redis_url: str, namespace: str
) -> None:
    user = f"u-{uuid.uuid4().hex[:12]}"
    await admin.execute_command("ACL", "SETUSER", user, "on", "nopass", f"~{namespace}:*", f"&{namespace}:*",
                                "+@all", "-xautoclaim", "-script|load")  # fmt: skip
    result = await run_doctor("--redis", redis_url, "--namespace", namespace, "--acl-user", user)
    assert result.returncode == 1
    level, text = lines_by_check(result)["acl"]
    assert level == "fail" and "+xautoclaim" in text and "+script|load" in text and user in text, text


async def test_workers_of_two_apps_are_a_warning(
    spawn_worker: Callable[..., WorkerProcess], redis_url: str, namespace: str, admin: redis.asyncio.Redis
) -> None:
    async def live(count: int) -> bool:
        return await admin.zcard(f"{namespace}:workers") == count

    spawn_worker("tests.sharing_apps:greeters")  # version 1 first: version 2 adds a type
    await eventually(lambda: live(1), timeout=30)
    spawn_worker("tests.sharing_apps:greeters_v2")
    await eventually(lambda: live(2), timeout=30)
    level, text = lines_by_check(await run_doctor("--redis", redis_url, "--namespace", namespace))["workers"]
    assert level == "warn" and "2 live" in text and "Farewell" in text and "rolling upgrade" in text, text


async def test_nothing_to_check_when_no_server_runs_and_none_is_started(tmp_path: Path) -> None:
    server_dir = tmp_path / "server"
    result = await run_doctor(env={"ACTORS_SERVER_DIR": str(server_dir)}, cwd=tmp_path)
    assert result.returncode == 1
    [line] = result.stdout.splitlines()
    assert line.startswith("fail") and "not running" in line and "actors server start" in line, line
    assert not server_dir.exists(), "doctor never starts (or prepares) a server"


async def test_a_closed_port_is_one_failed_line(namespace: str) -> None:
    result = await run_doctor("--redis", "redis://127.0.0.1:1/0", "--namespace", namespace)
    assert result.returncode == 1
    [line] = result.stdout.splitlines()
    assert line.split()[:2] == ["fail", "connection"] and "127.0.0.1:1" in line, line
    assert "Traceback" not in result.stderr


async def test_with_no_url_it_checks_the_embedded_server_that_runs(tmp_path: Path) -> None:
    server = EmbeddedServer(tmp_path / "server").start()
    try:
        result = await run_doctor(env={"ACTORS_SERVER_DIR": str(server.directory)}, cwd=tmp_path)
        checks = lines_by_check(result)
        assert checks["server"][0] == "ok" and f"127.0.0.1:{server.port}" in checks["server"][1]
        assert checks["persistence"][0] == "ok", checks["persistence"]
        assert result.returncode == 0, result.stdout
    finally:
        server.stop()


async def test_an_unknown_acl_user_fails(redis_url: str, namespace: str) -> None:
    result = await run_doctor("--redis", redis_url, "--namespace", namespace, "--acl-user", "nobody-here")
    level, text = lines_by_check(result)["acl"]
    assert result.returncode == 1 and level == "fail" and "not found" in text, text

"""Routine errors of the ``actors`` command: one line on stderr saying what is wrong and what
to do, a non-zero exit, and no traceback unless ``--debug`` asks for it. Each runs the real
command as a subprocess against a real server (or a port where none listens)."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio

from .conftest import ROOT
from .test_cli import _env, actors_cli

APP = "tests.apps:app"


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The command failed with a single line on stderr (no traceback); returns that line."""
    assert result.returncode != 0, f"exit 0\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{result.stderr}"
    assert lines[0].startswith(("error: ", "actors: error: ", "usage: ")), lines[0]
    return lines[0]


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_closed_redis_port_is_one_line_and_debug_shows_the_traceback(namespace: str) -> None:
    url = f"redis://127.0.0.1:{closed_port()}/0"
    for command in (["status"], ["state", "Counter/k"], ["send", "Counter/k", "Add", "{}", "--app", APP]):
        line = one_line_error(await actors_cli(*command, "--redis", url, "--namespace", namespace))
        assert "cannot reach Redis" in line and "127.0.0.1" in line, line
        assert "--debug" in line, "the line says how to see more"
    debug = await actors_cli("--debug", "status", "--redis", url, "--namespace", namespace)
    assert debug.returncode != 0 and "Traceback (most recent call last)" in debug.stderr
    after = await actors_cli("status", "--redis", url, "--namespace", namespace, "--debug")
    assert "Traceback (most recent call last)" in after.stderr, "--debug after the command works too"


async def test_a_password_in_the_url_is_not_printed(namespace: str) -> None:
    url = f"redis://someone:s3cret-pw@127.0.0.1:{closed_port()}/0"
    line = one_line_error(await actors_cli("status", "--redis", url, "--namespace", namespace))
    assert "s3cret-pw" not in line and "cannot reach Redis" in line


async def test_a_typo_in_the_app_path_is_one_line(redis_url: str, namespace: str) -> None:
    where = ["--redis", redis_url, "--namespace", namespace]
    for app in ("tests.nope:app", "nope_pkg.mod:app"):
        line = one_line_error(await actors_cli("worker", app, *where))
        assert f"cannot import {app.partition(':')[0]!r}" in line, line
        line = one_line_error(await actors_cli("send", "Counter/k", "Add", "{}", "--app", app, *where))
        assert "cannot import" in line, line
    assert "has no attribute 'nope'" in one_line_error(await actors_cli("worker", "tests.apps:nope", *where))
    # With --processes the parent checks the app before starting children that would all fail.
    line = one_line_error(await actors_cli("worker", "tests.nope:app", "--processes", "2", *where))
    assert "cannot import" in line


async def test_a_bad_server_binary_is_one_line(tmp_path: Path) -> None:
    env = _env(ACTORS_SERVER_BIN=str(tmp_path / "no-such-server"), ACTORS_SERVER_DIR=str(tmp_path / "srv"))
    line = one_line_error(await actors_cli("server", "start", env=env))
    assert "no-such-server" in line, line


@pytest.mark.skipif(
    importlib.util.find_spec("opentelemetry.exporter") is not None, reason="the OTLP exporter is installed"
)
async def test_otlp_without_its_package_is_one_line(redis_url: str, namespace: str) -> None:
    result = await actors_cli("worker", APP, "--otel", "otlp", "--redis", redis_url, "--namespace", namespace)
    line = one_line_error(result)
    assert "pip install opentelemetry-exporter-otlp-proto-http" in line and "unexpected" not in line


@pytest.fixture
async def acl_user(redis_url: str) -> AsyncIterator[tuple[str, str]]:
    """A Redis user that may do everything but XADD (so a send is refused with NOPERM)."""
    name, password = f"u{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    admin = redis.asyncio.Redis.from_url(redis_url)
    try:
        await admin.execute_command(
            "ACL", "SETUSER", name, "on", f">{password}", "~*", "&*", "+@all", "-xadd"
        )
        yield name, password
    finally:
        await admin.execute_command("ACL", "DELUSER", name)
        await admin.aclose()


@pytest.mark.single("an ACL user made on one server (a cluster's nodes each have their own ACL)")
async def test_noperm_and_a_failed_authentication_are_one_line(
    redis_url: str, namespace: str, acl_user: tuple[str, str]
) -> None:
    name, password = acl_user
    host = redis_url.removeprefix("redis://").rpartition("@")[2]  # the embedded server's URL has a password
    limited = f"redis://{name}:{password}@{host}"
    line = one_line_error(
        await actors_cli(
            "send", "Counter/k", "Add", "{}", "--app", APP, "--redis", limited, "--namespace", namespace
        )
    )
    assert "NOPERM" in line and "ACL" in line, line
    assert password not in line

    wrong = f"redis://{name}:wrong-password@{host}"
    line = one_line_error(await actors_cli("status", "--redis", wrong, "--namespace", namespace))
    assert "authentication" in line.lower() and "wrong-password" not in line, line


async def test_bad_numbers_are_refused_by_the_parser(redis_url: str, namespace: str) -> None:
    where = ["--redis", redis_url, "--namespace", namespace]
    for args in (
        ["dlq", "list", "--count", "-1"],
        ["dlq", "list", "--count", "0"],
        ["worker", APP, "--processes", "0"],
        ["worker", APP, "--shards", "0"],
        ["worker", APP, "--grace", "-1"],
        ["worker", APP, "--lease-ttl", "nan"],
        ["ask", "Counter/k", "Get", "--app", APP, "--timeout", "0"],
        ["ask", "Counter/k", "Get", "--app", APP, "--timeout", "nan"],
        ["top", "--interval", "0"],
    ):
        result = await actors_cli(*args, *where)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr
        assert "invalid" in result.stderr.splitlines()[-1], (args, result.stderr)


async def test_output_to_a_closed_pipe_is_no_error(redis_url: str, namespace: str) -> None:
    """``actors ... | head`` must not end with a BrokenPipeError: the reader is gone, that is all."""
    ok = await actors_cli(
        "send", "Counter/k", "Add", "{}", "--app", APP, "--redis", redis_url, "--namespace", namespace
    )
    assert ok.returncode == 0, ok.stderr
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to the pipe now fails with EPIPE
    argv = [sys.executable, "-m", "actors.cli", "--log-level", "WARNING", "status",
            "--redis", redis_url, "--namespace", namespace]  # fmt: skip
    try:
        result = await asyncio.to_thread(
            subprocess.run, argv, cwd=ROOT, env=_env(), stdout=write_end, stderr=subprocess.PIPE, text=True,
            timeout=60,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert "BrokenPipe" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.stderr == ""

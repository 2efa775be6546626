"""The project's embedded server, through the real ``actors`` command: the binary that wrote
its data opens it, only commands that write may start it (and say so), and it has a password
and files that only their owner can read."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from actors import EmbeddedServer, bench
from actors.server import find_binary

from .conftest import ROOT

APP = "tests.apps:app"
NS = "embedded"
_OURS = {"ACTORS_REDIS_URL", "ACTORS_NAMESPACE", "ACTORS_APP", "ACTORS_SERVER_DIR", "ACTORS_SERVER_BIN"}


def env_for(directory: Path | None, **extra: str) -> dict[str, str]:
    """This process's environment without our settings, with the server's data in ``directory``."""
    env = {k: v for k, v in os.environ.items() if k not in _OURS}
    env["PYTHONPATH"] = str(ROOT)
    if directory is not None:
        env["ACTORS_SERVER_DIR"] = str(directory)
    env.update(extra)
    return env


def run(*args: str, env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "actors.cli", "--log-level", "WARNING", *args]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    shown = f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert result.returncode == 0, shown
    return result.stdout


def failed(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, f"exit 0\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr


def server_status(env: dict[str, str]) -> dict[str, object]:
    status: dict[str, object] = json.loads(ok(run("server", "status", env=env)))
    return status


@contextlib.contextmanager
def stopped_at_end(*directories: Path) -> Iterator[None]:
    """Whatever the test did, no server it started outlives it."""
    try:
        yield
    finally:
        for directory in directories:
            if directory.exists():
                EmbeddedServer(directory).stop()


# ---- the binary that wrote the data opens it -------------------------------------------------


FAKE_SERVER = """#!/bin/sh
# A Redis 7.0 that cannot read newer data files: it says so in its log and exits.
if [ "$1" = "--version" ]; then echo "Redis server v=7.0.15 sha=00000000:0 bits=64"; exit 0; fi
echo "$0 $*" >> {ran}
echo "# Can't handle RDB format version 11" >> server.log
exit 1
"""


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_the_server_that_wrote_the_data_opens_it(tmp_path: Path) -> None:
    directory = tmp_path / "project" / ".actors" / "server"
    ran = tmp_path / "fake-server-ran"
    fake_bin = tmp_path / "apt" / "bin"
    for name in ("valkey-server", "redis-server"):
        executable(fake_bin / name, FAKE_SERVER.format(ran=ran))
    # The server the data is written with, at a path the test can take away later.
    wrapper = executable(tmp_path / "venv" / "valkey-server", f'#!/bin/sh\nexec {find_binary()} "$@"\n')
    first = env_for(directory, ACTORS_SERVER_BIN=str(wrapper))
    # Later: another server binary appears on PATH, ahead of everything.
    later = env_for(directory, PATH=f"{fake_bin}:{os.environ['PATH']}")

    with stopped_at_end(directory):
        ok(run("server", "start", env=first))
        ok(run("send", "Counter/kept", "Add", '{"by": 5}', "--app", APP, "--namespace", NS, env=first))
        ok(run("server", "stop", env=first))

        url = ok(run("server", "start", env=later)).strip()
        assert not ran.exists(), "the binary on PATH was not run: the recorded one opened the data"
        status = server_status(later)
        assert status["running"] is True and status["binary"] == str(wrapper), status
        assert " v=" in str(status["version"]), status
        with redis.Redis.from_url(url) as r:
            assert r.ping()
        shown = json.loads(ok(run("status", "--json", "--namespace", NS, env=later)))
        assert sum(s["length"] for s in shown["shards"]) == 1, "the message sent before is still there"
        ok(run("server", "stop", env=later))

        # Asked for another binary by ACTORS_SERVER_BIN: refused, with what to do.
        named = {**later, "ACTORS_SERVER_BIN": str(fake_bin / "redis-server")}
        refused = failed(run("server", "start", env=named))
        assert str(wrapper) in refused and "--binary" in refused and "7.0.15" in refused, refused
        assert not ran.exists()

        # Switching on purpose: the new binary cannot read the data; the error says why and the
        # record keeps the binary that wrote it.
        started = time.monotonic()
        switch = failed(run("server", "start", "--binary", str(fake_bin / "redis-server"), env=later))
        assert "Can't handle RDB format version 11" in switch, switch
        assert str(wrapper) in switch and "actors server start" in switch, switch
        assert len(ran.read_text().splitlines()) == 1, "no retry on other ports after a failure to load"
        assert time.monotonic() - started < 60
        ok(run("server", "start", env=later))
        assert server_status(later)["binary"] == str(wrapper)
        ok(run("server", "stop", env=later))

        # The binary that wrote the data is gone: no other one is tried, and the error says what to do.
        wrapper.unlink()
        gone = failed(run("server", "start", env=later))
        assert str(wrapper) in gone and "no longer" in gone and "--binary" in gone, gone
        assert len(ran.read_text().splitlines()) == 1
        failed(run("send", "Counter/kept", "Add", "{}", "--app", APP, "--namespace", NS, env=later))


# ---- which commands may start a server ------------------------------------------------------

READ_ONLY = [
    ["status"],
    ["status", "--json"],
    ["state", "Counter/r"],
    ["waits"],
    ["inspect", "Counter/r"],
    ["dlq", "list"],
    ["dlq", "show", "0/1-0"],
    ["top", "--frames", "1"],
]


def test_read_only_commands_never_start_a_server_and_writes_that_start_one_say_so(tmp_path: Path) -> None:
    directory = tmp_path / "project" / ".actors" / "server"
    env = env_for(directory)
    with stopped_at_end(directory):
        ok(run("server", "start", env=env))
        ok(run("send", "Counter/r", "Add", '{"by": 2}', "--app", APP, env=env))
        ok(run("server", "stop", env=env))

        for args in READ_ONLY:
            refused = failed(run(*args, env=env))
            assert "not running" in refused and "actors server start" in refused, (args, refused)
        status = server_status(env)
        assert status["running"] is False, "no read-only command started the server"

        # A command that writes starts it, and says so once: on stderr, naming where its data is.
        sent = run("send", "Counter/r", "Add", '{"by": 3}', "--app", APP, env=env)
        ok(sent)
        notices = [line for line in sent.stderr.splitlines() if "embedded server" in line]
        assert len(notices) == 1 and str(directory) in notices[0], sent.stderr
        assert "actors server stop" in notices[0], notices
        again = run("send", "Counter/r", "Add", '{"by": 1}', "--app", APP, env=env)
        ok(again)
        assert "embedded server" not in again.stderr, "a server already running is not announced"
        shown = json.loads(ok(run("status", "--json", env=env)))  # read-only: the server runs now
        assert sum(s["length"] for s in shown["shards"]) == 3, "every send is in the inbox"


def test_the_counter_demo_says_it_started_a_server_that_keeps_running(tmp_path: Path) -> None:
    directory = tmp_path / "server"
    with stopped_at_end(directory):
        demo = subprocess.run(
            [sys.executable, "-m", "examples.counter"], cwd=ROOT, env=env_for(directory),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert demo.returncode == 0, demo.stderr
        [notice] = [line for line in demo.stderr.splitlines() if "embedded server" in line]
        assert str(directory) in notice and "keeps running" in notice and "actors server stop" in notice
        assert server_status(env_for(directory))["running"] is True, "as it said"


def test_read_only_commands_outside_a_project_create_nothing(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = env_for(None)
    with stopped_at_end(elsewhere / ".actors" / "server"):
        for args in [["status"], ["waits"], ["server", "status"], ["server", "stop"]]:
            result = run(*args, env=env, cwd=elsewhere)
            if args[0] != "server":
                assert "not running" in failed(result), args
        assert list(elsewhere.iterdir()) == [], "no .actors folder, no server"


# ---- a password, and files only their owner reads --------------------------------------------


def _modes(directory: Path) -> dict[str, int]:
    found = {str(p.relative_to(directory)): stat.S_IMODE(p.stat().st_mode) for p in directory.rglob("*")}
    return {**found, ".": stat.S_IMODE(directory.stat().st_mode)}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _children(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == parent:
                    found.append(int(entry.name))
    return found


@pytest.fixture
def world_traversable() -> Iterator[Path]:
    """A folder every local user may enter (pytest's own are private to their owner)."""
    base = Path(tempfile.mkdtemp(prefix="actors-shared-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc")
def test_the_embedded_server_has_a_password_and_private_files(world_traversable: Path) -> None:
    project = world_traversable / "project"
    project.mkdir(mode=0o755)
    directory = project / ".actors" / "server"
    env = env_for(directory)
    with stopped_at_end(directory):
        url = ok(run("server", "start", env=env)).strip()
        password = (directory / "password").read_text().strip()
        assert len(password) >= 32 and url == f"redis://:{password}@127.0.0.1:{_port(url)}/0", url
        ok(run("send", "Counter/p", "Add", '{"by": 7}', "--app", APP, env=env))

        with redis.Redis(host="127.0.0.1", port=_port(url)) as anonymous:
            with pytest.raises(redis.AuthenticationError):
                anonymous.ping()
        with redis.Redis.from_url(url) as r:
            assert r.ping()

        modes = _modes(directory)
        assert modes["."] == 0o700, modes
        exposed = {name: oct(mode) for name, mode in modes.items() if mode & 0o077 and name != "."}
        assert exposed == {}, f"readable by others: {exposed}"
        pid = int(server_status(env)["pid"])  # type: ignore[call-overload]
        assert password not in _cmdline(pid)
        if os.geteuid() == 0:  # another local user really cannot read the append-only file
            aof = next(p for p in directory.rglob("*.aof*"))
            as_nobody = subprocess.run(["cat", str(aof)], user="nobody", capture_output=True, timeout=30)
            assert as_nobody.returncode != 0 and b"Counter" not in as_nobody.stdout

        # Workers, --processes children included, find the password by themselves; none has it
        # on its command line.
        log = open(world_traversable / "worker.log", "wb")  # closed in the finally below
        worker = subprocess.Popen(
            [sys.executable, "-m", "actors.cli", "--log-level", "WARNING", "worker", APP, "--processes", "2"],
            cwd=ROOT, env=env, stdout=log, stderr=log,
        )  # fmt: skip
        try:
            asked = run("ask", "Counter/p", "Get", "--app", APP, "--timeout", "60", env=env)
            assert json.loads(ok(asked)) == {"total": 7}
            children = _children(worker.pid)
            assert len(children) == 2, children
            for pid in [worker.pid, *children]:
                assert "actors.cli" in _cmdline(pid) and password not in _cmdline(pid)
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
            log.close()


def test_actors_bench_passes_the_url_in_the_environment(redis_url: str) -> None:
    proc = bench._spawn(redis_url, "bench-argv")
    try:
        assert redis_url not in " ".join(map(str, proc.args)), proc.args  # type: ignore[arg-type]
    finally:
        proc.kill()
        proc.wait()


def _port(url: str) -> int:
    match = re.search(r":(\d+)/0$", url)
    assert match, url
    return int(match.group(1))


def test_a_server_started_before_passwords_gets_one_when_adopted(tmp_path: Path) -> None:
    """A server a previous version started (no password, world-readable files, a record with
    no version) is secured by the first command that finds it, without a restart."""
    directory = tmp_path / "server"
    directory.mkdir(mode=0o755)
    old_umask = os.umask(0o022)
    try:
        port = _free_port()
        subprocess.run(
            [find_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
             "--appendonly", "yes", "--save", "", "--logfile", "server.log", "--daemonize", "yes",
             "--pidfile", str(directory / "server.pid")],
            cwd=directory, check=True, timeout=30,
        )  # fmt: skip
    finally:
        os.umask(old_umask)
    env = env_for(directory)
    with stopped_at_end(directory):
        pid = _wait_for_pid(directory / "server.pid")
        (directory / "server.json").write_text(
            json.dumps({"port": port, "pid": pid, "binary": find_binary()})
        )
        with redis.Redis(host="127.0.0.1", port=port) as before:
            _wait_until_it_answers(before)  # no password yet
            connected = redis.Redis(host="127.0.0.1", port=port, single_connection_client=True)
            assert connected.ping()

            status = server_status(env)
            assert status["running"] is True and status["pid"] == pid, "adopted, not restarted"
            password = (directory / "password").read_text().strip()
            assert status["url"] == f"redis://:{password}@127.0.0.1:{port}/0"
            with redis.Redis(host="127.0.0.1", port=port) as anonymous:
                with pytest.raises(redis.AuthenticationError):
                    anonymous.ping()
            assert connected.ping(), "a client connected before keeps its connection"
            connected.close()
        exposed = {name: oct(mode) for name, mode in _modes(directory).items() if mode & 0o077}
        assert exposed == {}, exposed


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_until_it_answers(client: redis.Redis) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            client.ping()
            return
        except (redis.ConnectionError, redis.BusyLoadingError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _wait_for_pid(pidfile: Path) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            return int(pidfile.read_text().strip())
        time.sleep(0.05)
    raise AssertionError(f"no {pidfile}")


def test_a_server_that_has_exited_but_is_not_yet_reaped_counts_as_stopped() -> None:
    """The server daemonizes, so init (or a subreaper) reaps it: late on some machines, never
    in a container whose PID 1 does not reap. Until then it is a zombie, which ``kill -0``
    still finds; ``stop`` must not wait for it (up to its timeout, then raise), nor a start
    take it for a server that is running."""
    from actors.server import _alive

    child = subprocess.Popen(["true"])  # not waited for: a zombie once it has exited
    try:
        deadline = time.monotonic() + 20
        while _state(child.pid) != "Z" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _state(child.pid) == "Z", "the child became a zombie"
        assert not _alive(child.pid)
    finally:
        child.wait()
    assert not _alive(child.pid)
    assert _alive(os.getpid())


def _state(pid: int) -> str:
    """The process's state letter in /proc (R, S, Z, ...)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]

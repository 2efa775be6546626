"""``actors worker --health-port PORT``: liveness and readiness from the worker's own state.

``GET /livez`` answers 200 while the worker's event loop runs (a beat of its own on the loop
has run within ``stall_limit``), ``GET /readyz`` 200 while it is also registered and in touch
with Redis (its supervisor's last successful tick, heartbeat and lease renewals, is at most
``max(lease ttl, stall_limit)`` old) and not draining; otherwise 503. The body says why, in
one line.

Why HTTP served from a thread of the worker (the standard library's ``http.server``), and not
asyncio streams on the worker's loop, nor a file read by an exec probe:

- What liveness asks is whether the event loop is stuck. A server on that loop cannot answer
  while it is: the kubelet would see its probe time out (after ``timeoutSeconds``, 1 s by
  default) and restart a worker whose loop was busy for a second, which the LeaseKeeper
  tolerates up to ``stall_limit``. A thread answers at once, measures the stall and says so.
- An exec probe starts an interpreter and imports the runtime at every probe (a good part of a
  CPU second each time, in every pod), and a file needs a writable file system.

With ``--processes N`` the parent serves the port: each child computes its own verdict and
writes it, one JSON line every renew interval, into a pipe it inherits from the parent
(``--health-fd``, hidden): no files and no ports between them. The parent is live while every
child is (a child that exited is being restarted by the parent: live, not ready), ready while
every child is ready, and not ready once it is told to stop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from typing import TYPE_CHECKING, cast

from .errors import ConfigurationError

if TYPE_CHECKING:
    from .worker import Worker

PATHS = ("/livez", "/readyz")
REQUEST_TIMEOUT = 5.0
"""Seconds a probe's connection may stay silent before its thread gives up on it."""


@dataclass(frozen=True, slots=True)
class Verdict:
    live: bool
    ready: bool
    detail: str
    """One line: what the worker does, or why it is not live or not ready."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where ``--health-port`` listens, and the worker's timing that the verdicts use."""

    host: str
    port: int
    stall_limit: float
    interval: float


# ---- the command line ------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``actors worker``'s options for the probes."""
    parser.add_argument(
        "--health-port", type=_port, default=None, metavar="PORT",
        help="serve GET /livez and /readyz over HTTP on this port (for Kubernetes probes)",
    )  # fmt: skip
    parser.add_argument(
        "--health-host", default="0.0.0.0", metavar="HOST",
        help="the address --health-port listens on (default 0.0.0.0: every interface)",
    )  # fmt: skip
    parser.add_argument("--health-fd", type=int, default=None, help=argparse.SUPPRESS)


def endpoint(args: argparse.Namespace) -> Endpoint | None:
    if args.health_port is None:
        return None
    return Endpoint(args.health_host, args.health_port, args.stall_limit, args.renew_interval)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 1 to 65535, got {port}")
    return port


# ---- one worker process ----------------------------------------------------------------------
class WorkerHealth:
    """One worker process's verdict, computed on any thread from what the worker shows."""

    def __init__(self, worker: Worker) -> None:
        lease = worker.settings.lease
        self._worker = worker
        self._stall_limit = lease.stall_limit
        self._tick_limit = max(lease.ttl, lease.stall_limit)
        self._interval = lease.renew_interval
        self._beat_at = time.monotonic()
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Start the beat (on the worker's event loop)."""
        self._beat()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()

    def _beat(self) -> None:
        # Like the supervisor's beat for the LeaseKeeper, but from the start: it covers the
        # connection to Redis too, before there is a supervisor.
        self._beat_at = time.monotonic()
        self._handle = asyncio.get_running_loop().call_later(self._interval, self._beat)

    def verdict(self) -> Verdict:
        now = time.monotonic()
        stalled = now - self._beat_at
        if stalled > self._stall_limit:
            detail = f"the event loop has not run for {stalled:.1f}s (stall limit {self._stall_limit:g}s)"
            return Verdict(False, False, detail)
        worker = self._worker
        if worker.stopping:
            return Verdict(True, False, "draining: finishing its turns and releasing its shards")
        ticked = worker.last_tick
        if ticked is None:
            return Verdict(True, False, "starting: not registered yet")
        if now - ticked > self._tick_limit:
            detail = f"no successful heartbeat for {now - ticked:.1f}s (Redis unreachable?)"
            return Verdict(True, False, detail)
        return Verdict(True, True, f"holds {worker.held_shards} shards")


@contextlib.contextmanager
def watching(worker: Worker, where: Endpoint | None, report_fd: int | None) -> Iterator[None]:
    """While the worker runs (entered on its event loop): serve its verdict on ``where``, or
    report it to the parent on ``report_fd``; nothing if neither is given."""
    if where is None and report_fd is None:
        yield
        return
    health = WorkerHealth(worker)
    with contextlib.ExitStack() as stack:
        if where is not None:
            stack.enter_context(serving(where, health.verdict))
        health.start()
        stack.callback(health.stop)
        if report_fd is not None:
            stack.enter_context(_reporting(report_fd, health.verdict, worker.settings.lease.renew_interval))
        yield


@contextlib.contextmanager
def _reporting(fd: int, verdict: Callable[[], Verdict], interval: float) -> Iterator[None]:
    """Write ``verdict()`` as a JSON line to ``fd`` (the parent's pipe) every ``interval``."""
    os.set_inheritable(fd, False)  # the pipe is the parent's and this process's only
    stop = threading.Event()

    def report() -> None:
        with open(fd, "wb", buffering=0) as pipe:
            while True:
                v = verdict()
                line = json.dumps({"live": v.live, "ready": v.ready, "detail": v.detail}) + "\n"
                try:
                    pipe.write(line.encode())
                except OSError:  # the parent is gone: watch_parent stops this process
                    return
                if stop.wait(interval):
                    return

    thread = threading.Thread(target=report, name="health-report", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()


# ---- the parent of --processes N -------------------------------------------------------------
class _Feed:
    """The reports of one child process, read from its pipe by a thread of the parent."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.last: Verdict | None = None
        self.at = 0.0
        self.ended = False

    def read(self, fd: int) -> None:
        with open(fd, "rb") as pipe:
            for line in pipe:
                report = _parse(line)
                if report is not None:
                    self.last, self.at = report, time.monotonic()
        self.ended = True  # every copy of the write end is closed: the child exited

    def verdict(self, now: float, stale_after: float) -> Verdict:
        if self.ended:
            return Verdict(True, False, "exited; being restarted")
        if self.last is None:
            return Verdict(True, False, "starting")
        if now - self.at > stale_after:
            return Verdict(False, False, f"no report for {now - self.at:.1f}s (stopped?)")
        return self.last


def _parse(line: bytes) -> Verdict | None:
    try:
        report = json.loads(line)
    except ValueError:
        return None
    if not isinstance(report, dict):
        return None
    live, ready, detail = report.get("live"), report.get("ready"), report.get("detail")
    if not (isinstance(live, bool) and isinstance(ready, bool) and isinstance(detail, str)):
        return None
    return Verdict(live, ready, detail)


class Board:
    """The verdict of a ``--processes N`` parent, from its children's reports."""

    def __init__(self, processes: int, where: Endpoint, stopping: threading.Event) -> None:
        self._feeds: list[_Feed | None] = [None] * processes
        self._stale_after = max(where.stall_limit, 5 * where.interval)
        self._stopping = stopping

    def spawn(self, slot: int, command: Sequence[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start the child of ``slot`` with a pipe to report on (``--health-fd``)."""
        read, write = os.pipe()
        try:
            # A session of its own: a Ctrl-C in the terminal reaches the child once, through its parent.
            proc = subprocess.Popen(
                [*command, "--health-fd", str(write)], env=env, pass_fds=(write,), start_new_session=True
            )
        except BaseException:
            os.close(read)
            raise
        finally:
            os.close(write)  # the child's copy is the only one: its exit ends the feed
        feed = _Feed(proc.pid)
        self._feeds[slot] = feed
        threading.Thread(target=feed.read, args=(read,), name=f"health-feed-{slot}", daemon=True).start()
        return proc

    def verdict(self) -> Verdict:
        now = time.monotonic()
        stopping = self._stopping.is_set()
        live, ready = True, not stopping
        details = ["draining: stopping its worker processes"] if stopping else []
        for n, feed in enumerate(self._feeds, 1):
            v = Verdict(True, False, "not started") if feed is None else feed.verdict(now, self._stale_after)
            live, ready = live and v.live, ready and v.ready
            pid = "" if feed is None else f" (pid {feed.pid})"
            details.append(f"process {n}{pid}: {v.detail}")
        return Verdict(live, ready, "; ".join(details))


# ---- HTTP ------------------------------------------------------------------------------------
class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, where: Endpoint, verdict: Callable[[], Verdict]) -> None:
        self.address_family = socket.AF_INET6 if ":" in where.host else socket.AF_INET
        self.verdict = verdict
        super().__init__((where.host, where.port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer's own looks the host's name up in DNS, which may hang: nothing here needs it.
        TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


class _Handler(BaseHTTPRequestHandler):
    timeout = REQUEST_TIMEOUT

    def do_GET(self) -> None:
        path = self.path.partition("?")[0]
        if path not in PATHS:
            self._answer(404, f"not found: ask {' or '.join(PATHS)}")
            return
        verdict = cast("_Server", self.server).verdict()
        ok = verdict.live if path == "/livez" else verdict.ready
        self._answer(200 if ok else 503, f"{'ok' if ok else 'failing'}: {verdict.detail}")

    def _answer(self, status: int, text: str) -> None:
        body = (text + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Silent: the kubelet asks every few seconds; a log line each time would drown the rest."""


@contextlib.contextmanager
def serving(where: Endpoint, verdict: Callable[[], Verdict]) -> Iterator[None]:
    """Answer /livez and /readyz with ``verdict()`` from a thread, until the block ends."""
    try:
        server = _Server(where, verdict)
    except OSError as exc:
        raise ConfigurationError(
            f"--health-port {where.port}: cannot listen on {where.host}: {exc.strerror or exc}"
        ) from exc
    thread = threading.Thread(target=server.serve_forever, args=(0.2,), name="health-http", daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()

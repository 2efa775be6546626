"""What the benchmark modules share: the private server they run on, their worker processes,
waiting for those to hold the shards, and the header and JSON they write."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

import actors

ROOT = Path(__file__).resolve().parent.parent
SHARDS = 16
POLL_S = 0.05
"""How often ``wait_balanced`` looks at the leases."""


# ---- arguments and figures ---------------------------------------------------------------------
def argument_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser whose ``--help`` shows the module's docstring as it is written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def write_json(path: Path, payload: Any, *, announce: bool = True) -> None:
    """Write ``payload`` as indented JSON; ``announce`` prints where, after a blank line."""
    path.write_text(json.dumps(payload, indent=2) + "\n")
    if announce:
        print(f"\nwrote {path}")


# ---- the private server and the machine it runs on ----------------------------------------------
def load_average() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} (1 min), {five:.2f} (5 min)"


@dataclass
class PrivateServer:
    server: actors.EmbeddedServer
    tmp: Path
    """The run's temporary directory; the server's data is in ``tmp / "redis"``."""
    load_before: str
    """``load_average()`` just before the server was started."""
    keep: bool = False
    """Leave ``tmp`` in place at the end (set it inside the ``with`` block)."""

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def name(self) -> str:
        """``server valkey-server``: the binary that ran it, as the headers name it."""
        return f"server {Path(self.server.binary or 'valkey-server').name}"

    def machine_line(self, extra: str = "", server: str | None = None) -> str:
        """The header's first line: cores, Python, the server (``server``, else ``name``), AOF,
        the load average before the run and now, then ``extra``."""
        return (
            f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, {server or self.name}, "
            f"AOF everysec, loopback; load average before {self.load_before}, after {load_average()}{extra}"
        )


@contextmanager
def private_server(name: str, kept: str = "server data and worker logs") -> Iterator[PrivateServer]:
    """A server (AOF on, fsync every second) on a free loopback port, with its data in a new
    temporary directory ``actors-NAME-*``; stopped at the end, and the directory removed unless
    ``keep`` was set. If the block fails, the directory stays and stderr says where (``kept``
    says what is in it)."""
    load_before = load_average()
    tmp = Path(tempfile.mkdtemp(prefix=f"actors-{name}-"))
    run = PrivateServer(actors.EmbeddedServer(tmp / "redis").start(), tmp, load_before)
    try:
        yield run
    except BaseException:
        print(f"benchmark failed; {kept} kept in {tmp}", file=sys.stderr)
        run.server.stop()
        raise
    run.server.stop()
    if not run.keep:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def scratch_dir(name: str, kept: str = "worker logs and server data") -> Iterator[Path]:
    """A new temporary directory ``actors-NAME-*``, removed at the end unless the block fails
    (then stderr says where it is and that ``kept`` is in it)."""
    tmp = Path(tempfile.mkdtemp(prefix=f"actors-{name}-"))
    try:
        yield tmp
    except BaseException:
        print(f"benchmark failed; {kept} kept in {tmp}", file=sys.stderr)
        raise
    shutil.rmtree(tmp, ignore_errors=True)


# ---- repeated runs ---------------------------------------------------------------------------
S = TypeVar("S")


def median_of(runs: Sequence[S], rate: Callable[[S], float]) -> tuple[S, str]:
    """The median run by ``rate`` (of an even count the lower middle one, so a run that
    happened) and the spread of all, e.g. ``median of 3 (1,204 / 1,250 / 1,391)``; ``""``
    for one run."""
    ordered = sorted(runs, key=rate)
    middle = ordered[(len(ordered) - 1) // 2]
    if len(ordered) == 1:
        return middle, ""
    return middle, f"median of {len(ordered)} ({' / '.join(f'{rate(r):,.0f}' for r in ordered)})"


# ---- worker processes ------------------------------------------------------------------------
def child_env(
    extra: Mapping[str, str] | None = None, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of a process this checkout starts: ``base`` (this process's by default)
    with this checkout on ``PYTHONPATH``, then ``extra``."""
    return {**(os.environ if base is None else base), "PYTHONPATH": str(ROOT), **(extra or {})}


def worker_argv(
    app_spec: str,
    url: str,
    namespace: str,
    *,
    shards: int = SHARDS,
    extra_args: Sequence[str] = (),
    module: str = "actors.cli",
) -> list[str]:
    """``python -m actors.cli --log-level WARNING worker APP --redis URL --namespace NS --shards N``."""
    return [sys.executable, "-m", module, "--log-level", "WARNING", "worker", app_spec,
            "--redis", url, "--namespace", namespace, "--shards", str(shards), *extra_args]  # fmt: skip


@dataclass
class Workers:
    """Worker processes that share one log file."""

    procs: list[subprocess.Popen[bytes]]
    log: Path
    spawned_at: float = 0.0
    """``time.perf_counter()`` just before the first was started."""
    stop_timeout: ClassVar[float] = 20.0
    """Seconds ``stop`` waits for each after SIGTERM before it kills it."""

    @classmethod
    def spawn(
        cls,
        argv: Sequence[str],
        count: int,
        log: Path,
        *,
        env: Mapping[str, str] | None = None,
        base_env: Mapping[str, str] | None = None,
        stdout_null: bool = False,
    ) -> Self:
        """Start ``count`` processes of ``argv`` (see ``worker_argv``) in this checkout, their
        output appended to ``log`` (stdout to /dev/null with ``stdout_null``); ``env`` and
        ``base_env`` as in ``child_env``."""
        environ = child_env(env, base_env)
        started = time.perf_counter()
        with open(log, "ab") as out:
            stdout: Any = subprocess.DEVNULL if stdout_null else out
            procs = [
                subprocess.Popen(argv, cwd=ROOT, env=environ, stdout=stdout, stderr=out) for _ in range(count)
            ]
        return cls(procs, log, started)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else "(no log)"

    def check_alive(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(
                    f"worker {p.pid} exited with {p.returncode}; {self.log}:\n{self.log_tail()}"
                )

    def rss_mib(self) -> list[float]:
        """Resident memory of each worker process (MiB), from /proc; 0 where unreadable."""
        sizes = []
        for p in self.procs:
            try:
                status = Path(f"/proc/{p.pid}/status").read_text()
                kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
            except (OSError, StopIteration, ValueError):
                kib = 0
            sizes.append(kib / 1024)
        return sizes

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


async def lease_owners(client: actors.Client, shards: int = SHARDS) -> list[str | None]:
    """Each shard's lease holder (None where it has none), in one round trip."""
    async with client.store.redis.pipeline(transaction=False) as pipe:
        for s in range(shards):
            pipe.get(client.store.keys.lease(s))
        values = await pipe.execute()
    return [v.decode().rpartition("|")[0] if v else None for v in values]


async def wait_balanced(
    client: actors.Client,
    workers: Workers,
    *,
    shards: int = SHARDS,
    even: bool = False,
    timeout: float = 60.0,
) -> None:
    """Until every shard is leased and every worker process holds at least one; with ``even``,
    also none more than its share (``shards / processes``, rounded up). Fails if a worker exits,
    or after ``timeout`` seconds."""
    share = math.ceil(shards / len(workers.procs)) if even else shards
    deadline = time.monotonic() + timeout
    while True:
        owners = await lease_owners(client, shards)
        held = [sum(1 for o in owners if o and f"-{p.pid}-" in o) for p in workers.procs]
        if all(owners) and min(held) >= 1 and max(held) <= share:
            return
        workers.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"shards not balanced over the workers after {timeout:.0f}s: held {held}, owners {owners}; "
                f"{workers.log}:\n{workers.log_tail()}"
            )
        await asyncio.sleep(POLL_S)

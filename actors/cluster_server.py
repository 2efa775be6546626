"""A local Redis/Valkey cluster for tests, benchmarks and trying a cluster out on one machine.

``LocalCluster`` starts ``masters`` primaries with ``replicas`` replicas each from the server
binary the embedded server uses (``find_binary``), on loopback ports in a directory of its own,
joins them with ``valkey-cli --cluster create`` (the CLI shipped beside the server) and waits
until every node says the cluster is ok and every replica has synced. Its ``url`` is a
``redis+cluster://`` URL with any node as the seed. ``kill`` SIGKILLs a node (a crash), and
``wait_failover`` waits for a replica to take over its slots. Production clusters are made by
their operators; this one has a short node timeout (1 s), so a replica takes a dead primary's
slots within about 3 s, and a replica syncs without the server's default 5 s delay.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ServerError
from .server_files import find_binary

__all__ = ["ClusterNode", "LocalCluster"]

READY_TIMEOUT = 60.0
START_ATTEMPTS = 5
"""Ports a new node is started on at most (see ``_answering``)."""


@dataclass
class ClusterNode:
    """One server process of a local cluster."""

    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class LocalCluster:
    directory: Path
    masters: int = 3
    replicas: int = 1
    node_timeout_ms: int = 1000
    binary: str | None = None
    appendfsync: str = "everysec"
    password: str = field(default_factory=lambda: secrets.token_hex(16))
    nodes: list[ClusterNode] = field(default_factory=list)

    @property
    def url(self) -> str:
        live = [node for node in self.nodes if node.alive] or self.nodes
        return f"redis+cluster://:{self.password}@127.0.0.1:{live[0].port}"

    def start(self) -> LocalCluster:
        binary = self.binary or find_binary()
        self.directory.mkdir(parents=True, exist_ok=True)
        for index in range(self.masters * (1 + self.replicas)):
            node = ClusterNode(_free_port(), self.directory / f"node-{index}")
            node.directory.mkdir(exist_ok=True)
            self.nodes.append(node)
            self._spawn(binary, node)
        for node in self.nodes:
            self._answering(binary, node)
        self._create(binary)
        return self

    def stop(self) -> None:
        """Stop every node, one after the other (stopped all at once, one of them was seen to
        take 15 s)."""
        for node in self.nodes:
            if node.process is None or not node.alive:
                continue
            node.process.terminate()
            try:
                node.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait()

    def kill(self, node: ClusterNode) -> None:
        """SIGKILL one node: what a crashed host looks like to the others."""
        if node.process is not None:
            with contextlib.suppress(ProcessLookupError):
                node.process.send_signal(signal.SIGKILL)
            node.process.wait()

    def restart(self, node: ClusterNode) -> None:
        """Start a killed node again on its port and data (it rejoins, as a replica if it lost
        its slots meanwhile)."""
        self._spawn(self.binary or find_binary(), node)
        if not self._wait_answer(node):
            raise ServerError(f"node {node.port} exited at restart (logs in {node.directory})")
        self._wait(self._all_ok, f"node {node.port} to rejoin and every replica to sync")

    def master_of(self, key: str) -> ClusterNode:
        """The live primary that serves ``key``'s slot now."""
        slot = int(self.cli(self._live(), "CLUSTER", "KEYSLOT", key))
        for row in self._rows():
            if "master" in row.flags and "fail" not in row.flags and row.serves(slot):
                return self._node(row.port)
        raise ServerError(f"no live primary serves slot {slot}")

    def primaries(self) -> list[ClusterNode]:
        return [self._node(r.port) for r in self._rows() if "master" in r.flags and "fail" not in r.flags]

    def replica_of(self, primary: ClusterNode) -> ClusterNode:
        rows = self._rows()
        ident = next(r.ident for r in rows if r.port == primary.port)
        return self._node(next(r.port for r in rows if r.master == ident))

    def wait_failover(self, dead: ClusterNode, timeout: float = READY_TIMEOUT) -> None:
        """Wait until a replica has taken ``dead``'s slots and the cluster is ok again."""

        def promoted() -> bool:
            row = next((r for r in self._rows() if r.port == dead.port), None)
            return (row is None or not row.spans) and self._state_ok()

        self._wait(promoted, f"a replica to take the slots of node {dead.port}", timeout)

    def wait_ok(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait until every live node says the cluster is ok and every replica has synced (after
        ``start``, or a ``restart`` that made a node a replica again)."""
        self._wait(self._all_ok, "every node to say the cluster is ok and every replica to sync", timeout)

    def cli(self, node: ClusterNode, *command: str) -> str:
        """One command on one node, through the CLI (so this module needs no client)."""
        out = subprocess.run(
            [self._cli_binary(), "-p", str(node.port), "--no-auth-warning", "-a", self.password, *command],
            capture_output=True, text=True, timeout=15, check=False,
        )  # fmt: skip
        return out.stdout.strip()

    # ---- making it -------------------------------------------------------------------------
    def _spawn(self, binary: str, node: ClusterNode) -> None:
        log = open(node.directory / "server.log", "ab")
        node.process = subprocess.Popen(
            [
                binary,
                "--port", str(node.port),
                "--bind", "127.0.0.1",
                "--dir", str(node.directory),
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms),
                # Each shard lives on its own: while one primary's slots wait for a replica,
                # the others serve theirs (and renew their leases) instead of all refusing.
                "--cluster-require-full-coverage", "no",
                "--shutdown-timeout", "0",  # a stop does not wait up to 10 s for lagging replicas
                "--appendonly", "yes",
                "--appendfsync", self.appendfsync,
                "--save", "",
                "--requirepass", self.password,
                "--masterauth", self.password,
                # a replica syncs at once, not after the default 5 s wait for more replicas
                "--repl-diskless-sync-delay", "0",
            ],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()

    def _create(self, binary: str) -> None:
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        out = subprocess.run(
            [self._cli_binary(), "--no-auth-warning", "-a", self.password, "--cluster", "create",
             *addresses, "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if out.returncode != 0:
            raise ServerError(f"could not create the cluster with {binary}: {out.stdout[-2000:]}{out.stderr}")
        self.wait_ok()

    def _answering(self, binary: str, node: ClusterNode) -> None:
        """Wait until a new node answers. Its ports were free when ``_free_port`` picked them,
        but another process may take one before the node binds it (on a busy machine an
        outgoing connection's ephemeral port lands there): the node exits, and is started
        again on other ports, afresh."""
        for _ in range(START_ATTEMPTS):
            if self._wait_answer(node):
                return
            (node.directory / "nodes.conf").unlink(missing_ok=True)  # it names the old port
            node.port = _free_port()
            self._spawn(binary, node)
        raise ServerError(
            f"node {node.port} exited at start {START_ATTEMPTS} times (logs in {node.directory})"
        )

    def _wait_answer(self, node: ClusterNode) -> bool:
        """Wait until ``node`` answers PING; False at once if its process exited."""
        self._wait(lambda: not node.alive or self.cli(node, "PING") == "PONG", f"node {node.port} to answer")
        return node.alive

    def _all_ok(self) -> bool:
        for node in (n for n in self.nodes if n.alive):
            if "cluster_state:ok" not in self.cli(node, "CLUSTER", "INFO"):
                return False
            info = self.cli(node, "INFO", "replication")
            if "role:slave" in info and "master_link_status:up" not in info:
                return False
            # A replica that just synced writes its first AOF, and refuses a SIGTERM meanwhile.
            if "aof_rewrite_in_progress:0" not in self.cli(node, "INFO", "persistence"):
                return False
        return True

    def _state_ok(self) -> bool:
        return all("cluster_state:ok" in self.cli(n, "CLUSTER", "INFO") for n in self.nodes if n.alive)

    def _rows(self) -> list[_Row]:
        return [_Row.parse(line) for line in self.cli(self._live(), "CLUSTER", "NODES").splitlines()]

    def _node(self, port: int) -> ClusterNode:
        return next(node for node in self.nodes if node.port == port)

    def _live(self) -> ClusterNode:
        return next(node for node in self.nodes if node.alive)

    def _cli_binary(self) -> str:
        server = self.binary or find_binary()
        for candidate in (Path(server).with_name("valkey-cli"), Path(server).with_name("redis-cli")):
            if os.access(candidate, os.X_OK):
                return str(candidate)
        found = shutil.which("valkey-cli") or shutil.which("redis-cli")
        if found is None:
            raise ServerError(f"no valkey-cli or redis-cli beside {server} or on PATH")
        return found

    def _wait(self, check: Callable[[], bool], what: str, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.05)
        raise ServerError(f"gave up waiting {timeout:g} s for {what} (logs in {self.directory})")


@dataclass(frozen=True)
class _Row:
    """One line of CLUSTER NODES: id, port, flags, its primary's id ('-' for a primary), slots."""

    ident: str
    port: int
    flags: str
    master: str
    spans: tuple[tuple[int, int], ...]

    @classmethod
    def parse(cls, line: str) -> _Row:
        parts = line.split()
        spans = []
        for span in parts[8:]:
            low, _, high = span.partition("-")
            if low.isdigit():
                spans.append((int(low), int(high or low)))
        port = int(parts[1].split("@")[0].rsplit(":", 1)[1])
        return cls(parts[0], port, parts[2], parts[3], tuple(spans))

    def serves(self, slot: int) -> bool:
        return any(low <= slot <= high for low, high in self.spans)


def _free_port() -> int:
    """A loopback port that is free, and so is the cluster bus port 10,000 above it."""
    for _ in range(200):
        port = random.randrange(20000, 55000)
        if _port_free(port) and _port_free(port + 10000):
            return port
    raise ServerError("found no free pair of loopback ports for a cluster node")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True

"""What one timed run of ``benchmarks.cluster`` cost each primary and the workers: the deltas
of ``INFO commandstats`` and ``INFO cpu`` of every primary, the workers' CPU, and the
connections each worker process held on each primary at the end."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from .common import Workers
from .latency import cpu_seconds
from .shards import connections_of

OWN_COMMANDS = frozenset({"info", "xinfo|groups", "xinfo|stream", "client|list"})
"""The benchmark's own calls in a window (reading these counters, polling the inboxes' lag);
the workers make none of them (their lag metric runs only with telemetry on)."""


@dataclass(frozen=True)
class Node:
    """One primary, as the tables name it, and a plain URL of it."""

    label: str
    url: str


@dataclass(frozen=True)
class Reading:
    calls: dict[str, int]
    cpu_s: float


@dataclass
class NodeCost:
    """One primary's share of a window: commands (those run inside scripts too, as
    commandstats counts them) and CPU seconds of the whole server process."""

    label: str
    commands: dict[str, int]
    cpu_s: float
    connections: list[int] = field(default_factory=list)
    """Each worker process's connections to this node at the end of the window."""

    @property
    def total(self) -> int:
        return sum(self.commands.values())


@dataclass
class WindowCost:
    nodes: list[NodeCost]
    worker_cpu_s: float
    """All the worker processes' CPU seconds in the window (0 without workers)."""

    def per_message(self, messages: int) -> dict[str, Any]:
        """The figures a table prints, per message (CPU in microseconds)."""
        per_node = [
            {
                "node": n.label,
                "commands": n.total / messages,
                "redis_cpu_us": n.cpu_s * 1e6 / messages,
                "connections_per_worker": n.connections,
            }
            for n in self.nodes
        ]
        summed: dict[str, int] = {}
        for n in self.nodes:
            for name, calls in n.commands.items():
                summed[name] = summed.get(name, 0) + calls
        return {
            "nodes": per_node,
            "commands": sum(n.total for n in self.nodes) / messages,
            "redis_cpu_us": sum(n.cpu_s for n in self.nodes) * 1e6 / messages,
            "worker_cpu_us": self.worker_cpu_s * 1e6 / messages,
            "by_command": {k: v / messages for k, v in sorted(summed.items(), key=lambda kv: -kv[1])},
        }


async def read_node(r: aioredis.Redis) -> Reading:
    stats = await r.info("commandstats")
    cpu = await r.info("cpu")
    calls = {name.removeprefix("cmdstat_"): int(row["calls"]) for name, row in stats.items()}
    return Reading(calls, float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]))


class ServerCounters:
    """A ``throughput.Window`` that reads every primary's counters and the workers' CPU when
    the window opens and closes; ``cost`` is the last window's."""

    def __init__(self, nodes: Sequence[Node]) -> None:
        self.nodes = list(nodes)
        self._clients = [aioredis.Redis.from_url(n.url) for n in self.nodes]
        self._start: list[Reading] = []
        self._worker_cpu = 0.0
        self.cost: WindowCost | None = None

    async def open(self, workers: Workers | None) -> None:
        self._worker_cpu = _workers_cpu(workers)
        self._start = list(await asyncio.gather(*map(read_node, self._clients)))

    async def close(self, workers: Workers | None) -> None:
        end = await asyncio.gather(*map(read_node, self._clients))
        worker_cpu = _workers_cpu(workers) - self._worker_cpu
        nodes = []
        for node, client, before, after in zip(self.nodes, self._clients, self._start, end, strict=True):
            commands = {
                name: calls - before.calls.get(name, 0)
                for name, calls in after.calls.items()
                if name not in OWN_COMMANDS and calls > before.calls.get(name, 0)
            }
            held = [await connections_of(client, p.pid) for p in workers.procs] if workers else []
            nodes.append(NodeCost(node.label, commands, after.cpu_s - before.cpu_s, held))
        self.cost = WindowCost(nodes, worker_cpu)

    def per_message(self, messages: int) -> dict[str, Any]:
        """The last window's ``WindowCost.per_message``."""
        if self.cost is None:
            raise RuntimeError("no window has closed yet")
        return self.cost.per_message(messages)

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()


def _workers_cpu(workers: Workers | None) -> float:
    return sum(cpu_seconds(p.pid) for p in workers.procs) if workers else 0.0

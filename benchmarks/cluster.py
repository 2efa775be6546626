"""Redis/Valkey Cluster: the same work on one server and on clusters of 1 and 3 primaries, the
durability levels on a cluster, and a primary's failover.

    python -m benchmarks.cluster [--messages 50000] [--actors 1000] [--processes 2] [--rounds 3]
                                 [--topologies single cluster1 cluster3]
                                 [--levels everysec replica fsync] [--level-messages 20000]
                                 [--sends 2000] [--asks 500] [--failovers 3]
                                 [--parts throughput levels failover] [--json PATH]

Every server is started by this command on free loopback ports in a temporary directory (AOF
on, fsync every second) and stopped at the end; clusters are ``actors.LocalCluster``s (the
shipped server binary, a node timeout of 1 s). Workers are real processes, 16 shards.

1. **throughput** on each topology, one after the other: ``single`` (one server),
   ``cluster1`` (a cluster of 1 primary) and ``cluster3`` (3 primaries), no replicas, with
   ``--processes`` worker processes each. Per round: the floor, ``XADD``s in pipelines of 100
   to the 16 shards' inbox keys (entry i to shard i mod 16) through redis-py's client of the
   topology (the cluster client splits each pipeline by node); ``drain``, a backlog of
   ``--messages`` increments to ``--actors`` Count actors, timed from the first lease until
   committed; ``send_many``, the workers running, chunks of 500 sent until committed (both
   ``benchmarks.throughput``'s runs, exactly-once checked). Over each timed window, per primary:
   the ``INFO commandstats`` deltas (commands run inside scripts count too, as the server counts
   them; the benchmark's own ``INFO``, ``XINFO`` and ``CLIENT LIST`` are left out), the
   ``INFO cpu`` delta (``used_cpu_sys + used_cpu_user``), and at its end each worker process's
   connections to it (``CLIENT LIST`` against the worker's sockets); and the workers' CPU. Each
   figure is the median round's. From the 3-primary ``send_many`` figures, an estimate of the
   primaries, shards and connections 10, 100 and 1,000 worker processes would need.
2. **levels** on a cluster of 3 primaries with a replica each: ``benchmarks.durability``'s
   measurements for each of ``--levels`` (one worker process; the floor on one primary):
   ``fsync`` with every node switched to ``appendfsync always`` (``CONFIG SET``) and back.
3. **failover** on that cluster, ``--processes`` workers running and one actor per shard sent
   an ``Add`` every 20 ms: ``--failovers`` times, SIGKILL a primary (a different one each time),
   and time the kill to the first committed turn of an actor of a shard it served, and to the
   cluster's promotion of its replica; restart it (it rejoins as a replica) before the next.
   Then every actor's total must not exceed the sends made to it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import actors
from actors.cluster_server import LocalCluster
from actors.keys import Keys
from actors.store.connection import make_client

from . import durability
from .cluster_counters import Node, ServerCounters
from .cluster_replicas import failover_lines, failovers, levels, node_url, shard_primaries
from .cluster_report import TOPOLOGIES, costs, estimate, estimate_lines, rates
from .common import SHARDS, argument_parser, load_average, median_of, scratch_dir, write_json
from .throughput import Result, floor_produce_pipelined, run_drain, run_e2e

PARTS = ("throughput", "levels", "failover")


@dataclass(frozen=True)
class Topology:
    kind: str
    url: str
    nodes: list[Node]
    shards_on: dict[str, int]
    """Shards whose keys each primary serves, by the node's label."""


@contextmanager
def topology(kind: str, tmp: Path) -> Iterator[Topology]:
    if kind == "single":
        server = actors.EmbeddedServer(tmp / kind).start()
        try:
            node = Node(f":{server.port}", server.url)
            yield Topology(kind, server.url, [node], {node.label: SHARDS})
        finally:
            server.stop()
        return
    cluster = LocalCluster(tmp / kind, masters=int(kind.removeprefix("cluster")), replicas=0).start()
    try:
        served = shard_primaries(cluster, "any")  # a shard's hash tag is its number, whatever the namespace
        primaries = sorted(cluster.primaries(), key=lambda n: n.port)
        nodes = [Node(f":{n.port}", node_url(cluster, n)) for n in primaries]
        shards_on = {f":{n.port}": served.count(n.port) for n in primaries}
        yield Topology(kind, cluster.url, nodes, shards_on)
    finally:
        cluster.stop()


# ---- part 1: one round on a topology ---------------------------------------------------------
@dataclass
class Run:
    result: Result
    cost: dict[str, Any]
    """``WindowCost.per_message`` of the run's timed window."""


async def floor(top: Topology, n: int, actor_count: int, counters: ServerCounters) -> Run:
    keys = Keys(f"floor-{uuid.uuid4().hex[:6]}")
    r = make_client(top.url, 0)
    try:
        await counters.open(None)
        seconds = await floor_produce_pipelined(r, [keys.inbox(s) for s in range(SHARDS)], n, actor_count)
        await counters.close(None)
    finally:
        await r.aclose()
    result = Result("floor", "floor: XADD to the 16 inboxes, pipelines of 100", n, seconds)
    return Run(result, counters.per_message(n))


async def one_round(top: Topology, tmp: Path, args: argparse.Namespace) -> list[Run]:
    """The floor, a drain and a ``send_many`` run, each with its cost per message."""
    n, actor_count, processes = args.messages, args.actors, args.processes
    counters = ServerCounters(top.nodes)
    try:
        runs = [await floor(top, n, actor_count, counters)]
        drained = await run_drain(top.url, tmp, processes, n, actor_count, counters)
        runs.append(Run(drained, counters.per_message(n)))
        sent = await run_e2e(top.url, tmp, processes, n, actor_count, False, counters)
        runs.append(Run(sent, counters.per_message(n)))
    finally:
        await counters.aclose()
    return runs


async def throughput(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Per topology: its shards per primary and, per measurement, the median round's figures
    with every round's rate."""
    out: dict[str, Any] = {}
    for kind in args.topologies:
        samples: dict[str, list[Run]] = {}
        with topology(kind, tmp) as top:
            for _ in range(args.rounds):
                for run in await one_round(top, tmp, args):
                    samples.setdefault(run.result.key.split("_")[0], []).append(run)
        figures = {}
        for key, runs in samples.items():
            middle, _ = median_of(runs, lambda run: run.result.rate)
            figures[key] = {
                "msgs_per_s": middle.result.rate, "runs": [run.result.rate for run in runs],
                "note": middle.result.note, **middle.cost,
            }  # fmt: skip
        out[kind] = {"shards_on": top.shards_on, "results": figures}
    return out


# ---- main -----------------------------------------------------------------------------------------
def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argument_parser(__doc__)
    parser.add_argument("--messages", type=int, default=50_000, help="N for the floor, drain and send_many")
    parser.add_argument("--actors", type=int, default=1_000, help="Count actors the messages go to")
    parser.add_argument("--processes", type=int, default=2, help="worker processes (throughput, failover)")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds per topology; medians")
    parser.add_argument("--topologies", nargs="*", default=list(TOPOLOGIES), choices=list(TOPOLOGIES))
    parser.add_argument(
        "--levels", nargs="*", default=["everysec", "replica", "fsync"], choices=durability.LEVELS
    )
    parser.add_argument(
        "--level-messages", type=int, default=20_000, help="N for drain and send_many per level"
    )
    parser.add_argument("--sends", type=int, default=2_000, help="awaited sends (and floor XADDs) per level")
    parser.add_argument("--asks", type=int, default=500, help="awaited asks per level")
    parser.add_argument("--failovers", type=int, default=3, help="primaries killed, one after the other")
    parser.add_argument("--parts", nargs="*", default=list(PARTS), choices=PARTS)
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    return parser.parse_args(argv)


def level_args(args: argparse.Namespace) -> argparse.Namespace:
    """``benchmarks.durability``'s arguments for one round of each level."""
    return argparse.Namespace(
        rounds=1, messages=args.level_messages, actors=args.actors, sends=args.sends, asks=args.asks,
        levels=args.levels,
    )  # fmt: skip


async def replicated(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cluster = LocalCluster(tmp / "replicated", masters=3, replicas=1).start()
    try:
        if "levels" in args.parts:
            out["levels"] = await levels(cluster, tmp, level_args(args))
        if "failover" in args.parts:
            out["failover"] = await failovers(cluster, tmp, args.failovers, args.processes)
    finally:
        cluster.stop()
    return out


async def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    load_before = load_average()
    payload: dict[str, Any] = {}
    with scratch_dir("cluster") as tmp:
        if "throughput" in args.parts:
            payload["throughput"] = await throughput(tmp, args)
            payload["estimate"] = estimate(payload["throughput"])
        if {"levels", "failover"} & set(args.parts):
            payload.update(await replicated(tmp, args))
    header = [
        f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{durability.server_version()}, loopback; load average before {load_before}, after {load_average()}",
        f"{args.actors} Count actors, {SHARDS} shards; throughput: {args.messages} messages, "
        f"{args.processes} worker processes, rounds {args.rounds}",
    ]
    lines = [*header]
    if "throughput" in payload:
        lines += ["", "1. Throughput, beside the floor measured on the same topology", ""]
        lines += rates(payload["throughput"])
        lines += [
            "",
            f"Per message: commands / Redis CPU µs, and each worker's connections ({args.processes} workers)",
        ]
        lines += costs(payload["throughput"])
        if payload["estimate"]:
            lines += ["", *estimate_lines(payload["estimate"])]
    if "levels" in payload:
        lines += [
            "",
            "2. Durability levels on a cluster of 3 primaries + 3 replicas (one worker process)",
            "",
        ]
        lines += durability.table(payload["levels"])
    if "failover" in payload:
        lines += [
            "",
            f"3. Failover of a primary (3 primaries + 3 replicas, {args.processes} worker processes)",
            "",
        ]
        lines += failover_lines(payload["failover"])
    print("\n".join(lines))
    if args.json:
        write_json(args.json, {"header": header, **payload})


if __name__ == "__main__":
    asyncio.run(main())

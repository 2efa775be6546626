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
import math
import os
import platform
import shutil
import sys
import tempfile
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
from .common import SHARDS, argument_parser, load_average, median_of, write_json
from .throughput import Result, floor_produce_pipelined, run_drain, run_e2e

TOPOLOGIES = {"single": "single server", "cluster1": "cluster, 1 primary", "cluster3": "cluster, 3 primaries"}
PARTS = ("throughput", "levels", "failover")
ESTIMATE_PROCESSES = (10, 100, 1_000)
SHARDS_PER_PROCESS = 4
"""The README's rule for choosing a shard count: at least 4 per worker process."""
PRIMARY_CPU_SHARE = 0.5
"""The share of its core a primary is planned to use: headroom for bursts, its replica and a
failover's catch-up."""


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
        ports = shard_primaries(cluster, "any")  # a shard's hash tag is its number, whatever the namespace
        nodes = [Node(f":{n.port}", node_url(cluster, n)) for n in sorted(cluster.primaries(), key=lambda n: n.port)]
        yield Topology(kind, cluster.url, nodes, {n.label: ports.count(int(n.label[1:])) for n in nodes})
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
    assert counters.cost is not None
    result = Result("floor", "floor: XADD to the 16 inboxes, pipelines of 100", n, seconds)
    return Run(result, counters.cost.per_message(n))


async def one_round(top: Topology, tmp: Path, args: argparse.Namespace) -> list[Run]:
    counters = ServerCounters(top.nodes)
    runs = [await floor(top, args.messages, args.actors, counters)]
    try:
        for e2e in (False, True):
            if e2e:
                result = await run_e2e(top.url, tmp, args.processes, args.messages, args.actors, False, counters)
            else:
                result = await run_drain(top.url, tmp, args.processes, args.messages, args.actors, counters)
            assert counters.cost is not None
            runs.append(Run(result, counters.cost.per_message(result.messages)))
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


# ---- part 1: the report and the estimate ---------------------------------------------------------
def rate_cell(figures: dict[str, Any]) -> str:
    runs = figures["runs"]
    spread = f" ({' / '.join(f'{v:,.0f}' for v in sorted(runs))})" if len(runs) > 1 else ""
    return f"{figures['msgs_per_s']:,.0f}{spread}"


def throughput_lines(results: dict[str, Any], processes: int) -> list[str]:
    lines = [
        f"{'topology':<22} {'floor XADD msgs/s':>24} {'drain msgs/s':>24} {'send_many msgs/s':>24} "
        f"{'drain/floor':>11} {'send_many/floor':>15}"
    ]
    for kind, found in results.items():
        r = found["results"]
        lines.append(
            f"{TOPOLOGIES[kind]:<22} {rate_cell(r['floor']):>24} {rate_cell(r['drain']):>24} "
            f"{rate_cell(r['e2e']):>24} {r['drain']['msgs_per_s'] / r['floor']['msgs_per_s']:>11.2f} "
            f"{r['e2e']['msgs_per_s'] / r['floor']['msgs_per_s']:>15.2f}"
        )
    lines += ["", f"Per message, per primary ({processes} worker processes; CPU in µs; conns: each worker's, at the end):"]
    lines.append(
        f"{'topology':<22} {'primary':<8} {'shards':>6} {'floor cmds/cpu':>15} {'drain cmds/cpu':>15} "
        f"{'send_many cmds/cpu':>19}  conns drain / send_many"
    )
    for kind, found in results.items():
        r = found["results"]
        for i, node in enumerate(r["drain"]["nodes"]):
            cells = [f"{r[k]['nodes'][i]['commands']:.2f} / {r[k]['nodes'][i]['redis_cpu_us']:.1f}" for k in ("floor", "drain", "e2e")]
            conns = " / ".join(str(r[k]["nodes"][i]["connections_per_worker"]) for k in ("drain", "e2e"))
            name = TOPOLOGIES[kind] if i == 0 else ""
            lines.append(
                f"{name:<22} {node['node']:<8} {found['shards_on'][node['node']]:>6} {cells[0]:>15} {cells[1]:>15} {cells[2]:>19}  {conns}"
            )
        cells = [f"{r[k]['commands']:.2f} / {r[k]['redis_cpu_us']:.1f}" for k in ("floor", "drain", "e2e")]
        lines.append(f"{'':<22} {'all':<8} {SHARDS:>6} {cells[0]:>15} {cells[1]:>15} {cells[2]:>19}")
        lines.append(
            f"{'':<22} workers' CPU per message: drain {r['drain']['worker_cpu_us']:.0f} µs, "
            f"send_many {r['e2e']['worker_cpu_us']:.0f} µs"
        )
        top = ", ".join(f"{k} {v:.2f}" for k, v in list(r["e2e"]["by_command"].items())[:8])
        lines.append(f"{'':<22} send_many, commands per message, all primaries: {top}")
    return lines


def estimate(results: dict[str, Any]) -> dict[str, Any] | None:
    """Primaries, shards and connections for ``ESTIMATE_PROCESSES`` worker processes, each busy
    on a core of its own, from the 3-primary ``send_many`` figures (Redis and worker CPU per
    message) and the connections a worker held; a linear extrapolation."""
    found = results.get("cluster3", {}).get("results", {}).get("e2e")
    if found is None:
        return None
    redis_us, worker_us = found["redis_cpu_us"], found["worker_cpu_us"]
    per_node = [c for node in found["nodes"] for c in node["connections_per_worker"]]
    rows = []
    for processes in ESTIMATE_PROCESSES:
        rate = processes * 1e6 / worker_us
        cores = rate * redis_us / 1e6
        primaries = max(1, math.ceil(cores / PRIMARY_CPU_SHARE))
        shards = SHARDS_PER_PROCESS * processes
        rows.append({
            "processes": processes, "msgs_per_s": rate, "redis_cores": cores, "primaries": primaries,
            "shards": shards,
        })  # fmt: skip
    return {
        "redis_cpu_us": redis_us, "worker_cpu_us": worker_us,
        "connections_per_worker_per_primary": max(per_node, default=0), "rows": rows,
    }  # fmt: skip


def estimate_lines(est: dict[str, Any]) -> list[str]:
    lines = [
        f"From the 3-primary send_many run: Redis {est['redis_cpu_us']:.1f} µs and workers "
        f"{est['worker_cpu_us']:.0f} µs of CPU per message; a worker held at most "
        f"{est['connections_per_worker_per_primary']} connections to a primary. Each process busy on a core "
        f"of its own, each primary at most {PRIMARY_CPU_SHARE:.0%} of one:",
        f"{'processes':>9} {'msgs/s':>12} {'Redis cores':>12} {'primaries':>10} {'shards':>7}",
    ]
    for row in est["rows"]:
        lines.append(
            f"{row['processes']:>9,} {row['msgs_per_s']:>12,.0f} {row['redis_cores']:>12.1f} "
            f"{row['primaries']:>10,} {row['shards']:>7,}"
        )
    return lines


# ---- main -----------------------------------------------------------------------------------------
def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argument_parser(__doc__)
    parser.add_argument("--messages", type=int, default=50_000, help="N for the floor, drain and send_many")
    parser.add_argument("--actors", type=int, default=1_000, help="Count actors the messages go to")
    parser.add_argument("--processes", type=int, default=2, help="worker processes (throughput, failover)")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds per topology; medians")
    parser.add_argument("--topologies", nargs="*", default=list(TOPOLOGIES), choices=list(TOPOLOGIES))
    parser.add_argument("--levels", nargs="*", default=["everysec", "replica", "fsync"], choices=durability.LEVELS)
    parser.add_argument("--level-messages", type=int, default=20_000, help="N for drain and send_many per level")
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
    tmp = Path(tempfile.mkdtemp(prefix="actors-cluster-"))
    payload: dict[str, Any] = {}
    try:
        if "throughput" in args.parts:
            payload["throughput"] = await throughput(tmp, args)
            payload["estimate"] = estimate(payload["throughput"])
        if {"levels", "failover"} & set(args.parts):
            payload.update(await replicated(tmp, args))
    except BaseException:
        print(f"benchmark failed; worker logs and server data kept in {tmp}", file=sys.stderr)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    header = [
        f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, {durability.server_version()}, "
        f"loopback; load average before {load_before}, after {load_average()}",
        f"{args.actors} Count actors, {SHARDS} shards; throughput: {args.messages} messages, "
        f"{args.processes} worker processes, rounds {args.rounds}",
    ]
    lines = [*header]
    if "throughput" in payload:
        lines += ["", "1. Throughput, beside the floor measured on the same topology", ""]
        lines += throughput_lines(payload["throughput"], args.processes)
        if payload["estimate"]:
            lines += ["", *estimate_lines(payload["estimate"])]
    if "levels" in payload:
        lines += ["", "2. Durability levels on a cluster of 3 primaries + 3 replicas (one worker process)", ""]
        lines += durability.table(payload["levels"])
    if "failover" in payload:
        lines += ["", f"3. Failover of a primary (3 primaries + 3 replicas, {args.processes} worker processes)", ""]
        lines += failover_lines(payload["failover"])
    print("\n".join(lines))
    if args.json:
        write_json(args.json, {"header": header, **payload})


if __name__ == "__main__":
    asyncio.run(main())

"""The tables ``benchmarks.cluster`` prints for its throughput part, and the estimate it makes
from them of what 10, 100 and 1,000 worker processes would need."""

from __future__ import annotations

import math
from typing import Any

from .common import SHARDS

TOPOLOGIES = {"single": "single server", "cluster1": "cluster, 1 primary", "cluster3": "cluster, 3 primaries"}
MEASURES = (("floor", "floor"), ("drain", "drain"), ("e2e", "send_many"))
"""The measurements of each topology (key, name in the tables)."""
ESTIMATE_PROCESSES = (10, 100, 1_000)
SHARDS_PER_PROCESS = 4
"""The README's rule for choosing a shard count: at least 4 per worker process."""
PRIMARY_CPU_SHARE = 0.5
"""The share of its core a primary is planned to use: headroom for bursts, its replica and a
failover's catch-up."""
PER_RATE = 100_000
"""The estimate also says what each PER_RATE msgs/s costs."""


def rate_cell(figures: dict[str, Any]) -> str:
    """The median rate, with every round's beside it."""
    runs = figures["runs"]
    spread = f" ({' / '.join(f'{v:,.0f}' for v in sorted(runs))})" if len(runs) > 1 else ""
    return f"{figures['msgs_per_s']:,.0f}{spread}"


def rates(results: dict[str, Any]) -> list[str]:
    head = f"{'topology':<22}" + "".join(f" {name + ' msgs/s':>26}" for _, name in MEASURES)
    lines = [head + "  drain, send_many / floor"]
    for kind, found in results.items():
        r = found["results"]
        floor = r["floor"]["msgs_per_s"]
        cells = "".join(f" {rate_cell(r[key]):>26}" for key, _ in MEASURES)
        ratios = f"{r['drain']['msgs_per_s'] / floor:.2f}, {r['e2e']['msgs_per_s'] / floor:.2f}"
        lines.append(f"{TOPOLOGIES[kind]:<22}{cells}  {ratios}")
    return lines


def costs(results: dict[str, Any]) -> list[str]:
    """Per primary and in all: commands and Redis CPU per message of each measurement, each
    worker's connections to it at the end of drain and send_many; the workers' CPU and the
    commands of send_many by name."""
    head = f"{'topology':<22} {'primary':<8} {'shards':>6}" + "".join(f" {name:>16}" for _, name in MEASURES)
    lines = [head + "  connections: drain / send_many"]
    for kind, found in results.items():
        r = found["results"]
        for i, node in enumerate(r["drain"]["nodes"]):
            cells = "".join(f" {_cost(r[key]['nodes'][i]):>16}" for key, _ in MEASURES)
            conns = " / ".join(str(r[key]["nodes"][i]["connections_per_worker"]) for key in ("drain", "e2e"))
            name = TOPOLOGIES[kind] if i == 0 else ""
            lines.append(
                f"{name:<22} {node['node']:<8} {found['shards_on'][node['node']]:>6}{cells}  {conns}"
            )
        if len(r["drain"]["nodes"]) > 1:
            lines.append(
                f"{'':<22} {'all':<8} {SHARDS:>6}" + "".join(f" {_cost(r[k]):>16}" for k, _ in MEASURES)
            )
        workers = f"drain {r['drain']['worker_cpu_us']:.0f} µs, send_many {r['e2e']['worker_cpu_us']:.0f} µs"
        by_name = ", ".join(f"{k} {v:.2f}" for k, v in list(r["e2e"]["by_command"].items())[:8])
        lines += [f"{'':<22} workers' CPU per message: {workers}", f"{'':<22} send_many: {by_name}"]
    return lines


def _cost(figures: dict[str, Any]) -> str:
    return f"{figures['commands']:.2f} / {figures['redis_cpu_us']:.1f}"


def estimate(results: dict[str, Any]) -> dict[str, Any] | None:
    """For ``ESTIMATE_PROCESSES`` worker processes, each busy on a core of its own: the rate,
    Redis cores, primaries (each at most ``PRIMARY_CPU_SHARE`` of a core) and shards, from the
    3-primary ``send_many`` figures (Redis and worker CPU per message): a linear extrapolation.
    Also the most connections a worker held to one primary, and to all."""
    found = results.get("cluster3", {}).get("results", {})
    if "e2e" not in found:
        return None
    redis_us, worker_us = found["e2e"]["redis_cpu_us"], found["e2e"]["worker_cpu_us"]
    rows = []
    for processes in ESTIMATE_PROCESSES:
        rate = processes * 1e6 / worker_us
        cores = rate * redis_us / 1e6
        primaries = max(1, math.ceil(cores / PRIMARY_CPU_SHARE))
        shards = SHARDS_PER_PROCESS * processes
        rows.append(
            {
                "processes": processes,
                "msgs_per_s": rate,
                "redis_cores": cores,
                "primaries": primaries,
                "shards": shards,
            }
        )
    held = {key: _connections(found[key]["nodes"]) for key in ("drain", "e2e")}
    return {"redis_cpu_us": redis_us, "worker_cpu_us": worker_us, "rows": rows, "connections": held}


def _connections(nodes: list[dict[str, Any]]) -> dict[str, int]:
    """The most connections one worker held to one primary, and to all of them."""
    per_worker = [sum(counts) for counts in zip(*(n["connections_per_worker"] for n in nodes), strict=True)]
    one = max((c for n in nodes for c in n["connections_per_worker"]), default=0)
    return {"one_primary": one, "all_primaries": max(per_worker, default=0)}


def estimate_lines(est: dict[str, Any]) -> list[str]:
    redis_us, worker_us = est["redis_cpu_us"], est["worker_cpu_us"]
    per_rate = PER_RATE * redis_us / 1e6
    held = est["connections"]
    lines = [
        f"From the 3-primary send_many run: {redis_us:.1f} µs of Redis CPU and {worker_us:.0f} µs of the "
        f"workers' per message, so every {PER_RATE:,} msgs/s takes {per_rate:.2f} Redis cores "
        f"({math.ceil(per_rate / PRIMARY_CPU_SHARE)} primaries at most {PRIMARY_CPU_SHARE:.0%} busy) and "
        f"{PER_RATE * worker_us / 1e6:.1f} worker cores.",
        f"A worker held at most {held['drain']['one_primary']} connections to one primary and "
        f"{held['drain']['all_primaries']} in all after drain, {held['e2e']['one_primary']} and "
        f"{held['e2e']['all_primaries']} after send_many.",
        "Every worker process busy on a core of its own:",
        f"{'processes':>9} {'shards':>7} {'msgs/s':>12} {'Redis cores':>12} {'primaries':>10}",
    ]
    for row in est["rows"]:
        lines.append(
            f"{row['processes']:>9,} {row['shards']:>7,} {row['msgs_per_s']:>12,.0f} "
            f"{row['redis_cores']:>12.1f} {row['primaries']:>10,}"
        )
    return lines

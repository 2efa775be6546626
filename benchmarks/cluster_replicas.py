"""The parts of ``benchmarks.cluster`` that run on a cluster of 3 primaries with a replica each:
the durability levels (``benchmarks.durability``'s measurements) and a primary's failover."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
import uuid
from collections import Counter as Tally
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import actors
from actors.cluster_server import ClusterNode, LocalCluster
from actors.keys import Keys
from tests.apps import Add, Counter, Get, app

from . import durability
from .common import SHARDS, Workers, wait_balanced, worker_argv
from .shards import probe_keys
from .throughput import STALL_S, wait_committed

SEND_EVERY_S = 0.02
"""Each shard's actor is sent an ``Add`` this often during the failovers (16 shards: 800/s)."""
FIRST_TURN_TIMEOUT_S = 60.0
POLL_S = 0.01


def node_url(cluster: LocalCluster, node: ClusterNode) -> str:
    """A plain URL of one node (its INFO, or commands on keys it serves)."""
    return f"redis://:{cluster.password}@127.0.0.1:{node.port}"


def shard_primaries(cluster: LocalCluster, namespace: str, shards: int = SHARDS) -> list[int]:
    """The port of the primary serving each shard's keys now, shard s at index s."""
    keys = Keys(namespace)
    return [cluster.master_of(keys.inbox(s)).port for s in range(shards)]


# ---- durability levels ------------------------------------------------------------------------
def set_appendfsync(cluster: LocalCluster, policy: str) -> None:
    """Every node's ``appendfsync`` (``fsync`` needs ``always`` on every primary)."""
    for node in cluster.nodes:
        if cluster.cli(node, "CONFIG", "SET", "appendfsync", policy) != "OK":
            raise RuntimeError(f"node {node.port} refused appendfsync {policy}")


async def levels(cluster: LocalCluster, tmp: Path, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Each level's figures (``durability.Figures.summary``) on ``cluster``; the floor runs on
    one primary, on a stream it serves. ``fsync`` runs last, with every node switched to
    ``appendfsync always`` and back."""
    primary = cluster.primaries()[0]
    stream = next(
        k for k in (f"floor:{i}" for i in range(10_000)) if cluster.master_of(k).port == primary.port
    )
    floor_at = (node_url(cluster, primary), stream)
    results = {}
    for level in sorted(args.levels, key=lambda name: name == "fsync"):
        if level == "fsync":
            set_appendfsync(cluster, "always")
        try:
            figures = await durability.rounds(cluster.url, level, tmp, args, floor_at)
        finally:
            if level == "fsync":
                set_appendfsync(cluster, "everysec")
        results[level] = figures.summary()
    return {level: results[level] for level in args.levels}


# ---- failover ---------------------------------------------------------------------------------
@dataclass
class Failover:
    """One SIGKILL of a primary, timed from the kill."""

    killed_port: int
    shards_there: int
    promoted_s: float
    """Until a replica held the killed node's slots and every live node said the cluster is ok
    (``LocalCluster.wait_failover``, which polls through the CLI: about 0.1 s coarse)."""
    first_send_s: float
    """Until a send to that actor returned."""
    first_turn_s: float
    """Until a turn of an actor of a shard the killed node served had committed (its state,
    polled every 10 ms, shows an increment sent after the kill)."""
    failed_sends: dict[str, int]
    """Sends to any actor that raised from the kill until the first turn, by error type."""


@dataclass
class SteadyLoad:
    """One ``Add`` to each shard's actor every SEND_EVERY_S, counting the sends that returned
    and those that raised (whose message may or may not have been written)."""

    client: actors.Client
    refs: list[actors.ActorRef[Any]]
    paused: set[int] = field(default_factory=set)
    sent: list[int] = field(default_factory=list)
    errors: Tally[str] = field(default_factory=Tally)
    failed: list[int] = field(default_factory=list)
    returned_at: dict[int, float] = field(default_factory=dict)
    """perf_counter time of a send to the shard's actor that returned, the first since the
    shard's entry was removed."""
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self.sent = [0] * len(self.refs)
        self.failed = [0] * len(self.refs)
        self._tasks = [asyncio.create_task(self._loop(s)) for s in range(len(self.refs))]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _loop(self, shard: int) -> None:
        while True:
            await asyncio.sleep(SEND_EVERY_S)
            if shard in self.paused:
                continue
            try:
                await self.client.send(self.refs[shard], Add(by=1))
                self.sent[shard] += 1
                self.returned_at.setdefault(shard, time.perf_counter())
            except asyncio.CancelledError:  # stopped while a send was in flight: its outcome is
                self.failed[shard] += 1  # unknown too (it was counted in neither list before)
                raise
            except Exception as exc:  # the outcome of a send that raised is unknown
                self.errors[type(exc).__name__] += 1
                self.failed[shard] += 1


async def first_turn_after(client: actors.Client, ref: actors.ActorRef[Any], base: int) -> None:
    """Until ``ref``'s committed total passes ``base`` (reads that fail meanwhile are retried)."""
    async with asyncio.timeout(FIRST_TURN_TIMEOUT_S):
        while True:
            with contextlib.suppress(Exception):
                state = await client.state(ref)
                if state is not None and state.total > base:
                    return
            await asyncio.sleep(POLL_S)


async def one_failover(
    cluster: LocalCluster, client: actors.Client, workers: Workers, load: SteadyLoad, n: int
) -> Failover:
    ns = client.store.keys.namespace
    served = shard_primaries(cluster, ns)
    victim = sorted(cluster.primaries(), key=lambda node: node.port)[n % 3]
    shard = served.index(victim.port)
    ref = load.refs[shard]
    load.paused.add(shard)
    await asyncio.sleep(5 * SEND_EVERY_S)  # a send in flight has reached the inbox
    # the ask's turn runs after every send before it: the total read is then quiet
    base = (await client.ask(ref, Get(), timeout=30)).total
    errors_before = Tally(load.errors)
    started = time.perf_counter()
    cluster.kill(victim)
    promotion = asyncio.create_task(asyncio.to_thread(_timed_failover, cluster, victim, started))
    load.returned_at.pop(shard, None)
    load.paused.discard(shard)
    await first_turn_after(client, ref, base)
    first = time.perf_counter() - started
    first_send = load.returned_at[shard] - started
    failed = dict(load.errors - errors_before)
    promoted = await promotion
    await asyncio.to_thread(cluster.restart, victim)
    await asyncio.to_thread(cluster.wait_ok)
    await wait_balanced(client, workers)
    return Failover(victim.port, served.count(victim.port), promoted, first_send, first, failed)


def _timed_failover(cluster: LocalCluster, dead: ClusterNode, started: float) -> float:
    cluster.wait_failover(dead)
    return time.perf_counter() - started


async def failovers(cluster: LocalCluster, tmp: Path, rounds: int, processes: int) -> dict[str, Any]:
    """``rounds`` SIGKILLs of a primary (a different one each time, restarted as a replica
    after), ``processes`` workers running and each shard's actor sent a steady load; then the
    exactly-once bounds: no actor's total above the sends that returned plus those that raised."""
    ns = f"failover-{uuid.uuid4().hex[:6]}"
    workers = Workers.spawn(worker_argv("tests.apps:app", cluster.url, ns), processes, tmp / f"{ns}.log")
    try:
        async with actors.connect(cluster.url, namespace=ns, app=app, shards=SHARDS) as client:
            await wait_balanced(client, workers)
            load = SteadyLoad(client, [Counter.ref(k) for k in probe_keys(SHARDS, "Counter")])
            load.start()
            runs = []
            for n in range(rounds):
                runs.append(await one_failover(cluster, client, workers, load, n))
            await load.stop()
            await wait_committed(client, workers, STALL_S)
            totals = [(await client.state(ref)).total for ref in load.refs]
    finally:
        workers.stop()
    return {"runs": [asdict(r) for r in runs], "exactly_once": exactly_once(load, totals)}


def exactly_once(load: SteadyLoad, totals: list[int]) -> dict[str, int]:
    """Each actor's total lies between its sends that returned (less any lost with the killed
    primary: ``everysec`` waits for no replica) and those plus the sends that raised."""
    doubled = sum(max(0, t - s - f) for t, s, f in zip(totals, load.sent, load.failed, strict=True))
    lost = sum(max(0, s - t) for t, s in zip(totals, load.sent, strict=True))
    if doubled:
        raise RuntimeError(f"exactly-once check FAILED: {doubled} increments beyond every send made")
    return {"sent": sum(load.sent), "raised": sum(load.failed), "totals": sum(totals), "lost": lost}


def failover_lines(result: dict[str, Any]) -> list[str]:
    runs = result["runs"]
    lines = [
        f"{'killed primary':<16} {'shards there':>12} {'promoted s':>11} {'first send s':>13} "
        f"{'first turn s':>13}  sends raised meanwhile (all actors)"
    ]
    for r in runs:
        raised = ", ".join(f"{k} x{v}" for k, v in r["failed_sends"].items()) or "none"
        lines.append(
            f"{':' + str(r['killed_port']):<16} {r['shards_there']:>12} {r['promoted_s']:>11.2f} "
            f"{r['first_send_s']:>13.2f} {r['first_turn_s']:>13.2f}  {raised}"
        )
    if runs:
        firsts = [r["first_turn_s"] for r in runs]
        lines.append(f"first turn: median {statistics.median(firsts):.2f} s, max {max(firsts):.2f} s")
    once = result["exactly_once"]
    lines.append(
        f"sends that returned {once['sent']}, that raised {once['raised']}; actors' totals {once['totals']} "
        f"(none beyond the sends made; {once['lost']} acknowledged increments lost)"
    )
    return lines

"""``python -m benchmarks.elastic``: a worker joins and one leaves under load (issue #16).

One producer offers a steady ``--rate`` of increments to ``--actors`` counter actors (16
shards). One worker process runs from the start; a second joins at ``--join`` seconds; the
first leaves (SIGTERM) at ``--leave`` seconds; the producer stops at ``--duration``. Every
100 ms the run notes what was sent and what the workers have handled (the inboxes' entries
read into the consumer group and acked, from ``XINFO GROUPS``), which gives:

* the throughput trace (handled per second, per 100 ms bucket) and the backlog's delay
  (messages sent and not handled, over the offered rate) around each event;
* each hand-over: for every shard that moved, from the moment its old owner began to drain
  it to the moment its new owner acquired it (from the workers' log lines);
* the longest dip: the longest run of buckets handling under half the offered rate while a
  backlog waits.

The floor, measured in the same run: the same producer's ``XADD`` pipelines with nothing
reading them (the rate the producer can offer at all). Every counter's total is checked at
the end (exactly once).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import actors
from benchmarks.common import (
    SHARDS,
    Workers,
    argument_parser,
    lease_owners,
    private_server,
    worker_argv,
    write_json,
)
from benchmarks.throughput import APP_SPEC, app, check_totals, increments
from benchmarks.workflows import quantile

BUCKET_S = 0.1


@dataclass
class Trace:
    started: float = field(default_factory=time.monotonic)
    rows: list[tuple[float, int, int]] = field(default_factory=list)
    """(seconds since start, sent, handled)."""
    events: dict[str, float] = field(default_factory=dict)
    """What happened (join, leave, stop), in seconds since start."""

    def now(self) -> float:
        return time.monotonic() - self.started


async def handled(client: actors.Client) -> int:
    """Inbox entries taken into the group and acked, over every shard."""
    keys = client.store.keys
    async with client.store.redis.pipeline(transaction=False) as pipe:
        for s in range(SHARDS):
            pipe.xinfo_groups(keys.inbox(s))
        replies = await pipe.execute(raise_on_error=False)
    total = 0
    for groups in replies:
        if isinstance(groups, Exception):
            continue
        for group in groups:
            total += int(group.get("entries-read") or 0) - int(group.get("pending") or 0)
    return total


async def produce(client: actors.Client, args: argparse.Namespace, trace: Trace, sent: list[int]) -> int:
    """Send ``--rate`` increments a second in chunks every 10 ms until ``--duration``, keeping
    the count sent so far in ``sent[0]`` for the observer; returns how many."""
    while trace.now() < args.duration:
        due = int(trace.now() * args.rate)
        if due > sent[0]:
            await client.send_many(increments(sent[0], due, args.actors))
            sent[0] = due
        await asyncio.sleep(0.01)
    trace.events["stop"] = trace.now()
    return sent[0]


async def observe(client: actors.Client, trace: Trace, sent: list[int], until: asyncio.Event) -> None:
    while not until.is_set():
        trace.rows.append((trace.now(), sent[0], await handled(client)))
        await asyncio.sleep(BUCKET_S)


LOG_LINE = re.compile(r"^(\S+ \S+) INFO actors\.supervisor: (releasing|acquired) shard (\d+)")


def handovers(log: Path, since: datetime) -> list[float]:
    """Per shard moved: ms from its old owner starting to drain it to its new owner acquiring it."""
    releasing: dict[int, datetime] = {}
    moves: list[float] = []
    for line in log.read_text(errors="replace").splitlines():
        m = LOG_LINE.match(line)
        if m is None:
            continue
        at = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f")
        if at < since:
            continue
        shard = int(m[3])
        if m[2] == "releasing":
            releasing[shard] = at
        elif shard in releasing:
            moves.append((at - releasing.pop(shard)).total_seconds() * 1000)
    return moves


def summarize(trace: Trace, rate: int) -> dict[str, Any]:
    rows = trace.rows
    buckets = [(t1, s1 - s0, h1 - h0, s1 - h1) for (_, s0, h0), (t1, s1, h1) in pairwise(rows)]

    def window(start: float, end: float) -> float:
        inside = [(t, h) for t, _, h, _ in buckets if start <= t < end]
        return sum(h for _, h in inside) / max(end - start, BUCKET_S) if inside else 0.0

    def delay(start: float, end: float) -> float:
        backlogs = [b for t, _, _, b in buckets if start <= t < end]
        return max(backlogs, default=0) / rate * 1000

    join, leave, stop = trace.events["join"], trace.events["leave"], trace.events["stop"]
    dip, longest = 0.0, 0.0
    for _, _, h, backlog in buckets:
        slow = h < rate * BUCKET_S / 2 and backlog > rate * BUCKET_S
        dip = dip + BUCKET_S if slow else 0.0
        longest = max(longest, dip)
    return {
        "handled_per_s": {
            "one worker": window(1.0, join),
            "after the join": window(join + 1, leave),
            "after the leave": window(leave + 1, stop),
        },
        "max_backlog_delay_ms": {
            "steady": delay(1.0, join),
            "join": delay(join, join + 2),
            "leave": delay(leave, leave + 2),
        },
        "longest_dip_ms": longest * 1000,
    }


async def run(url: str, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    ns = f"elastic-{uuid.uuid4().hex[:6]}"
    log = tmp / f"{ns}.log"
    argv = worker_argv(APP_SPEC, url, ns)
    argv[argv.index("WARNING")] = "INFO"
    trace = Trace()
    since = datetime.now()
    async with actors.connect(url, namespace=ns, app=app, shards=SHARDS) as client:
        first = Workers.spawn(argv, 1, log)
        second: Workers | None = None
        try:
            while not all(await lease_owners(client)):  # noqa: ASYNC110 (polling Redis)
                await asyncio.sleep(0.05)
            trace.started = time.monotonic()
            sent = [0]
            done = asyncio.Event()
            watcher = asyncio.create_task(observe(client, trace, sent, done))
            producer = asyncio.create_task(produce(client, args, trace, sent))
            await asyncio.sleep(args.join)
            trace.events["join"] = trace.now()
            second = Workers.spawn(argv, 1, log)
            await asyncio.sleep(args.leave - args.join)
            trace.events["leave"] = trace.now()
            first.procs[0].send_signal(signal.SIGTERM)
            total = await producer
            while await handled(client) < total:
                second.check_alive()
                await asyncio.sleep(0.1)
            done.set()
            await watcher
            owners = await lease_owners(client)
            verdict = await check_totals(client, total, args.actors)
        finally:
            first.stop()
            if second is not None:
                second.stop()
    moves = sorted(handovers(log, since))
    summary = summarize(trace, args.rate)
    return {
        "sent": total,
        "verdict": verdict,
        "owners_at_end": len({o for o in owners if o}),
        "handovers": len(moves),
        "handover_ms": {"p50": quantile(moves, 0.5), "p99": quantile(moves, 0.99), "max": moves[-1]}
        if moves
        else {},
        **summary,
        "events": trace.events,
        "trace": trace.rows,
    }


async def floor(url: str, args: argparse.Namespace) -> float:
    """The producer alone, into a namespace no worker reads: msgs/s it can offer."""
    async with actors.connect(url, namespace=f"floor-{uuid.uuid4().hex[:6]}", app=app, shards=SHARDS) as c:
        n = args.rate * 2
        started = time.perf_counter()
        for first in range(0, n, 1000):
            await c.send_many(increments(first, min(n, first + 1000), args.actors))
        rate: float = n / (time.perf_counter() - started)
        return rate


async def main(args: argparse.Namespace) -> None:
    with private_server("elastic", kept="server data and worker logs") as server:
        server.keep = args.keep
        offered = await floor(server.url, args)
        result = await run(server.url, server.tmp, args)
        header = server.machine_line()
        if args.keep:
            print(f"kept {server.tmp}")
    h = result["handover_ms"]
    lines = [
        header,
        f"{args.rate:,} msgs/s offered to {args.actors:,} counters, {SHARDS} shards; a worker joins "
        f"at {args.join:g} s, the first leaves (SIGTERM) at {args.leave:g} s, sending stops at "
        f"{args.duration:g} s",
        f"  {result['verdict']}; {result['handovers']} shard hand-overs: p50 {h.get('p50', 0):.0f} ms, "
        f"p99 {h.get('p99', 0):.0f} ms, max {h.get('max', 0):.0f} ms",
        "  handled msgs/s: " + ", ".join(f"{k} {v:,.0f}" for k, v in result["handled_per_s"].items()),
        "  backlog delay, max: "
        + ", ".join(f"{k} {v:,.0f} ms" for k, v in result["max_backlog_delay_ms"].items()),
        "  longest dip (under half the offered rate with a backlog waiting): "
        f"{result['longest_dip_ms']:.0f} ms",
        f"  floor: the producer alone offers {offered:,.0f} msgs/s",
    ]
    print("\n".join(lines))
    if args.json:
        write_json(args.json, {"header": lines, "results": {**result, "floor_msgs_per_s": offered}})


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argument_parser(__doc__)
    parser.add_argument("--rate", type=int, default=5_000, help="msgs/s offered")
    parser.add_argument("--actors", type=int, default=1_000)
    parser.add_argument("--join", type=float, default=5.0)
    parser.add_argument("--leave", type=float, default=10.0)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the server's data and the worker log")
    args = parser.parse_args(argv)
    if not 0 < args.join < args.leave < args.duration:
        parser.error("need 0 < --join < --leave < --duration")
    return args


if __name__ == "__main__":
    asyncio.run(main(parse()))

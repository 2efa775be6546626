"""Many shards in one worker process: send -> handler start at one offered load with 16, 256,
1,024 and 4,096 shards, beside the raw-Redis floor measured in the same run on the same server.

    python -m benchmarks.shards [--shards 16,256,1024,4096] [--rate 500] [--seconds 5]
                                [--idle-seconds 2] [--settle-seconds 6] [--json PATH]

Everything runs on a private server (AOF on, fsync every second) that this command starts on a
free loopback port in a temporary directory and stops at the end. For each shard count: a
fresh namespace with that many shards and one real worker process (``python -m actors.cli
worker --shards N``), which must lease every shard; then one ``benchmarks.latency`` ``Probe``
actor per shard, each activated with an ``ask`` first.

1. **idle**: ``--settle-seconds`` after the probes were activated (longer than
   ``trim_interval``: the chores their turns made due have run), for ``--idle-seconds``
   nothing is sent; the worker's and the server's CPU (the scheduler's own count, as a share
   of one core) is what holding N idle shards costs.
2. **connections**: the client connections the worker process holds, counted from
   ``CLIENT LIST`` (the entries whose address is one of the worker's own sockets, from
   ``/proc``), after the idle period and again after the load.
3. **send -> handler start**, exactly as ``benchmarks.latency`` measures it (open loop, one
   awaited ``client.send`` at a time, from the send returning to the handler starting, which
   may be under 0), at ``--rate`` messages/s for ``--seconds``, after a 1 s warm-up at the
   same rate. Message i goes to the probe of shard i mod N: consecutive messages go to
   different shards, and with many shards each message finds its shard idle (at 500/s and
   4,096 shards, each shard gets one every 8 s).

The floor is ``benchmarks.latency``'s: awaited ``XADD``s at the same rate and pacing, read by a
consumer process with ``XREADGROUP BLOCK`` and an ``XACK`` per entry (one stream: it does not
depend on the shard count).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import count
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

import actors
from actors.routing import route, shard_of

from . import latency
from .common import Workers, argument_parser, lease_owners, private_server, worker_argv, write_json
from .latency import DIR_ENV, STALL_S, Collect, CpuMeter, Get, LoadResult, Ping, Probe, paced, read_samples
from .throughput import poll_until, wait_committed

WARMUP_S = 1.0
ACTIVATE_AT_ONCE = 64


@dataclass
class ShardsResult:
    shards: int
    leased_s: float
    """From the worker's spawn until it held every shard."""
    idle_cpu: dict[str, float]
    """Share of one core while nothing was sent: worker, server."""
    connections_idle: int
    connections_loaded: int
    load: LoadResult


def probe_keys(shards: int, actor_type: str = "Probe") -> list[str]:
    """One key of ``actor_type`` per shard, the key of shard s at index s."""
    keys: dict[int, str] = {}
    for i in count():
        if len(keys) == shards:
            return [keys[s] for s in range(shards)]
        keys.setdefault(shard_of(f"{actor_type}/p{i}", shards), f"p{i}")
    raise AssertionError("unreachable")


def socket_ports(pid: int) -> set[int]:
    """The local TCP ports of the sockets process ``pid`` holds (Linux ``/proc``)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def connections_of(r: aioredis.Redis, pid: int) -> int:
    """The server's clients whose address is a socket of process ``pid``."""
    ports = socket_ports(pid)
    return sum(1 for c in await r.client_list() if int(str(c["addr"]).rsplit(":", 1)[1]) in ports)


async def activate(client: actors.Client, refs: Sequence[actors.ActorRef[Any]]) -> None:
    for first in range(0, len(refs), ACTIVATE_AT_ONCE):
        batch = refs[first : first + ACTIVATE_AT_ONCE]
        await asyncio.gather(*(client.ask(ref, Get(), timeout=60) for ref in batch))


async def measure(
    client: actors.Client, workers: Workers, refs: Sequence[actors.ActorRef[Any]], out_dir: Path,
    server_pid: int, rate: float, seconds: float, name: str,
) -> LoadResult:  # fmt: skip
    """One open-loop load over every probe in turn; the samples as ``benchmarks.latency`` reads them."""
    returned: list[float] = []

    async def send(i: int) -> None:
        await client.send(refs[i % len(refs)], Ping(sent_at=time.time(), i=i))
        returned.append(time.time())  # paced() calls send(0), send(1), ... in order

    load_avg = os.getloadavg()[0]
    pids = {"consumer": workers.procs[0].pid, "server": server_pid, "producer": None}
    pacing = await paced(rate, seconds, send, pids)
    await wait_committed(client, workers, STALL_S, shards=len(refs))
    collected: latency.Collected = await client.ask(refs[0], Collect(name=name), timeout=60)
    if collected.count != pacing.sent or len(returned) != pacing.sent:
        raise RuntimeError(f"{name}: sent {pacing.sent}, the worker saw {collected.count}")
    return LoadResult.of("ours", rate, pacing, read_samples(out_dir / f"{name}.txt", returned), load_avg)


async def run_shards(
    server: actors.EmbeddedServer,
    tmp: Path,
    shards: int,
    rate: float,
    seconds: float,
    idle_s: float,
    settle_s: float,
) -> ShardsResult:
    ns = f"shards{shards}-{uuid.uuid4().hex[:6]}"
    out_dir = tmp / ns
    out_dir.mkdir()
    r = aioredis.Redis.from_url(server.url)
    async with actors.connect(server.url, namespace=ns, app=latency.app, shards=shards) as client:
        argv = worker_argv(latency.APP_SPEC, server.url, ns, shards=shards)
        workers = Workers.spawn(argv, 1, tmp / f"{ns}.log", env={DIR_ENV: str(out_dir)})
        try:

            async def all_leased() -> bool:
                return all(await lease_owners(client, shards))

            leased = await poll_until(all_leased, workers, 120, f"{shards} shards to be leased")
            pid = workers.procs[0].pid
            refs = [Probe.ref(key) for key in probe_keys(shards)]
            await activate(client, refs)
            await asyncio.sleep(settle_s)
            meter = CpuMeter({"worker": pid, "server": server.pid})
            await asyncio.sleep(idle_s)
            idle_cpu = meter.shares()
            connections_idle = await connections_of(r, pid)
            await measure(client, workers, refs, out_dir, server.pid, rate, WARMUP_S, f"warmup{shards}")
            load = await measure(client, workers, refs, out_dir, server.pid, rate, seconds, f"load{shards}")
            connections_loaded = await connections_of(r, pid)
            workers.check_alive()
        finally:
            workers.stop()
            await r.aclose()
    return ShardsResult(
        shards, leased - workers.spawned_at, idle_cpu, connections_idle, connections_loaded, load
    )


async def run_floor(server: actors.EmbeddedServer, tmp: Path, rate: float, seconds: float) -> LoadResult:
    envelope = len(route(latency.app, Probe.ref("p0"), Ping(sent_at=time.time(), i=0), 16, 1 << 20).data)
    async with latency.start_floor(server, tmp, envelope) as floor:
        await floor.load(rate, WARMUP_S, "warmup")
        return await floor.load(rate, seconds, "floor")


# ---- report -------------------------------------------------------------------------------
COLS = ("min", "p50", "p90", "p99", "p99.9", "max")


def table(rows: Sequence[ShardsResult], floor: LoadResult) -> list[str]:
    head = (
        f"{'who':<12} {'leased s':>8} {'conns':>11} {'idle cpu% w/s':>13} {'achieved/s':>10} {'N':>6} "
        f"{latency.pct_head(COLS)} {'cpu% c/s/p':>11}"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        who = f"{row.shards:,} shards"
        conns = f"{row.connections_idle} / {row.connections_loaded}"
        idle = " / ".join(f"{row.idle_cpu[k] * 100:.0f}" for k in ("worker", "server"))
        lines.append(f"{who:<12} {row.leased_s:>8.2f} {conns:>11} {idle:>13} " + load_cells(row.load))
    lines.append(f"{'floor':<12} {'':>8} {'':>11} {'':>13} " + load_cells(floor))
    return lines


def load_cells(load: LoadResult) -> str:
    achieved = f"{load.pacing.achieved:,.0f}" + ("" if load.pacing.ok else "!")
    return (
        f"{achieved:>10} {load.n:>6} {latency.pct_cells(load.from_return_ms, COLS)} "
        f"{latency.cpu_text(load.pacing.cpu):>11}"
    )


async def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--shards", default="16,256,1024,4096", help="shard counts, comma-separated")
    parser.add_argument("--rate", type=float, default=500.0, help="offered load, msgs/s, the same for each")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each load")
    parser.add_argument("--idle-seconds", type=float, default=2.0, help="CPU measured with nothing sent")
    parser.add_argument(
        "--settle-seconds", type=float, default=6.0, help="wait after activating the probes, before idle"
    )
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    counts = [int(x) for x in args.shards.split(",") if x.strip()]

    with private_server("shards", kept="server data, samples and worker logs") as run:
        started = time.perf_counter()
        rows = [
            await run_shards(
                run.server, run.tmp, n, args.rate, args.seconds, args.idle_seconds, args.settle_seconds
            )
            for n in counts
        ]
        floor = await run_floor(run.server, run.tmp, args.rate, args.seconds)

    header = [
        run.machine_line(f"; run took {time.perf_counter() - started:.0f}s"),
        f"1 worker process per shard count, one Probe actor per shard, message i to shard i mod N; "
        f"{args.rate:,.0f} msgs/s offered for {args.seconds:g}s after a {WARMUP_S:g}s warm-up",
    ]
    lines = [
        *header,
        "",
        "send RETURNED -> handler start, ms (as benchmarks.latency; may be under 0); floor: XADD returned "
        "-> XREADGROUP BLOCK + XACK per entry, consumer in its own process",
        "  leased s: from the worker's spawn until it held every shard; conns: the worker's connections "
        "(CLIENT LIST) idle / after the load;",
        f"  idle cpu% w/s: worker and server, share of one core, nothing sent for {args.idle_seconds:g}s "
        f"from {args.settle_seconds:g}s after the probes' activation; cpu% c/s/p: worker "
        "(or floor consumer), server, producer while sending",
        *table(rows, floor),
    ]
    print("\n".join(lines))
    if args.json:
        payload = {
            "header": header,
            "rate": args.rate,
            "seconds": args.seconds,
            "idle_seconds": args.idle_seconds,
            "settle_seconds": args.settle_seconds,
            "rows": [asdict(row) for row in rows],
            "floor": asdict(floor),
        }
        write_json(args.json, payload)


if __name__ == "__main__":
    asyncio.run(main())

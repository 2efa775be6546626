"""``actors top``: a live view of one namespace, read from Redis and redrawn every interval.

Throughput is the change, between two frames, of the messages the workers have handled
(delivered to the group and no longer pending); turn latency is what each worker
reports in its heartbeat (p50/p99 of its recent turns).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from .limiter import Limiter
from .store import ShardInfo, Store


@dataclass(frozen=True, slots=True)
class Frame:
    at: float
    workers: list[tuple[str, dict[str, str]]]
    shards: list[ShardInfo]
    limiters: list[dict[str, Any]]

    @property
    def handled(self) -> int:
        return sum(s.read - s.pending for s in self.shards)


async def limiter_status(store: Store, infos: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Each declared limiter: its rate, slots held of its cap, turns waiting, queue depth."""
    found = []
    for name, definition in sorted((await store.declare_limiters({})).items()):
        limiter = Limiter.model_validate_json(definition)
        held = await store.limiter_holders(name)
        by_partition, dispatching = await store.queue_depths(name)
        rate = "-" if limiter.rate is None else f"{limiter.rate:g}/{limiter.per.total_seconds():g}s"
        found.append({
            "name": name,
            "rate": rate + (f" burst {limiter.burst}" if limiter.burst > 1 else ""),
            "slots": f"{held}/{limiter.concurrency}" if limiter.concurrency else "-",
            "waiting": sum(int(info.get(f"waiting:{name}", 0)) for info in infos),
            "queued": sum(by_partition.values()),
            "dispatching": dispatching,
            "queued_by_partition": by_partition,
        })  # fmt: skip
    return found


async def capture(store: Store, shards: int) -> Frame:
    ids = await store.live_workers()
    infos = await store.worker_infos(ids)
    shard_infos = [await store.shard_info(s) for s in range(shards)]
    return Frame(
        time.monotonic(), list(zip(ids, infos, strict=True)), shard_infos, await limiter_status(store, infos)
    )


def render(frame: Frame, previous: Frame | None, namespace: str) -> str:
    rate = "-"
    if previous is not None and frame.at > previous.at:
        rate = f"{(frame.handled - previous.handled) / (frame.at - previous.at):,.0f}/s"
    lag = sum(s.lag or 0 for s in frame.shards)
    pending = sum(s.pending for s in frame.shards)
    open_turns = sum(s.open_turns for s in frame.shards)
    lines = [
        f"actors top - namespace {namespace} - {time.strftime('%H:%M:%S')}",
        f"handled {rate}   lag {lag}   pending {pending}   open turns {open_turns}   "
        f"workers {len(frame.workers)}   shards {len(frame.shards)}",
        "",
        f"{'worker':<40} {'shards':>6} {'turns':>9} {'p50 ms':>8} {'p99 ms':>8}",
    ]
    for worker_id, info in frame.workers:
        held = sum(1 for s in frame.shards if s.owner == worker_id)
        lines.append(f"{worker_id:<40} {held:>6} {info.get('turns', '-'):>9} "
                     f"{info.get('turn_p50_ms', '-'):>8} {info.get('turn_p99_ms', '-'):>8}")  # fmt: skip
    lines += ["", f"{'shard':>5} {'owner':<40} {'epoch':>6} {'lag':>6} {'pending':>8} {'open':>6} {'dlq':>5}"]
    for s in frame.shards:
        lines.append(f"{s.shard:>5} {s.owner or '-':<40} {s.epoch:>6} {'-' if s.lag is None else s.lag:>6} "
                     f"{s.pending:>8} {s.open_turns:>6} {s.dead_letters:>5}")  # fmt: skip
    if frame.limiters:
        lines += ["", f"{'limiter':<20} {'rate':<16} {'slots':>9} {'waiting':>8} {'queued':>7}"]
        for lim in frame.limiters:
            lines.append(f"{lim['name']:<20} {lim['rate']:<16} {lim['slots']:>9} {lim['waiting']:>8} "
                         f"{lim['queued']:>7}")  # fmt: skip
    return "\n".join(lines)


async def run(store: Store, shards: int, interval: float, frames: int | None) -> None:
    """Redraw every ``interval`` seconds, ``frames`` times (None: until interrupted)."""
    previous: Frame | None = None
    shown = 0
    while frames is None or shown < frames:
        frame = await capture(store, shards)
        clear = "\x1b[H\x1b[2J" if frames is None else ""
        print(clear + render(frame, previous, store.keys.namespace), flush=True)
        previous, shown = frame, shown + 1
        if frames is None or shown < frames:
            await asyncio.sleep(interval)

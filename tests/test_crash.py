"""Exactly-once under real crashes: a worker process SIGKILLed at random moments."""

from __future__ import annotations

import asyncio
import random
import signal
from pathlib import Path

import pytest

from .apps import Add, Counter, Held, Hold, Mirror, Tally, app
from .conftest import eventually

pytestmark = pytest.mark.chaos


async def test_exactly_once_increments_across_sigkills(spawn_worker, connect, tmp_path) -> None:
    """10,000 increments over 500 counters (and 2,000 forwarded via Mirror -> Tally) while the
    only worker is SIGKILLed and restarted: totals come out exact. Each kill waits until the
    worker owns shards and is inside a turn (a Held turn, which runs until the test releases
    it) and then lands at a random moment of the load; that turn must run again, once."""
    rng = random.Random(7)
    worker = spawn_worker()
    counters, increments = 500, 10_000
    expected = [0] * counters
    mirrors = 2_000
    held_log = tmp_path / "held.log"
    killed: list[int] = []
    async with connect(app=app) as client:
        stop_killing = asyncio.Event()

        async def killer() -> None:
            nonlocal worker
            while not stop_killing.is_set() or len(killed) < 6:
                message = await client.send(Held.ref(f"h-{len(killed)}"), Hold())
                pid = worker.pid
                await eventually(lambda pid=pid, m=message: _started_by(held_log, pid, m), timeout=30)
                await asyncio.sleep(rng.uniform(0.0, 0.3))  # increments go on meanwhile
                worker.signal(signal.SIGKILL)
                worker.proc.wait()
                # Interrupted once is the point; a turn the kills interrupted again and again
                # would count as a message that kills its worker (max_redeliveries).
                (tmp_path / f"release-h-{len(killed)}").touch()
                killed.append(pid)
                worker = spawn_worker()

        killing = asyncio.create_task(killer())
        batch: list = []
        for _i in range(increments):
            k = rng.randrange(counters)
            expected[k] += 1
            batch.append((Counter.ref(f"c-{k}"), Add(by=1)))
            if len(batch) == 100:
                await client.send_many(batch)
                batch.clear()
                await asyncio.sleep(0.03)
        await client.send_many((Mirror.ref(f"m-{i}"), Add(by=1)) for i in range(mirrors))
        await asyncio.sleep(1.0)
        stop_killing.set()
        await killing
        runs = _held_runs(held_log)
        for pid in killed:
            assert any(p == pid and not ended for p, _, ended in runs), (
                f"the kill of {pid} interrupted a turn: a Held turn it started never ended"
            )
        (tmp_path / "release").touch()

        async def all_done() -> bool:
            totals = await asyncio.gather(*(client.state(Counter.ref(f"c-{k}")) for k in range(counters)))
            tallies = await asyncio.gather(*(client.state(Tally.ref(f"tally-{t}")) for t in range(7)))
            held = await asyncio.gather(*(client.state(Held.ref(f"h-{n}")) for n in range(len(killed))))
            return (
                sum(s.total for s in totals if s) == increments
                and sum(s.total for s in tallies if s) == mirrors
                and all(held)
            )

        await eventually(all_done, timeout=60, interval=0.25)
        await asyncio.sleep(0.5)  # anything applied twice would show up now
        totals = await asyncio.gather(*(client.state(Counter.ref(f"c-{k}")) for k in range(counters)))
        assert [s.total if s else 0 for s in totals] == expected
        tallies = await asyncio.gather(*(client.state(Tally.ref(f"tally-{t}")) for t in range(7)))
        assert sum(s.total for s in tallies) == mirrors
        mirrored = await asyncio.gather(*(client.state(Mirror.ref(f"m-{i}")) for i in range(mirrors)))
        assert all(s is not None and s.total == 1 for s in mirrored)
        held = await asyncio.gather(*(client.state(Held.ref(f"h-{n}")) for n in range(len(killed))))
        assert [s.total for s in held] == [1] * len(killed), "each interrupted turn committed once"
        runs = _held_runs(held_log)
        for message in {m for p, m, _ in runs if p in killed}:
            assert any(m == message and ended for _, m, ended in runs), (
                f"Held message {message}, interrupted by a kill, ran again to its end"
            )

        async def nothing_pending() -> bool:
            infos = [await client.store.shard_info(s) for s in range(client.shards)]
            return all(i.pending == 0 and i.dead_letters == 0 for i in infos)

        await eventually(nothing_pending, timeout=10)


def _held_runs(log: Path) -> list[tuple[int, str, bool]]:
    """Each run of a Held turn: (pid, message id, whether it ended)."""
    words = [line.split() for line in log.read_text().splitlines()] if log.exists() else []
    ends = {(int(pid), message) for event, pid, message in words if event == "end"}
    return [
        (int(pid), message, (int(pid), message) in ends) for event, pid, message in words if event == "start"
    ]


def _started_by(log: Path, pid: int, message: str) -> bool:
    return any(p == pid and m == message for p, m, _ in _held_runs(log))

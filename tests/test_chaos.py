"""The chaos suite: 3 supervised worker processes, concurrent senders, SIGKILLs, a SIGSTOP
past the lease TTL, and a Redis restart. Every accepted message must have exactly one effect.

ACTORS_CHAOS_MESSAGES (default 20000) runs it longer as a soak; the default fits CI (under 3 minutes).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

import actors
from actors import EmbeddedServer

from .apps import Add, Counter, app
from .conftest import ROOT, eventually

pytestmark = pytest.mark.chaos

SENDERS = 4
ACTORS = 1_000
MESSAGES = int(os.environ.get("ACTORS_CHAOS_MESSAGES", "20000"))


@pytest.fixture
def private_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(tmp_path / "redis").start()
    yield server
    server.stop()


def children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


async def send_with_retry(client: actors.Client, ref, msg, key: str) -> None:
    """A sender that keeps trying through a Redis restart; the key makes retries harmless."""
    delay = 0.05
    while True:
        try:
            await client.send(ref, msg, idempotency_key=key)
            return
        except Exception:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


async def test_chaos(private_server: EmbeddedServer, namespace: str, tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("ACTORS_CHAOS_SEED", "11")))
    url = private_server.url
    log = open(tmp_path / "workers.log", "ab")  # noqa: ASYNC230 (opened once, before the test starts)
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "actors.cli", "--log-level", "WARNING", "worker", "tests.apps:app",
        "--processes", "3", "--redis", url, "--namespace", namespace, "--shards", "12",
        "--lease-ttl", "1.0", "--renew-interval", "0.2",
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=log,
    )  # fmt: skip
    expected = [0] * ACTORS
    plan: list[list[tuple[int, int]]] = [[] for _ in range(SENDERS)]
    for n in range(MESSAGES):
        k = rng.randrange(ACTORS)
        expected[k] += 1
        plan[n % SENDERS].append((k, n // SENDERS))
    try:
        async with actors.connect(url, namespace=namespace, app=app, shards=12) as client:
            await eventually(lambda: len(children_of(parent.pid)) == 3, timeout=20)
            await eventually(lambda: _all_owned(client), timeout=20)
            sending_done = asyncio.Event()

            async def sender(s: int) -> None:
                for k, seq in plan[s]:
                    await send_with_retry(
                        client, Counter.ref(f"a-{k}"), Add(sender=f"s{s}", seq=seq), key=f"s{s}-{seq}"
                    )
                    if seq % 50 == 0:
                        await asyncio.sleep(0.005)  # spread the load over the chaos window

            async def chaos() -> dict[str, list[int]]:
                """Each step picks a worker that owns shards; after a SIGKILL or during a SIGSTOP
                it waits until other workers hold every shard the victim held (the stopped
                one is then a zombie past its TTL). Returns how many shards each step moved."""
                done: dict[str, list[int]] = {"kills": [], "stops": [], "redis_restarts": []}
                step = 0
                while not sending_done.is_set() or step < 6:
                    await asyncio.sleep(rng.uniform(1.0, 2.0))
                    if step == 4:
                        private_server.stop()
                        await asyncio.sleep(0.3)
                        private_server.start()
                        done["redis_restarts"].append(0)
                        step += 1
                        continue
                    owning = await eventually(lambda: _owning(client, children_of(parent.pid)), timeout=30)
                    victim = rng.choice(sorted(owning))
                    worker_id, shards = owning[victim]
                    if step == 2:
                        os.kill(victim, signal.SIGSTOP)  # a zombie: alive, silent, past its TTL
                        try:
                            await eventually(partial(_moved, client, worker_id, shards), timeout=30)
                        finally:
                            os.kill(victim, signal.SIGCONT)
                        done["stops"].append(len(shards))
                    else:
                        os.kill(victim, signal.SIGKILL)
                        await eventually(partial(_moved, client, worker_id, shards), timeout=30)
                        done["kills"].append(len(shards))
                    step += 1
                return done

            chaos_task = asyncio.create_task(chaos())
            await asyncio.gather(*(sender(s) for s in range(SENDERS)))
            sending_done.set()
            done = await chaos_task
            assert len(done["kills"]) >= 3 and all(done["kills"]), f"each kill moved shards: {done}"
            assert len(done["stops"]) == 1 and all(done["stops"]), f"the stop moved shards: {done}"
            assert len(done["redis_restarts"]) == 1

            async def states() -> list:
                return await asyncio.gather(*(client.state(Counter.ref(f"a-{k}")) for k in range(ACTORS)))

            async def all_handled() -> bool:
                try:
                    return sum(s.total for s in await states() if s) == MESSAGES
                except Exception:
                    return False

            await eventually(all_handled, timeout=90, interval=0.5)
            await asyncio.sleep(1.0)  # a second effect of anything would show now
            final = await states()
            assert [s.total if s else 0 for s in final] == expected, "every message had exactly one effect"
            for s in final:
                if s is None:
                    continue
                for seqs in s.seqs.values():
                    assert seqs == sorted(seqs), "per-sender order held"
                assert s.epochs == sorted(set(s.epochs)), "no commit under an older epoch after a newer one"
                assert_held_by_one_process_at_a_time(s.held)
            moved = sum(1 for s in final if s and len({pid for pid, _, _ in s.held}) > 1)
            assert moved >= ACTORS // 10, f"only {moved} actors were served by more than one process"
            await eventually(lambda: _all_owned(client), timeout=20)
            await eventually(lambda: _nothing_pending(client), timeout=20)

    finally:
        if parent.returncode is None:
            parent.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(parent.wait(), timeout=30)
            except TimeoutError:
                for pid in children_of(parent.pid):
                    os.kill(pid, signal.SIGKILL)
                parent.kill()
                await parent.wait()
        log.close()


def assert_held_by_one_process_at_a_time(held: list[tuple[int, float, float]]) -> None:
    """The activation log of an actor's committed turns: a turn run by one process ends
    before a turn run by another starts (one clock: CLOCK_MONOTONIC is system-wide)."""
    ordered = sorted(held, key=lambda h: h[1])
    for (pid_a, _, end_a), (pid_b, start_b, _) in itertools.pairwise(ordered):
        if pid_a != pid_b:
            assert end_a <= start_b, f"processes {pid_a} and {pid_b} held the actor at once"


async def _all_owned(client: actors.Client) -> bool:

    try:
        live = set(await client.store.live_workers())
        infos = [await client.store.shard_info(s) for s in range(client.shards)]
    except Exception:
        return False
    return len(live) == 3 and all(i.owner in live for i in infos)


async def _nothing_pending(client: actors.Client) -> bool:
    infos = [await client.store.shard_info(s) for s in range(client.shards)]
    return all(i.pending == 0 and i.dead_letters == 0 and (i.lag or 0) == 0 for i in infos)


async def _owning(client: actors.Client, pids: list[int]) -> dict[int, tuple[str, list[int]]] | None:
    """Of the live worker processes ``pids``, those owning shards: pid -> (worker id, shards)."""
    try:
        live = await client.store.live_workers()
        infos = await client.store.worker_infos(live)
        owners = [(await client.store.shard_info(s)).owner for s in range(client.shards)]
    except Exception:
        return None
    pid_of = {wid: int(info.get("pid", 0)) for wid, info in zip(live, infos, strict=True)}
    owning: dict[int, tuple[str, list[int]]] = {}
    for shard, owner in enumerate(owners):
        pid = pid_of.get(owner or "")
        if pid in pids and owner is not None:
            owning.setdefault(pid, (owner, []))[1].append(shard)
    return owning or None


async def _moved(client: actors.Client, worker_id: str, shards: list[int]) -> bool:
    """Every one of ``shards`` is leased by a worker other than ``worker_id``."""
    try:
        owners = [(await client.store.shard_info(s)).owner for s in shards]
    except Exception:
        return False
    return all(owner is not None and owner != worker_id for owner in owners)

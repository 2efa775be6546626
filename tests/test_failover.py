"""Failover and Redis outages, with real processes and a real server:

- survivors lease a SIGKILLed worker's shards within lease TTL + renew interval (Redis's clock);
- Redis unreachable for a whole TTL: workers drop their shards, take them again once it is
  back, and nothing acknowledged is lost or applied twice;
- Redis SIGKILLed (AOF, ``appendfsync everysec``): what was acknowledged well before the kill
  is kept, and still applied exactly once.
"""

from __future__ import annotations

import asyncio
import math
import signal
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

import actors
from actors import EmbeddedServer, Worker
from actors.routing import shard_of

from .apps import Add, Counter, app
from .conftest import WorkerProcess, eventually

LEASE_TTL, RENEW_INTERVAL = 1.0, 0.2  # what spawn_worker and fast_settings give workers
SCHEDULING_MARGIN = 0.5
"""What a correct worker may add to TTL + renew interval: its tick starts late when its
process waits for a CPU (2 shared cores, other workers, the test, Redis), and then acquires
the shards one round trip each; the test's polling adds up to 10 ms. Two and a half renew
intervals: generous for scheduling, yet a worker that waited a further full TTL (or never
noticed the dead worker until a second TTL passed) fails the bound."""


@pytest.fixture
def private_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(tmp_path / "redis").start()
    yield server
    server.stop()


async def _leases(client: actors.Client, shards: list[int]) -> tuple[dict[int, str | None], int]:
    """The lease values of ``shards`` and Redis's time (ms) just after they were read: never
    earlier than what they show. (Not TIME in the same pipeline: a cluster pipeline refuses it,
    and its nodes answer in no set order.)"""
    async with client.store.redis.pipeline(transaction=False) as pipe:
        for shard in shards:
            pipe.get(client.store.keys.lease(shard))
        values = await pipe.execute()
    seconds, micros = await client.store.redis.time()
    leases = {s: v.decode() if v is not None else None for s, v in zip(shards, values, strict=True)}
    return leases, seconds * 1000 + micros // 1000


async def _owners(client: actors.Client) -> dict[int, str]:
    """Shard -> owning worker id; empty unless every shard is owned."""
    leases, _ = await _leases(client, list(range(client.shards)))
    if not all(leases.values()):
        return {}
    return {s: str(v).rpartition("|")[0] for s, v in leases.items()}


@pytest.mark.chaos
async def test_survivors_lease_a_killed_workers_shards_within_ttl_plus_renew_interval(
    spawn_worker: Callable[..., WorkerProcess], connect: Callable[..., Any]
) -> None:
    workers = [spawn_worker() for _ in range(3)]
    async with connect(app=app) as client:

        async def balanced() -> dict[int, str]:
            """Every shard owned, by 3 workers, none above its share: no rebalance under way."""
            owners = await _owners(client)
            counts = [list(owners.values()).count(w) for w in set(owners.values())]
            return owners if len(counts) == 3 and max(counts) <= math.ceil(client.shards / 3) else {}

        owners = await eventually(balanced, timeout=30)
        ids = sorted(set(owners.values()))
        infos = await client.store.worker_infos(ids)
        pids = {int(info["pid"]): wid for wid, info in zip(ids, infos, strict=True)}
        victim = workers[0]
        victim_id = pids[victim.pid]
        shards = sorted(s for s, owner in owners.items() if owner == victim_id)
        assert shards, "the victim owned shards"
        before, killed_at = await _leases(client, shards)  # Redis's clock, just before the kill
        victim.signal(signal.SIGKILL)

        taken: dict[int, int] = {}  # shard -> Redis time when first seen leased by a survivor

        async def all_taken() -> bool:
            leases, now = await _leases(client, [s for s in shards if s not in taken])
            for shard, value in leases.items():
                if value is not None and value.rpartition("|")[0] != victim_id:
                    taken[shard] = now
            return len(taken) == len(shards)

        await eventually(all_taken, timeout=10, interval=0.01)
        victim.proc.wait()  # type: ignore[union-attr]
        slowest = max(taken.values()) - killed_at
        bound = (LEASE_TTL + RENEW_INTERVAL + SCHEDULING_MARGIN) * 1000
        assert slowest <= bound, (
            f"the last of {len(shards)} shards was leased {slowest} ms after the kill (bound {bound:.0f} ms)"
        )
        after, _ = await _leases(client, shards)
        for shard in shards:
            old, new = before[shard], after[shard]
            assert old is not None and new is not None
            assert int(new.rpartition("|")[2]) > int(old.rpartition("|")[2]), "a fresh, larger epoch"

        # The survivors work the shards: a message to every one of them is handled.
        refs: dict[int, actors.ActorRef] = {}  # type: ignore[type-arg]
        n = 0
        while len(refs) < len(shards):
            ref = Counter.ref(f"after-{n}")
            shard = shard_of(ref.id, client.shards)
            if shard in shards and shard not in refs:
                refs[shard] = ref
            n += 1
        await client.send_many([(ref, Add()) for ref in refs.values()])
        for ref in refs.values():
            await eventually(partial(_total, client, ref, 1), timeout=10)
    for worker in workers[1:]:
        worker.stop()


async def _total(client: actors.Client, ref: actors.ActorRef, total: int) -> bool:  # type: ignore[type-arg]
    state = await client.state(ref)
    return state is not None and state.total == total


def _balanced(workers: list[Worker], shards: int) -> bool:
    """Every shard held by exactly one of ``workers``, and each of them holds some."""
    held = sorted(s for w in workers for s in w.shards)
    return held == list(range(shards)) and all(w.shards for w in workers)


async def _states_exact(client: actors.Client, keys: int, sent: dict[str, list[int]]) -> bool:
    """Every counter holds exactly the sequence numbers sent to it, in order, once each."""
    states = await asyncio.gather(*(client.state(Counter.ref(f"k{k}")) for k in range(keys)))
    got = {f"k{k}": (s.seqs.get("s", []) if s else []) for k, s in enumerate(states)}
    return got == sent


@pytest.mark.single("its own server, stopped and restarted (a cluster's failover: test_cluster)")
async def test_redis_unreachable_for_a_ttl_workers_drop_their_shards_and_resume(
    private_server: EmbeddedServer, start_worker: Callable[..., Any], namespace: str
) -> None:
    url = private_server.url
    workers: list[Worker] = [await start_worker(app, url=url) for _ in range(2)]
    keys = 20
    sent: dict[str, list[int]] = {f"k{k}": [] for k in range(keys)}
    async with actors.connect(url, namespace=namespace, app=app) as client:
        await eventually(lambda: _balanced(workers, client.shards))

        async def send(seq: int) -> None:
            key = f"k{seq % keys}"
            await client.send(Counter.ref(key), Add(sender="s", seq=seq))
            sent[key].append(seq)

        for seq in range(400):  # acknowledged; many not yet handled when Redis goes away
            await send(seq)
        stopping = time.monotonic()
        private_server.stop()  # graceful: the AOF is flushed
        await eventually(lambda: not any(w.shards for w in workers), timeout=LEASE_TTL + 10)
        # Dropped once no tick succeeded for a TTL: the last one was at most a renew interval
        # before Redis went away, so not sooner than TTL - renew interval after it did.
        dropped_after = time.monotonic() - stopping
        assert dropped_after >= LEASE_TTL - RENEW_INTERVAL, f"shards dropped {dropped_after:.2f}s in"
        assert private_server.start().url == url

        await eventually(lambda: _balanced(workers, client.shards), timeout=20)

        async def accepted(seq: int) -> bool:
            try:
                await send(seq)
            except Exception:
                return False
            return True

        for seq in range(400, 800):
            await eventually(partial(accepted, seq), timeout=20, interval=0.2)
        await eventually(lambda: _states_exact(client, keys, sent), timeout=30, interval=0.2)
        await asyncio.sleep(0.5)  # anything applied twice would show up now
        assert await _states_exact(client, keys, sent)


@pytest.mark.chaos
@pytest.mark.single("its own server, SIGKILLed and restarted (a cluster's failover: test_cluster)")
async def test_redis_sigkill_keeps_what_was_acknowledged_before_the_last_fsync(
    private_server: EmbeddedServer, spawn_worker: Callable[..., WorkerProcess], namespace: str
) -> None:
    """With ``appendfsync everysec`` Redis fsyncs its AOF every second, and postpones a write
    while an fsync is still running for at most 2 s more (redis.io, "Persistence": "you may lose
    2 seconds of data" in the worst case). So a message acknowledged 3 s before a SIGKILL is
    kept; later ones may be lost, and nothing is applied twice."""
    assert private_server.appendfsync == "everysec"
    url = private_server.url
    worker = spawn_worker(url=url)
    keys = 20
    acked: list[tuple[float, int]] = []  # (monotonic time after the ack, seq)
    async with actors.connect(url, namespace=namespace, app=app) as client:
        seq = 0
        started = time.monotonic()
        while time.monotonic() - started < 4.0:
            await client.send(Counter.ref(f"k{seq % keys}"), Add(sender="s", seq=seq))
            acked.append((time.monotonic(), seq))
            seq += 1
            if seq % 50 == 0:
                await asyncio.sleep(0.01)
        killed_at = time.monotonic()
        private_server.kill()
    assert private_server.start().url == url, "same directory, same port"
    kept = [s for t, s in acked if t < killed_at - 3.0]
    assert len(kept) >= 100, "enough acknowledged well before the kill to check"

    async with actors.connect(url, namespace=namespace, app=app) as client:

        async def settled() -> dict[str, list[int]] | None:
            try:
                infos = [await client.store.shard_info(s) for s in range(client.shards)]
                if not all(i.pending == 0 and (i.lag or 0) == 0 and i.owner for i in infos):
                    return None
                states = await asyncio.gather(*(client.state(Counter.ref(f"k{k}")) for k in range(keys)))
            except Exception:
                return None
            return {f"k{k}": (s.seqs.get("s", []) if s else []) for k, s in enumerate(states)}

        await eventually(settled, timeout=30, interval=0.2)
        await asyncio.sleep(0.5)
        final = await settled()
        assert final is not None
        for key, seqs in final.items():
            assert seqs == sorted(set(seqs)), f"{key}: in order, none twice"
        handled = {s for seqs in final.values() for s in seqs}
        missing = [s for s in kept if s not in handled]
        assert missing == [], f"{len(missing)} messages acknowledged over 3 s before the kill were lost"
    worker.stop()

"""Workers that start together, join and leave under a backlog (issue #16): the shards end
evenly spread (each worker holds the floor or the ceiling of shards / workers), a change of
membership is acted on at once rather than at the next tick, few shards move, and a shard
that moves hands its read-ahead over as fresh messages (no start is counted as a recovered
turn's). Real ``actors worker`` processes on a real server.

The processes run with a long renew interval (``RENEW_S``): their periodic ticks are then
rare, so a balance reached within half of it was reached by the events that tell the
supervisors of a join, a leave or a release, not by a tick that happened to come.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest

import actors
from actors import WorkerSettings
from actors.store import Entry, Store
from actors.supervisor import share

from .apps import Add, Counter, Get, Total, app
from .conftest import WorkerProcess, eventually

pytestmark = pytest.mark.chaos

SHARDS = 16
RENEW_S, TTL_S = 5.0, 10.0
SLOW_TICKS = ("--shards", str(SHARDS), "--renew-interval", str(RENEW_S), "--lease-ttl", str(TTL_S))
BALANCE_S = RENEW_S / 2
"""How soon after a change of membership the shards must be evenly spread again: half a
renew interval, generous for a loaded machine (a hand-over takes milliseconds to a few
hundred), yet a worker that waited for its next tick misses it."""
COUNTERS, MESSAGES = 400, 8_000


class Watch:
    """What the test sees of a namespace while workers run: each shard's owner (as process
    ids), its epoch, and the most recovered-turn starts ever counted at once (``deliveries``
    fields), polled every 10 ms."""

    def __init__(self, client: actors.Client, procs: Sequence[WorkerProcess]) -> None:
        self.client, self.procs = client, list(procs)
        self.max_counted = 0

    async def look(self) -> tuple[list[int | None], list[int], list[int]]:
        """(owner pid per shard, epoch per shard, member pids), in one round trip."""
        k = self.client.store.keys
        async with self.client.store.redis.pipeline(transaction=False) as pipe:
            for s in range(SHARDS):
                pipe.get(k.lease(s))
                pipe.get(k.epoch(s))
                pipe.hlen(k.deliveries(s))
            pipe.zrange(k.workers(), 0, -1)
            *replies, members = await pipe.execute()
        leases, epochs, counted = replies[0::3], replies[1::3], replies[2::3]
        self.max_counted = max(self.max_counted, sum(counted))
        owners = [self.pid_of(v.decode().rpartition("|")[0]) if v else None for v in leases]
        return owners, [int(e or 0) for e in epochs], [p for m in members if (p := self.pid_of(m.decode()))]

    def pid_of(self, worker_id: str) -> int | None:
        return next((p.pid for p in self.procs if f"-{p.pid}-" in worker_id), None)

    def held(self, owners: list[int | None]) -> list[int]:
        return [owners.count(p.pid) for p in self.procs]

    async def until(self, check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
        """Poll (``look`` included) until ``check`` holds; returns the monotonic time it first did."""
        deadline = time.monotonic() + timeout
        while not await check():
            owners, _, members = await self.look()
            if time.monotonic() > deadline:
                logs = "\n".join(p.log.read_text()[-2000:] for p in self.procs if p.log.exists())
                raise AssertionError(f"{what}: not within {timeout:.1f}s (held {self.held(owners)}, "
                                     f"members {members}); logs:\n{logs}")  # fmt: skip
            await asyncio.sleep(0.01)
        return time.monotonic()

    async def all_members(self) -> float:
        async def check() -> bool:
            _, _, members = await self.look()
            return {p.pid for p in self.procs} <= set(members)

        return await self.until(check, 30, "every worker registered")

    async def even(self, timeout: float) -> list[int]:
        """Until every shard is held and each worker holds the floor or the ceiling of its
        share; returns the count each holds."""
        low, high = SHARDS // len(self.procs), -(-SHARDS // len(self.procs))
        held: list[int] = []

        async def check() -> bool:
            nonlocal held
            owners, _, _ = await self.look()
            held = self.held(owners)
            return all(o is not None for o in owners) and all(low <= h <= high for h in held)

        await self.until(check, timeout, f"shards evenly spread over {len(self.procs)} workers")
        return held

    async def drained(self) -> None:
        async def check() -> bool:
            infos = [await self.client.store.shard_info(s) for s in range(SHARDS)]
            return all(i.lag == 0 and i.pending == 0 for i in infos if i.length)

        await self.until(check, 60, "the backlog handled")


async def backlog(client: actors.Client) -> None:
    refs = [Counter.ref(f"c{i}") for i in range(COUNTERS)]
    for first in range(0, MESSAGES, 1000):
        await client.send_many([(refs[i % COUNTERS], Add()) for i in range(first, first + 1000)])


async def check_totals(client: actors.Client) -> None:
    """Every counter got each of its messages exactly once, and none was dead-lettered."""
    for first in range(0, COUNTERS, 100):
        totals = await asyncio.gather(
            *(client.ask(Counter.ref(f"c{i}"), Get(), timeout=30) for i in range(first, first + 100))
        )
        assert totals == [Total(total=MESSAGES // COUNTERS)] * 100
    assert sum([(await client.store.shard_info(s)).dead_letters for s in range(SHARDS)]) == 0


def moves_of(procs: Sequence[WorkerProcess]) -> str:
    """The supervisors' log lines (acquired, releasing, released), for a failure's message."""
    return "\n".join(f"{p.pid}: {line}" for p in procs for line in p.log.read_text().splitlines()
                     if "supervisor" in line)  # fmt: skip


# ---- the split every supervisor computes --------------------------------------------------


def test_every_worker_computes_the_same_even_split() -> None:
    for shards, workers in [(16, 1), (16, 2), (16, 3), (4, 3), (3, 5), (1024, 7)]:
        live = sorted(f"w{i}" for i in range(workers))
        shares = [share(shards, live, w) for w in live]
        assert sum(shares) == shards and max(shares) - min(shares) <= 1, (shards, workers, shares)
        assert shares == sorted(shares, reverse=True), "the first by id hold the one more"
    assert share(16, ["a", "b"], "c") == 5, "a worker not yet seen in the list counts itself in"


# ---- a drain that begins while a read is in flight --------------------------------------


async def test_a_drain_hands_over_what_a_read_in_flight_took(
    start_worker: Callable[..., Any], connect: Callable[..., Any], fast_settings: WorkerSettings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The entries a fenced read took into the group just as the drain began (the runner
    forgets them unstarted) are handed over with the lease like the rest of the read-ahead:
    the next owner runs them as fresh messages, counting no start of a recovered turn (two
    round trips each, one actor's messages one after another)."""
    read, resume = asyncio.Event(), asyncio.Event()
    real_read = Store.read_new

    async def held_read(
        self: Store, shard: int, lease: str, owner: str, count: int
    ) -> tuple[list[Entry], str]:
        entries, newest = await real_read(self, shard, lease, owner, count)
        if entries and not read.is_set():  # taken into the group: pending, ours
            read.set()
            await resume.wait()
        return entries, newest

    settings = fast_settings.model_copy(update={"shards": 1})
    async with connect(app=app, shards=1) as client:
        ref, k = Counter.ref("late"), client.store.keys
        await client.send_many([(ref, Add()) for _ in range(20)])
        monkeypatch.setattr(Store, "read_new", held_read)
        leaving = await start_worker(app, settings)
        await asyncio.wait_for(read.wait(), 10)
        leaving.stop()  # the drain begins while the read's entries are on their way
        resume.set()
        await eventually(lambda: _released(client), timeout=20)
        pending = [e["message_id"].decode() for e in await client.store.redis.xpending_range(
            k.inbox(0), "workers", "-", "+", 100)]  # fmt: skip
        handed = {m.decode() for m in await client.store.redis.smembers(k.handover(0))}
        assert len(pending) == 20 and handed == set(pending), "every entry the read took is handed over"

        monkeypatch.undo()
        await start_worker(app, settings)
        counted = 0
        while (await client.ask(ref, Get(), timeout=10)).total < 20:
            counted = max(counted, await client.store.redis.hlen(k.deliveries(0)))
        assert counted == 0, "the next owner counted starts of messages no one had started"
        assert await client.ask(ref, Get(), timeout=10) == Total(total=20)


async def _released(client: actors.Client) -> bool:
    return await client.store.redis.get(client.store.keys.lease(0)) is None


# ---- workers started together against a backlog ----------------------------------------


@pytest.mark.parametrize("count", [2, 3])
async def test_workers_started_together_against_a_backlog_split_it_evenly(
    count: int, spawn_worker: Callable[..., WorkerProcess], connect: Callable[..., Any]
) -> None:
    async with connect(app=app, shards=SHARDS) as client:
        await backlog(client)
        procs = [spawn_worker("tests.apps:app", *SLOW_TICKS, log_level="INFO") for _ in range(count)]
        watch = Watch(client, procs)
        registered = await watch.all_members()
        await watch.even(timeout=BALANCE_S + (time.monotonic() - registered))
        _, spread, _ = await watch.look()
        await watch.drained()
        _, epochs, _ = await watch.look()
        assert epochs == spread, "no shard moved once they were evenly spread"
        moves = sum(e - 1 for e in epochs)
        # The first worker to start may take every shard before the others are there: what
        # the others hold moved once, and the third's share at most twice.
        assert max(epochs) <= count and moves <= SHARDS, (
            f"epochs {epochs}: moved too often\n{moves_of(procs)}"
        )
        assert watch.max_counted == 0, "a moved shard's read-ahead was counted as recovered turns"
        await check_totals(client)


# ---- a worker joins a running pair; one of a pair leaves ---------------------------------


async def _running_pair(
    client: actors.Client, spawn_worker: Callable[..., WorkerProcess]
) -> tuple[Watch, list[WorkerProcess]]:
    pair = [spawn_worker("tests.apps:app", *SLOW_TICKS, log_level="INFO") for _ in range(2)]
    watch = Watch(client, pair)
    await watch.all_members()
    await watch.even(timeout=30)
    return watch, pair


async def test_a_worker_joining_a_running_pair_under_a_backlog_ends_evenly_spread(
    spawn_worker: Callable[..., WorkerProcess], connect: Callable[..., Any]
) -> None:
    async with connect(app=app, shards=SHARDS) as client:
        watch, _ = await _running_pair(client, spawn_worker)
        _, before, _ = await watch.look()
        await backlog(client)
        joining = spawn_worker("tests.apps:app", *SLOW_TICKS, log_level="INFO")
        watch.procs.append(joining)
        registered = await watch.all_members()
        held = await watch.even(timeout=BALANCE_S + (time.monotonic() - registered))
        assert sorted(held) == [5, 5, 6]
        await watch.drained()
        _, after, _ = await watch.look()
        moved = [a - b for a, b in zip(after, before, strict=True)]
        assert set(moved) <= {0, 1} and sum(moved) == held[2], f"only the joiner's share moved, once: {moved}"
        assert watch.max_counted == 0
        await check_totals(client)


async def test_one_of_a_pair_leaving_hands_its_shards_to_the_other_at_once(
    spawn_worker: Callable[..., WorkerProcess], connect: Callable[..., Any]
) -> None:
    async with connect(app=app, shards=SHARDS) as client:
        watch, (leaving, staying) = await _running_pair(client, spawn_worker)
        await backlog(client)
        leaving.signal(signal.SIGTERM)
        assert leaving.proc is not None and await asyncio.to_thread(leaving.proc.wait, 30) == 0
        watch.procs.remove(leaving)

        async def all_staying() -> bool:
            owners, _, _ = await watch.look()
            return owners == [staying.pid] * SHARDS

        # Timed from its exit: its drain (a running turn) may take a while under a backlog.
        await watch.until(all_staying, BALANCE_S, "the staying worker holding every shard")
        await watch.drained()
        assert watch.max_counted == 0
        await check_totals(client)


# ---- a release announces itself in the same call ----------------------------------------------


async def test_a_release_announces_itself_and_stands_when_the_publish_is_refused(
    redis_server: Any, namespace: str, connect: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """``release_lease.lua`` publishes ``released N`` itself (one round trip); a Redis user
    without the channel (an ACL) still releases, and the refusal is logged."""
    user, password = f"nochannels-{uuid.uuid4().hex[:12]}", uuid.uuid4().hex
    async with connect(app=app, shards=1) as client:
        admin, k = client.store.redis, client.store.keys
        heard: list[bytes] = []
        listening = asyncio.create_task(client.store.listen(k.lease_events(), heard.append))
        await admin.execute_command(
            "ACL", "SETUSER", user, "on", f">{password}", "~*", "+@all", "resetchannels"
        )
        store = Store.from_url(f"redis://{user}:{password}@127.0.0.1:{redis_server.port}/0", namespace)
        try:
            await asyncio.sleep(0.2)  # subscribed
            for refused in (False, True):
                user_store = store if refused else client.store
                epoch = await user_store.acquire_lease(0, "w", ttl_ms=10_000)
                assert epoch is not None
                assert await user_store.release_lease(0, f"w|{epoch}", ["1-1"]) is True
                assert await admin.get(k.lease(0)) is None and await admin.smembers(k.handover(0)) == {b"1-1"}
            await eventually(lambda: heard == [b"released 0"], timeout=5)
            assert any("could not announce 'released 0'" in r.getMessage() for r in caplog.records)
        finally:
            listening.cancel()
            await store.close()
            await admin.execute_command("ACL", "DELUSER", user)

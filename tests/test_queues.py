"""Queues behind limiters: priority order, dedup refusal, fairness between partitions,
the concurrency cap held by queued turns, and enqueueing from inside an actor."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from pathlib import Path

import pytest
from pydantic import BaseModel

import actors
from actors import Actor, App, ConfigurationError, DuplicateItem, Limiter

from .conftest import eventually
from .test_cli import actors_cli, ok


class Job(BaseModel):
    tag: str
    seconds: float = 0.0


class Fan(BaseModel):
    tags: list[str]
    dedup: str = ""


def note(event: str, tag: str) -> None:
    with open(Path(os.environ["ACTORS_TEST_DIR"]) / "jobs.log", "a") as out:
        out.write(f"{event} {tag} {time.time():.6f}\n")


class Worker(Actor):
    class State(BaseModel):
        done: int = 0

    async def on_job(self, msg: Job) -> None:
        note("start", msg.tag)
        await asyncio.sleep(msg.seconds)
        note("end", msg.tag)
        self.state.done += 1


class Boss(Actor):
    """Queues jobs from inside a turn (journaled), then sleeps (the turn re-runs on waking)."""

    class State(BaseModel):
        items: list[str] = []
        refused: str = ""

    async def on_fan(self, msg: Fan) -> None:
        for tag in msg.tags:
            self.state.items.append(await self.enqueue("serial", Worker.ref(tag), Job(tag=tag)))
        try:
            await self.enqueue("serial", Worker.ref("again"), Job(tag="again"), dedup_id=msg.dedup)
            await self.enqueue("serial", Worker.ref("again"), Job(tag="again"), dedup_id=msg.dedup)
        except DuplicateItem as exc:
            self.state.refused = exc.dedup_id
        await self.sleep(0.2)


app = App(Worker, Boss, limiters=[Limiter("serial", concurrency=1), Limiter("pair", concurrency=2)])


@pytest.fixture(autouse=True)
def job_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ACTORS_TEST_DIR", str(tmp_path))
    return tmp_path / "jobs.log"


def events(path: Path, kind: str) -> list[str]:
    if not path.exists():
        return []
    return [line.split()[1] for line in path.read_text().splitlines() if line.startswith(kind)]


async def test_higher_priority_goes_first_and_arrival_order_breaks_ties(
    connect, start_worker, job_log
) -> None:
    async with connect(app=app, shards=4) as client:
        for tag, priority in [("a", 0), ("b", 5), ("c", 0), ("d", 10), ("e", -3), ("f", 5)]:
            await client.enqueue("serial", Worker.ref(tag), Job(tag=tag), priority=priority)
        await start_worker(app)
        await eventually(lambda: len(events(job_log, "end")) == 6, timeout=20)
    assert events(job_log, "start") == ["d", "b", "f", "a", "c", "e"]


async def test_a_dedup_id_is_refused_while_queued_or_running_and_free_after(
    connect, start_worker, job_log
) -> None:
    async with connect(app=app, shards=4) as client:
        first = await client.enqueue(
            "serial", Worker.ref("x"), Job(tag="x1", seconds=0.5), dedup_id="order-7"
        )
        with pytest.raises(DuplicateItem, match="'order-7' is already queued or running") as refused:
            await client.enqueue("serial", Worker.ref("x"), Job(tag="x2"), dedup_id="order-7")
        assert refused.value.item_id == first
        await start_worker(app)
        await eventually(lambda: events(job_log, "start") == ["x1"], timeout=20)
        with pytest.raises(DuplicateItem):  # running now
            await client.enqueue("serial", Worker.ref("x"), Job(tag="x3"), dedup_id="order-7")
        await eventually(lambda: events(job_log, "end") == ["x1"], timeout=20)

        async def accepted() -> bool:
            try:
                await client.enqueue("serial", Worker.ref("x"), Job(tag="x4"), dedup_id="order-7")
            except DuplicateItem:
                return False
            return True

        await eventually(accepted, timeout=10)
        await eventually(lambda: events(job_log, "end") == ["x1", "x4"], timeout=20)


async def test_a_small_partition_is_not_starved_by_a_large_one(connect, start_worker, job_log) -> None:
    async with connect(app=app, shards=4) as client:
        for n in range(200):
            await client.enqueue("pair", Worker.ref(f"big-{n}"), Job(tag=f"big-{n}"), partition="big")
        await start_worker(app)
        await eventually(lambda: len(events(job_log, "end")) >= 10, timeout=20)
        for n in range(10):
            await client.enqueue("pair", Worker.ref(f"small-{n}"), Job(tag=f"small-{n}"), partition="small")
        await eventually(lambda: len(events(job_log, "end")) == 210, timeout=60)
    ends = events(job_log, "end")
    last_small = max(i for i, tag in enumerate(ends) if tag.startswith("small"))
    big_before = sum(1 for tag in ends[:last_small] if tag.startswith("big"))
    assert big_before < 100, f"{big_before} big items finished before the last small one"


async def test_queued_turns_hold_the_limiters_slots(connect, start_worker, job_log) -> None:
    await start_worker(app)
    await start_worker(app)
    async with connect(app=app, shards=4) as client:
        for n in range(12):
            await client.enqueue("pair", Worker.ref(f"w{n}"), Job(tag=f"w{n}", seconds=0.1))
        await eventually(lambda: len(events(job_log, "end")) == 12, timeout=30)
    lines = [line.split() for line in job_log.read_text().splitlines()]
    timeline = sorted((float(t), 1 if kind == "start" else -1) for kind, _, t in lines)
    running = peak = 0
    for _, change in timeline:
        running += change
        peak = max(peak, running)
    assert peak == 2


async def test_an_actor_enqueues_from_a_turn_once_even_when_it_re_runs(
    connect, start_worker, job_log
) -> None:
    await start_worker(app)
    async with connect(app=app, shards=4) as client:
        await client.send(Boss.ref("b"), Fan(tags=["p", "q", "r"], dedup="boss-again"))
        await eventually(lambda: len(events(job_log, "end")) == 4, timeout=20)
        state = await eventually(lambda: _boss_done(client), timeout=20)
        assert len(state.items) == 3 and state.refused == "boss-again"
    assert sorted(events(job_log, "start")) == ["again", "p", "q", "r"], "each queued once"


async def test_enqueue_refuses_an_unknown_queue_and_a_bad_priority(connect) -> None:
    async with connect(app=app, shards=4) as client:
        with pytest.raises(ConfigurationError, match="no limiter named 'nope'"):
            await client.enqueue("nope", Worker.ref("k"), Job(tag="k"))
        with pytest.raises(ValueError, match="priority must be an integer from -1000 to 1000"):
            await client.enqueue("serial", Worker.ref("k"), Job(tag="k"), priority=5000)


async def _boss_done(client: actors.Client):  # type: ignore[no-untyped-def]
    state = await client.state(Boss.ref("b"))
    return state if state is not None and state.items else None


async def test_status_shows_each_limiter_its_slots_and_queue_by_partition(
    connect, redis_url, namespace
) -> None:
    async with connect(app=app, shards=4) as client:
        for n in range(3):
            await client.enqueue("pair", Worker.ref(f"t{n}"), Job(tag=f"t{n}"), partition="tenant-a")
        await client.enqueue("pair", Worker.ref("u"), Job(tag="u"), partition="tenant-b")
        # What a worker of the app does when it starts (no worker runs, so nothing is dispatched):
        await client.store.declare_limiters({n: lim.model_dump_json() for n, lim in app.limiters.items()})

        args = ("status", "--json", "--redis", redis_url, "--namespace", namespace)
        status = json.loads(ok(await actors_cli(*args)))
        by_name = {lim["name"]: lim for lim in status["limiters"]}
        assert by_name["pair"]["slots"] == "0/2"
        assert by_name["pair"]["queued"] == 4
        assert by_name["pair"]["queued_by_partition"] == {"tenant-a": 3, "tenant-b": 1}
        assert by_name["serial"]["queued"] == 0
        text = ok(await actors_cli("status", "--redis", redis_url, "--namespace", namespace))
        assert "tenant-a=3, tenant-b=1" in text


class Crawl(Actor, limiter="crawl1"):
    async def on_job(self, msg: Job) -> None:
        note("start", msg.tag)
        await asyncio.sleep(msg.seconds)
        note("end", msg.tag)


class Local(Actor):
    async def on_job(self, msg: Job) -> None:
        note("start", msg.tag)
        await asyncio.sleep(msg.seconds)
        note("end", msg.tag)


own = App(Crawl, Local, limiters=[Limiter("crawl1", concurrency=1), Limiter("local", per_worker=1)])


async def test_a_limited_type_fed_by_its_own_limiters_queue_needs_one_slot(
    connect, start_worker, job_log
) -> None:
    await start_worker(own)
    async with connect(app=own, shards=4) as client:
        for n in range(4):
            await client.enqueue("crawl1", Crawl.ref(f"k{n}"), Job(tag=f"k{n}", seconds=0.05))
        await eventually(lambda: len(events(job_log, "end")) == 4, timeout=10)


async def test_per_worker_caps_queued_turns_too(connect, start_worker, job_log) -> None:
    await start_worker(own)
    async with connect(app=own, shards=4) as client:
        for n in range(5):
            await client.enqueue("local", Local.ref(f"l{n}"), Job(tag=f"l{n}", seconds=0.1))
        await eventually(lambda: len(events(job_log, "end")) == 5, timeout=20)
    lines = [line.split() for line in job_log.read_text().splitlines()]
    running = peak = 0
    for kind, _, _ in sorted(lines, key=lambda w: float(w[2])):
        running += 1 if kind == "start" else -1
        peak = max(peak, running)
    assert peak == 1


async def test_a_late_dispatch_confirmation_does_not_jam_the_queue(connect) -> None:
    async with connect(app=app, shards=4) as client:
        store = client.store
        for tag in ("a", "b"):
            await client.enqueue("serial", Worker.ref(tag), Job(tag=tag))
        _, _, first = await store.queue_dispatch("serial", 60_000, 1, 0, 0, deadline_ms=1)
        assert first is not None
        await asyncio.sleep(0.05)  # the dispatcher stalls past its deadline...
        status, _, _ = await store.queue_dispatch("serial", 60_000, 1, 0, 0, deadline_ms=1)
        assert status == 0, "the lapsed item is queued again, but its slot is still held"
        await store.queue_dispatched("serial", first[0])  # ...then appends it and confirms, late
        await store.limiter_release("serial", first[0])
        _, _, second = await store.queue_dispatch("serial", 60_000, 1, 0, 0, deadline_ms=30_000)
        assert second is not None and second[0] != first[0], "the next item, not the done one"
        assert await store.queue_depths("serial") == ({}, 1)


async def test_an_item_queued_again_under_its_id_after_dispatch_is_not_queued_twice(connect) -> None:
    async with connect(app=app, shards=4) as client:
        store = client.store
        headers = {"queue": "serial", "dedup": "d-1"}
        routed = actors.routing.route(
            app,
            Worker.ref("r"),
            Job(tag="r"),
            client.shards,
            1 << 20,
            message_id="turn-1.q0",
            headers=headers,
        )
        args = ("serial", "turn-1.q0", routed.shard, routed.data, "d-1", "", 0, 60_000, 60_000)
        assert await store.queue_enqueue(*args) == (True, "turn-1.q0")
        _, _, item = await store.queue_dispatch("serial", 60_000, 1, 0, 0, 30_000)
        assert item is not None
        await store.queue_dispatched("serial", item[0])
        assert await store.queue_enqueue(*args) == (True, "turn-1.q0"), "a re-run of the same enqueue"
        assert await store.queue_depths("serial") == ({}, 0), "nothing queued twice"


async def test_queued_items_survive_a_redis_restart(tmp_path, start_worker, namespace, job_log) -> None:
    from actors import EmbeddedServer

    server = EmbeddedServer(tmp_path / "redis").start()
    try:
        async with actors.connect(server.url, namespace=namespace, app=app, shards=4) as client:
            for n in range(5):
                await client.enqueue("serial", Worker.ref(f"s{n}"), Job(tag=f"s{n}"), partition=f"p{n % 2}")
        server.stop()  # graceful: the AOF is flushed
        server.start()
        await start_worker(app, url=server.url)
        await eventually(lambda: len(events(job_log, "end")) == 5, timeout=30)
        assert sorted(events(job_log, "end")) == [f"s{n}" for n in range(5)]
    finally:
        server.stop()


async def _drain(store: actors.Store, name: str, count: int) -> list[str]:
    """Dispatch ``count`` items the way a dispatcher does (no cap, no rate), in order; their ids."""
    order = []
    for _ in range(count):
        status, _, item = await store.queue_dispatch(name, 60_000, 0, 0, 0, 30_000)
        assert status == 1 and item is not None
        await store.queue_dispatched(name, item[0])
        order.append(item[0])
    return order


async def test_partitions_take_turns_within_each_priority_after_a_high_priority_item(connect) -> None:
    """A high-priority item of a big partition, once dispatched, must not send a new small
    partition behind the big one's whole backlog at the normal priority (defect 16)."""
    async with connect(app=app, shards=4) as client:
        big = [
            await client.enqueue("pair", Worker.ref(f"big-{n}"), Job(tag=f"big-{n}"), partition="big")
            for n in range(60)
        ]
        urgent = await client.enqueue(
            "pair", Worker.ref("urgent"), Job(tag="urgent"), partition="big", priority=5
        )
        first = await _drain(client.store, "pair", 11)
        assert first == [urgent, *big[:10]], "the higher priority first, then arrival order"
        small = [
            await client.enqueue("pair", Worker.ref(f"small-{n}"), Job(tag=f"small-{n}"), partition="small")
            for n in range(5)
        ]
        rest = await _drain(client.store, "pair", 55)
        assert sorted(rest) == sorted(big[10:] + small)
    # Fair shares from here: small-i gets the round after small-(i-1), and so does each big item,
    # so at most i big items (and i small ones) go before small-i.
    positions = [rest.index(item) for item in small]
    assert all(p <= 2 * i for i, p in enumerate(positions)), f"small items at {positions} of 55"
    big_rest = [rest.index(item) for item in big[10:]]
    assert big_rest == sorted(big_rest), "each partition in arrival order"


async def test_each_priority_level_is_fair_on_its_own(connect) -> None:
    """Two partitions with items at two priorities: all the high ones first, each level taking
    turns between the partitions."""
    async with connect(app=app, shards=4) as client:
        ids: dict[str, str] = {}
        for partition in ("a", "b"):
            for priority in (0, 7):
                for n in range(4):
                    tag = f"{partition}{priority}-{n}"
                    ids[await client.enqueue(
                        "pair", Worker.ref(tag), Job(tag=tag), partition=partition, priority=priority
                    )] = tag  # fmt: skip
        order = [ids[i] for i in await _drain(client.store, "pair", 16)]
    high, low = order[:8], order[8:]
    assert all("7-" in tag for tag in high) and all("0-" in tag for tag in low)
    for level in (high, low):
        for pair in range(4):
            turn = level[2 * pair : 2 * pair + 2]
            assert sorted(tag[0] for tag in turn) == ["a", "b"], f"round {pair}: {turn} (all: {order})"


QUEUES_APP = "tests.test_queues:app"
LEASE_TTL = 1.0  # what spawn_worker and fast_settings give their workers
SLACK = 1.0
"""Scheduling slack on a loaded 2-core machine, on top of the lease TTL."""


async def _free(client: actors.Client, dedup_id: str, tag: str) -> bool:
    """Whether ``dedup_id`` can be taken again (then it is: by a new item, ``tag``)."""
    try:
        await client.enqueue("serial", Worker.ref(tag), Job(tag=tag), dedup_id=dedup_id)
    except DuplicateItem:
        return False
    return True


async def _dedup_gone(client: actors.Client, dedup_id: str) -> bool:
    key = client.store.keys.queue("serial", f"dedup:{dedup_id}")
    return not await client.store.redis.exists(key)


async def _committed(client: actors.Client, key: str) -> bool:
    state = await client.state(Worker.ref(key))
    return state is not None and state.done == 1


def _end_time(path: Path, tag: str) -> float:
    """When the handler ended (its commit follows within milliseconds)."""
    lines = (line.split() for line in path.read_text().splitlines())
    return next(float(t) for kind, name, t in lines if kind == "end" and name == tag)


async def _freed_within_a_lease_ttl(client: actors.Client, dedup_id: str, ended: float) -> None:
    await eventually(lambda: _dedup_gone(client, dedup_id), timeout=LEASE_TTL + SLACK + 10)
    late = time.time() - ended
    assert late <= LEASE_TTL + SLACK, f"dedup id {dedup_id!r} freed {late:.2f}s after its item ended"
    assert await _free(client, dedup_id, f"{dedup_id}-again")


async def test_a_dedup_id_is_free_a_lease_ttl_after_a_graceful_hand_over_right_after_its_turn(
    connect, spawn_worker, start_worker, job_log
) -> None:
    """SIGTERM while the item's turn runs: the drain waits for the turn, and the runner stops
    right after the turn's commit, before the end of the item is recorded (defect 17)."""
    first = spawn_worker(QUEUES_APP)
    async with connect(app=app, shards=4) as client:
        await client.enqueue("serial", Worker.ref("h"), Job(tag="h1", seconds=0.3), dedup_id="handed-over")
        await eventually(lambda: events(job_log, "start") == ["h1"], timeout=20)
        first.signal(signal.SIGTERM)
        await start_worker(app)  # takes the shards over
        assert first.proc is not None and await asyncio.to_thread(first.proc.wait, 20) == 0
        assert await _committed(client, "h")
        await _freed_within_a_lease_ttl(client, "handed-over", _end_time(job_log, "h1"))
    assert events(job_log, "start").count("h1") == 1, "the item ran once"


@pytest.mark.single("an ACL user made on the one server (a cluster's nodes each have their own ACL)")
async def test_a_dedup_id_is_free_a_lease_ttl_after_its_worker_died_between_commit_and_queue_done(
    redis_server, namespace, connect, spawn_worker, start_worker, job_log
) -> None:
    """The worker's Redis user may not touch the queue's dedup keys, so its queue_done fails
    after every commit; it is then SIGKILLed: the state a kill between the commit and
    queue_done leaves (defect 17)."""
    user, password = f"nodedup-{uuid.uuid4().hex[:12]}", uuid.uuid4().hex
    tag = f"{namespace}:{{limit:"
    keys = [  # every key of the namespace except <ns>:{limit:*}:q:dedup:*
        f"~{namespace}:[^{{]*", f"~{namespace}:{{[0-9]*", f"~{tag}*}}:[^q]*",
        f"~{tag}*}}:q:[^d]*", f"~{tag}*}}:q:d[^e]*",
    ]  # fmt: skip
    async with connect(app=app, shards=4) as client:
        admin = client.store.redis
        await admin.execute_command(
            "ACL", "SETUSER", user, "on", f">{password}", "+@all", "allchannels", *keys
        )
        try:
            url = f"redis://{user}:{password}@127.0.0.1:{redis_server.port}/0"
            doomed = spawn_worker(QUEUES_APP, url=url)
            await client.enqueue("serial", Worker.ref("k"), Job(tag="k1", seconds=0.2), dedup_id="crashed")
            await eventually(lambda: _committed(client, "k"), timeout=20)
            doomed.kill()
            assert not await _dedup_gone(client, "crashed"), "its worker could not record the end"
            await start_worker(app)
            await _freed_within_a_lease_ttl(client, "crashed", _end_time(job_log, "k1"))
        finally:
            await admin.execute_command("ACL", "DELUSER", user)
    assert events(job_log, "start").count("k1") == 1, "the item ran once"

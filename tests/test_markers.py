"""Idempotency markers live only as long as they protect something (issue #14).

A queued item's ``seen:`` marker goes once no enqueue of its id can run again (a client's
call returned; a turn's journal recorded the enqueue); its dispatch marker once the item
left the queue and no dispatch of it can still append it; a journaled ask's marker and
kept reply once the asker's journal recorded the reply. Where they are still needed (a
crash before that write, a dispatch that lapsed after its append) they still deduplicate."""

from __future__ import annotations

import asyncio
import signal
import time

import actors
from actors.markers import Markers
from actors.queues import APPEND_MARGIN_MS, append_item, confirm_item, item_target
from actors.routing import shard_of

from .conftest import eventually
from .marker_apps import Asker, AskMany, Boss, Counted, Fan, Gated, GatedAsker, Job, Jobs, app

MARKER_APP = "tests.marker_apps:app"


async def _markers(client: actors.Client) -> list[str]:
    """Every queue ``seen:`` marker, idempotency marker and reply key of the namespace."""
    ns, redis = client.store.keys.namespace, client.store.redis
    found: list[str] = []
    for pattern in (f"{ns}:*:q:seen:*", f"{ns}:*:idem:*", f"{ns}:*:reply:*"):
        found += [key.decode() async for key in redis.scan_iter(match=pattern, count=1000)]
    return sorted(found)


async def _no_markers_left(client: actors.Client, timeout: float = 20) -> None:
    """Markers are deleted right after the write that makes them useless: soon, not at once."""
    left: list[str] = []

    async def gone() -> bool:
        left[:] = await _markers(client)
        return not left

    try:
        await eventually(gone, timeout=timeout)
    except AssertionError:
        raise AssertionError(f"{len(left)} markers left, e.g. {left[:5]}") from None


async def _done(client: actors.Client, key: str) -> list[str]:
    state = await client.state(Jobs.ref(key))
    return [] if state is None else list(state.done)


async def _ran(client: actors.Client, keys: list[str], count: int) -> bool:
    return sum([len(await _done(client, key)) for key in keys]) == count


async def test_queued_items_that_ran_leave_no_seen_or_dispatch_marker(connect, start_worker) -> None:
    await start_worker(app)
    async with connect(app=app, shards=4) as client:
        targets = [f"w{n}" for n in range(4)]
        for n in range(40):
            dedup = f"d{n}" if n % 2 else None
            ref = Jobs.ref(targets[n % 4])
            await client.enqueue("jobs", ref, Job(tag=f"c{n}"), dedup_id=dedup, partition=f"p{n % 3}")
        await client.send(Boss.ref("b"), Fan(tags=["t0", "t1", "t2"], target="w0"))
        await eventually(lambda: _ran(client, targets, 43), timeout=60)
        await _no_markers_left(client)


async def test_a_turns_asks_leave_no_marker_or_reply_once_it_commits(connect, start_worker) -> None:
    await start_worker(app)
    async with connect(app=app, shards=4) as client:
        for key in ("a", "b", "c"):
            await client.send(Asker.ref(key), AskMany(times=3))

        async def answered() -> bool:
            states = [await client.state(Asker.ref(key)) for key in ("a", "b", "c")]
            return all(s is not None and s.answers == [1, 2, 3] for s in states)

        await eventually(answered, timeout=30)
        await _no_markers_left(client)
        assert await client.state(Counted.ref("a")) == Counted.State(n=3), "each ask handled once"


async def test_a_worker_killed_between_an_enqueue_and_its_journal_write_queues_the_item_once(
    connect, spawn_worker, start_worker, monkeypatch
) -> None:
    async with connect(app=app, shards=4) as client:
        monkeypatch.setenv("ACTORS_CRASH_AFTER_ENQUEUE", "1")
        doomed = spawn_worker(MARKER_APP)
        monkeypatch.delenv("ACTORS_CRASH_AFTER_ENQUEUE")
        await client.send(Boss.ref("k"), Fan(tags=["first"], target="k"))
        assert doomed.proc is not None
        assert await asyncio.to_thread(doomed.proc.wait, 60) == -signal.SIGKILL
        seen = [key for key in await _markers(client) if ":q:seen:" in key]
        assert len(seen) == 1, "queued, and the turn's journal does not say so: the marker stays"

        await start_worker(app)  # recovers the turn, whose enqueue runs again

        async def boss_committed() -> bool:
            state = await client.state(Boss.ref("k"))
            return state is not None and len(state.items) == 1

        await eventually(boss_committed, timeout=30)
        # Queued after anything the re-run could have queued, to the same actor: once it has
        # run, any second copy of "first" would have run before it.
        await client.enqueue("jobs", Jobs.ref("k"), Job(tag="after"))
        await eventually(lambda: _ends_with(client, "k", "after"), timeout=30)
        assert await _done(client, "k") == ["first", "after"]
        await _no_markers_left(client)


async def test_an_asker_killed_while_it_waits_gets_the_one_reply_after_recovery(
    connect, spawn_worker, start_worker, tmp_path, monkeypatch
) -> None:
    """Between the ask and the journal write of its reply, the marker and the kept reply are
    what the re-run of the asker's turn finds its answer by."""
    monkeypatch.setenv("ACTORS_TEST_DIR", str(tmp_path))
    started = tmp_path / "gated.log"
    async with connect(app=app, shards=4) as client:
        doomed = spawn_worker(MARKER_APP)
        await client.send(GatedAsker.ref("g"), AskMany(times=1))
        await eventually(started.exists, timeout=30)  # the ask went out with its journal write
        doomed.kill()
        assert [key for key in await _markers(client) if ":idem:" in key], "the ask's marker stays"
        await start_worker(app)  # recovers both turns: the asker waits for its reply again
        (tmp_path / "open").touch()

        async def answered() -> bool:
            state = await client.state(GatedAsker.ref("g"))
            return state is not None and state.answers == [1]

        await eventually(answered, timeout=30)
        assert await client.state(Gated.ref("g")) == Gated.State(n=1), "asked once"
        await _no_markers_left(client)


async def _ends_with(client: actors.Client, key: str, tag: str) -> bool:
    done = await _done(client, key)
    return bool(done) and done[-1] == tag


async def test_a_dispatch_that_lapsed_after_its_append_is_appended_once(connect, start_worker) -> None:
    """A dispatcher appended the item and died before confirming: the item's dispatch lapses,
    and the next dispatch finds the marker, appends nothing, and confirms it."""
    async with connect(app=app, shards=4) as client:
        store = client.store
        await client.enqueue("jobs", Jobs.ref("d"), Job(tag="first"))
        status, _, taken = await store.queue_dispatch("jobs", 60_000, 0, 0, 0, deadline_ms=1)
        assert status == 1 and taken is not None
        target = item_target(taken.envelope)
        appended, _ = await store.append_once(
            taken.shard, target, taken.item_id, taken.item_id, taken.envelope, 60_000, digest=""
        )
        assert appended
        await start_worker(app)
        await eventually(lambda: _ends_with(client, "d", "first"), timeout=30)
        await client.enqueue("jobs", Jobs.ref("d"), Job(tag="after"))
        await eventually(lambda: _ends_with(client, "d", "after"), timeout=30)
        assert await _done(client, "d") == ["first", "after"]
        await _no_markers_left(client)


async def test_a_confirmation_keeps_the_marker_while_another_dispatch_of_the_item_is_live(connect) -> None:
    """Dispatch A appends, stalls past its deadline; dispatch B takes the item again; A's late
    confirmation must leave the marker to B's end, so that B appends nothing."""
    async with connect(app=app, shards=4) as client:
        store = client.store
        markers = Markers(store)
        await client.enqueue("jobs", Jobs.ref("s"), Job(tag="first"))
        _, _, a = await store.queue_dispatch("jobs", 60_000, 0, 0, 0, deadline_ms=1)
        assert a is not None
        entry_id = await append_item(store, a, time.monotonic() + 30, 60_000)
        assert entry_id
        await asyncio.sleep(0.05)  # A's dispatch lapses
        _, _, b = await store.queue_dispatch("jobs", 60_000, 0, 0, 0, deadline_ms=30_000)
        assert b is not None and b.item_id == a.item_id
        await confirm_item(store, markers, "jobs", a, entry_id, 500)  # A confirms, late
        await markers.flush()
        target = item_target(a.envelope)
        shard = shard_of(target, client.shards)
        marker = store.keys.idempotency(shard, target, a.item_id)
        assert 0 < await store.redis.pttl(marker) <= 30_000 + APPEND_MARGIN_MS, "kept until B's end"
        assert await append_item(store, b, time.monotonic() + 30, 60_000) == entry_id, "B appends nothing"
        assert await store.redis.xlen(store.keys.inbox(shard)) == 1


async def test_a_dispatch_past_its_deadline_appends_nothing(connect) -> None:
    async with connect(app=app, shards=4) as client:
        store = client.store
        await client.enqueue("jobs", Jobs.ref("late"), Job(tag="late"))
        _, _, item = await store.queue_dispatch("jobs", 60_000, 0, 0, 0, deadline_ms=30_000)
        assert item is not None
        assert await append_item(store, item, time.monotonic() - 1, 60_000) is None
        shard = shard_of(item_target(item.envelope), client.shards)
        assert not await store.redis.exists(store.keys.inbox(shard))
        assert await _markers(client) == [], "no dispatch marker; the client's seen marker is gone"

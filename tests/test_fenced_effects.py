"""Effects outside the commit stay fenced: a paused former owner runs no step, a lease is
never taken over while a step of its shard runs, a fresh acquisition fences leftovers.
Real worker processes and real signals."""

from __future__ import annotations

import asyncio
import collections
import itertools
import signal
import time
from pathlib import Path

import pytest

import actors

from .conftest import eventually
from .fenced_apps import Block, Blocker, Capped, Exit, Hold, Quitter, Steps, TwoSteps, app, open_gate

APP = "tests.fenced_apps:app"
pytestmark = pytest.mark.chaos


def effects(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


async def _owner(client: actors.Client) -> str | None:
    return (await client.store.shard_info(0)).owner


async def test_a_paused_former_owner_runs_no_step_after_it_wakes(spawn_worker, connect, tmp_path) -> None:
    """SIGSTOP between two steps past the lease TTL: the survivor recovers the turn and runs
    step two; on SIGCONT the former owner must not run step two's function again."""
    log = tmp_path / "effects.log"
    old = spawn_worker(APP, "--shards", "1")
    async with connect(app=app, shards=1) as client:
        await eventually(lambda: _owner(client))
        new = spawn_worker(APP, "--shards", "1")
        await client.send(TwoSteps.ref("t"), Steps(gap=1.5))
        await eventually(lambda: any(w[:2] == ["between", "t"] for w in effects(log)))
        old.signal(signal.SIGSTOP)
        await eventually(lambda: _finished(client, "t"), timeout=20)  # the survivor ran it
        survivor = [w for w in effects(log) if w[:3] == ["start", "t", "two"]]
        assert [int(w[3]) for w in survivor] == [new.pid]
        old.signal(signal.SIGCONT)
        await eventually(lambda: "lease" in old.log.read_text(), timeout=10)  # it noticed
        await asyncio.sleep(1.0)  # the thread of a step it wrongly started would have logged by now
        runs = [int(w[3]) for w in effects(log) if w[:3] == ["start", "t", "two"]]
        assert runs == [new.pid], f"step two ran on the fenced owner: {effects(log)}"


async def _finished(client: actors.Client, key: str) -> bool:
    state = await client.state(TwoSteps.ref(key))
    return state is not None and state.done == 1


async def test_a_fresh_acquisition_always_takes_a_new_epoch(connect) -> None:
    """A supervisor that dropped a lease locally (its keeper may still renew it) and then
    acquires it again must not get the same epoch back: leftovers of the old runner would
    not be fenced from the new one."""
    async with connect() as client:
        store = client.store
        first = await store.acquire_lease(0, "w", ttl_ms=10_000)
        second = await store.acquire_lease(0, "w", ttl_ms=10_000)
        assert first is not None and second is not None and second > first
        assert not await store.renew_leases({0: f"w|{first}"}, 10_000) == {0: True}
        assert await store.acquire_lease(0, "other", ttl_ms=10_000) is None


async def test_a_handler_that_raises_cancelled_error_fails_its_turn(start_worker, connect) -> None:
    """A CancelledError the handler raises (not a cancellation of its turn) is a failure
    like any other: retried, dead-lettered, and the actor goes on with its next message."""
    from .fenced_apps import CancelMe

    await start_worker(app)
    async with connect(app=app) as client:
        await client.send(Quitter.ref("c"), CancelMe())
        await client.send(Quitter.ref("c"), Steps())
        state = await eventually(lambda: client.state(Quitter.ref("c")), timeout=20)
        assert state.done == 1
        shard = actors.routing.shard_of("Quitter/c", client.shards)
        [letter] = await client.store.dead_letters(shard, 10)
        assert "CancelledError" in letter.reason


async def test_a_handler_that_calls_sys_exit_fails_its_turn_not_its_worker(spawn_worker, connect) -> None:
    worker = spawn_worker(APP, "--shards", "1")
    async with connect(app=app, shards=1) as client:
        await client.send(Quitter.ref("q"), Exit(code=3))
        await client.send(Quitter.ref("q"), Steps())
        state = await eventually(lambda: client.state(Quitter.ref("q")), timeout=20)
        assert state.done == 1
        [letter] = await client.store.dead_letters(0, 10)
        assert "SystemExit" in letter.reason
    assert worker.proc is not None and worker.proc.poll() is None, "the worker still runs"


def _runs(log: Path, key: str, name: str) -> list[tuple[int, float, float]]:
    """(pid, start, end) of every run of step ``name`` of actor ``key`` that ended."""
    started: dict[int, float] = {}
    runs = []
    for w in effects(log):
        if w[1:3] == [key, name]:
            pid, at = int(w[3]), float(w[4])
            if w[0] == "start":
                started[pid] = at
            elif w[0] == "end":
                runs.append((pid, started.pop(pid), at))
    return runs


def _overlaps(runs: list[tuple[int, float, float]]) -> list[tuple[tuple[int, float, float], ...]]:
    ordered = sorted(runs, key=lambda r: r[1])
    return [(a, b) for a, b in itertools.pairwise(ordered) if b[1] < a[2]]


async def test_a_graceful_hand_over_waits_for_a_running_step(spawn_worker, connect, tmp_path) -> None:
    """A step outlasts the drain grace: the leaving worker abandons the turn, but keeps the
    lease until the step's thread has ended, so the next owner never runs it alongside."""
    log = tmp_path / "effects.log"
    old = spawn_worker(APP, "--shards", "1", "--grace", "0.5")
    async with connect(app=app, shards=1) as client:
        await eventually(lambda: _owner(client))
        new = spawn_worker(APP, "--shards", "1")
        await client.send(TwoSteps.ref("h"), Steps(first=3.0))
        await eventually(lambda: any(w[:3] == ["start", "h", "one"] for w in effects(log)))
        old.signal(signal.SIGTERM)  # drains, abandons the turn after 0.5 s, releases the lease
        await eventually(lambda: _finished(client, "h"), timeout=30)
        runs = _runs(log, "h", "one")
        assert {pid for pid, _, _ in runs} == {old.pid, new.pid}, runs
        assert not _overlaps(runs), f"two runs of one step overlapped: {runs}"
    assert old.stop() == 0


async def test_a_worker_gives_up_its_idle_shards_before_a_busy_one(spawn_worker, connect, tmp_path) -> None:
    log = tmp_path / "effects.log"
    first = spawn_worker(APP, "--shards", "2")
    async with connect(app=app, shards=2) as client:
        await eventually(lambda: _owners(client, 1))
        key = next(f"busy-{n}" for n in range(100) if actors.routing.shard_of(f"TwoSteps/busy-{n}", 2) == 1)
        busy = 1  # the one a worker that gives up its highest-numbered shards first would move
        # Busy until the test has seen the rebalance (a fixed step length could end first on a
        # slow machine, and then shard 1 is idle too).
        await client.send(TwoSteps.ref(key), Steps(first_gate="release"))
        await eventually(lambda: any(w[:3] == ["start", key, "one"] for w in effects(log)))
        second = spawn_worker(APP, "--shards", "2")
        await eventually(lambda: _owners(client, 2))  # rebalanced: one shard each
        owner = (await client.store.shard_info(busy)).owner
        assert owner is not None and f"-{first.pid}-" in owner, "the busy shard stayed"
        assert not any(w[:3] == ["end", key, "one"] for w in effects(log)), "still busy when it moved"
        open_gate(tmp_path, "release")
        await eventually(lambda: _finished(client, key), timeout=20)
        assert [pid for pid, _, _ in _runs(log, key, "one")] == [first.pid], "its step ran once"
        assert second.pid


async def _owners(client: actors.Client, n: int) -> bool:
    owners = [(await client.store.shard_info(s)).owner for s in range(client.shards)]
    return all(owners) and len({o.split("-")[-2] for o in owners if o}) == n


async def test_a_limiter_slot_outlives_a_stalled_event_loop(spawn_worker, connect, tmp_path) -> None:
    """Slots are renewed from the lease keeper's thread: a step holding the only slot of
    ``one`` keeps it while another handler blocks the event loop for several lease TTLs."""
    from actors.limits import Limits

    log = tmp_path / "effects.log"
    spawn_worker(APP, "--shards", "1")
    async with connect(app=app, shards=1) as client:
        await eventually(lambda: _owner(client))
        await client.send(Capped.ref("c"), Hold(seconds=4.0))
        await eventually(lambda: any(w[:3] == ["start", "c", "slot"] for w in effects(log)))
        await client.send(Blocker.ref("b"), Block(seconds=3.0))
        await eventually(lambda: any(w[:2] == ["blocking", "b"] for w in effects(log)))
        limits = Limits(client.store, app.limiters, lease_ms=1000)
        await limits.start()
        try:
            async with limits.hold("one"):
                taken = time.time()
        finally:
            await limits.stop()
        [(_, _, ended)] = await eventually(lambda: _runs(log, "c", "slot"))
        assert taken >= ended, f"the slot was taken {ended - taken:.2f}s before its holder ended"


async def test_a_timed_out_sync_step_keeps_its_slot_until_its_thread_ends(
    spawn_worker, connect, tmp_path
) -> None:
    log = tmp_path / "effects.log"
    spawn_worker(APP, "--shards", "1")
    async with connect(app=app, shards=1) as client:
        for key in ("t1", "t2", "t3"):
            await client.send(Capped.ref(key), Hold(seconds=1.0, timeout=0.2))
        for key in ("t1", "t2", "t3"):
            await eventually(lambda k=key: _done(client, k), timeout=20)
        runs = await eventually(lambda: _ended(log, ("t1", "t2", "t3"), 3))
        assert not _overlaps(runs), f"a cap of one had two steps running at once: {runs}"


def _ended(log: Path, keys: tuple[str, ...], n: int) -> list[tuple[int, float, float]] | None:
    runs = [run for key in keys for run in _runs(log, key, "slot")]
    return runs if len(runs) == n else None


async def _done(client: actors.Client, key: str) -> bool:
    state = await client.state(Capped.ref(key))
    return state is not None and state.done == 1


@pytest.mark.single("a proxy in front of the one server drops a reply")
async def test_a_lost_reply_of_the_timer_script_does_not_strand_a_sleep(
    redis_server, start_worker, namespace
) -> None:
    """The timer script takes a due timer (setting it to 0) and its reply is lost: a retry
    would find nothing due, and the woken turn would sit at 0 until the runner restarted.
    The script runs without automatic retry; the runner restarts and recovers it."""
    from .proxy import reply_dropper
    from .workflow_apps import Nap, Sleeper
    from .workflow_apps import app as workflow_app

    async with reply_dropper(redis_server.port, redis_server.password) as proxy:
        await start_worker(workflow_app, url=proxy.url)
        async with actors.connect(proxy.url, namespace=namespace, app=workflow_app) as client:
            ref = Sleeper.ref("strand")
            await client.send(ref, Nap(seconds=1.0))
            await eventually(lambda: _suspended(client, ref))
            proxy.marker = b"Sleeper/strand"
            await asyncio.wait_for(proxy.dropped.wait(), timeout=10)
            state = await eventually(lambda: _woke(client, ref), timeout=15)
            assert state.woke_at_ms >= state.slept_from_ms + 1000


async def _suspended(client: actors.Client, ref: actors.ActorRef) -> bool:
    return (await client.inspect(ref)).turn is not None


async def _woke(client: actors.Client, ref: actors.ActorRef):  # type: ignore[no-untyped-def]
    state = await client.state(ref)
    return state if state is not None and state.woke_at_ms else None


async def test_a_message_that_kills_its_worker_is_dead_lettered(spawn_worker, connect, tmp_path) -> None:
    """A handler that ends its process (os._exit; a segfault or an OOM kill look the same):
    the runner that recovers its turn counts the start in Redis, and past max_redeliveries
    dead-letters the message. Meanwhile the other actors are handled, and the parent of
    ``--processes`` restarts its children with growing delays."""
    from .fenced_apps import Crash, Crasher

    log = tmp_path / "effects.log"
    parent = spawn_worker(APP, "--shards", "1", "--processes", "2")
    async with connect(app=app, shards=1) as client:
        await eventually(lambda: _owner(client), timeout=20)
        await client.send(Crasher.ref("p"), Crash())
        await client.send(TwoSteps.ref("bystander"), Steps())
        letters = await eventually(lambda: client.store.dead_letters(0, 10), timeout=60)
        assert len(letters) == 1 and "interrupted 3 times" in letters[0].reason, letters
        runs = [w for w in effects(log) if w[:2] == ["crashing", "p"]]
        # Run fresh once (twice if the idle runner's XREAD showed it and the worker died
        # before the commit took it into the group), then recovered 3 times (max_redeliveries).
        assert len(runs) in (4, 5), runs
        await eventually(lambda: _finished(client, "bystander"), timeout=20)
        await client.send(TwoSteps.ref("after"), Steps())
        await eventually(lambda: _finished(client, "after"), timeout=20)
    delays = [float(line.split("restarting it in ")[1].rstrip("s\n"))
              for line in parent.log.read_text().splitlines() if "restarting it in" in line]  # fmt: skip
    # Each of the two child slots doubles its own delay (0.5, 1, 2, ...); their restarts
    # interleave in whatever order the crashes come, so check the multiset: every delay
    # past the first is preceded, in its slot, by half of it.
    counts = collections.Counter(delays)
    assert len(delays) >= 4 and min(delays) == 0.5 and max(delays) > 0.5, delays
    assert all(counts[d] <= counts[d / 2] for d in counts if d > 0.5), delays


async def test_the_children_of_processes_end_with_their_parent(spawn_worker, connect) -> None:
    from .test_chaos import children_of

    parent = spawn_worker(APP, "--shards", "2", "--processes", "2")
    children = await eventually(lambda: len(children_of(parent.pid)) == 2 and children_of(parent.pid))
    async with connect(app=app, shards=2) as client:
        await eventually(lambda: _owners(client, 2), timeout=20)
        parent.signal(signal.SIGKILL)
        await eventually(lambda: not any(_alive(pid) for pid in children), timeout=20)
        infos = [await client.store.shard_info(s) for s in range(2)]
        assert not any(i.owner for i in infos), "they released their shards on the way out"


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


async def test_a_turn_that_never_returns_times_out_and_is_dead_lettered(
    start_worker, connect, fast_settings, monkeypatch, tmp_path
) -> None:
    from .fenced_apps import Hang, ShortHanger

    monkeypatch.setenv("ACTORS_TEST_DIR", str(tmp_path))
    await start_worker(app, fast_settings.model_copy(update={"retry": actors.RetrySettings(max_attempts=2)}))
    async with connect(app=app) as client:
        ref = ShortHanger.ref("h")
        await client.send(ref, Hang())
        await client.send(ref, Steps())
        state = await eventually(lambda: client.state(ref), timeout=20)
        assert state.done == 1, "the next message ran once the hung turn was given up"
        [letter] = await client.store.dead_letters(actors.routing.shard_of(ref.id, client.shards), 10)
        assert "failed 2 times" in letter.reason and "TurnTimeout" in letter.reason, letter.reason


async def test_cancel_ends_a_running_turn(start_worker, connect, tmp_path, monkeypatch) -> None:
    """``actors cancel`` ends a turn that is running (here: one that would never return),
    not only a suspended one; the actor's next message runs."""
    from .fenced_apps import Hang, Hanger

    monkeypatch.setenv("ACTORS_TEST_DIR", str(tmp_path))
    await start_worker(app)
    async with connect(app=app) as client:
        ref = Hanger.ref("c")
        await client.send(ref, Hang())
        await eventually(lambda: any(w[:2] == ["hanging", "c"] for w in effects(tmp_path / "effects.log")))
        await client.cancel(ref)
        await client.send(ref, Steps())
        state = await eventually(lambda: client.state(ref), timeout=20)
        assert state.done == 1
        [letter] = await client.store.dead_letters(actors.routing.shard_of(ref.id, client.shards), 10)
        assert letter.reason == "cancelled"


async def test_steps_run_at_once_are_refused_with_a_clear_error(
    start_worker, connect, monkeypatch, tmp_path
) -> None:
    from .fenced_apps import Racy

    monkeypatch.setenv("ACTORS_TEST_DIR", str(tmp_path))
    await start_worker(app)
    async with connect(app=app) as client:
        ref = Racy.ref("r")
        await client.send(ref, Steps())
        shard = actors.routing.shard_of(ref.id, client.shards)
        [letter] = await eventually(lambda: client.store.dead_letters(shard, 10), timeout=20)
        assert "one at a time" in letter.reason, letter.reason


async def test_a_hung_turn_holds_only_its_actor(
    start_worker, connect, fast_settings, monkeypatch, tmp_path
) -> None:
    """Messages queued behind a turn that never returns must not fill the shard's budget of
    messages in memory (max_inflight), nor pin the inbox's trimming to the hung turn's entry:
    the other actors of the shard go on, and the inbox stays trimmed."""
    from .fenced_apps import Hang, Hanger

    monkeypatch.setenv("ACTORS_TEST_DIR", str(tmp_path))
    settings = fast_settings.model_copy(update={"shards": 1, "max_inflight": 50, "trim_interval": 0.5})
    await start_worker(app, settings)
    async with connect(app=app, shards=1) as client:
        hung = Hanger.ref("stuck")
        await client.send(hung, Hang())
        log = tmp_path / "effects.log"
        await eventually(lambda: any(w[:2] == ["hanging", "stuck"] for w in effects(log)))
        await client.send_many([(hung, Steps()) for _ in range(200)])
        others = [TwoSteps.ref(f"o-{n}") for n in range(100)]
        await client.send_many([(ref, Steps()) for ref in others])
        await eventually(lambda: _all_finished(client, others), timeout=30)
        inbox = client.store.keys.inbox(0)
        await eventually(lambda: _shorter(client, inbox, 50), timeout=20)  # trimmed past the hung turn
        view = await client.inspect(hung)
        assert view.turn is not None and view.deferred == 200, "it waits in Redis, in order"


async def _all_finished(client: actors.Client, refs: list[actors.ActorRef]) -> bool:
    states = await asyncio.gather(*(client.state(ref) for ref in refs))
    return all(s is not None and s.done == 1 for s in states)


async def _shorter(client: actors.Client, stream: str, n: int) -> bool:
    return int(await client.store.redis.xlen(stream)) < n


async def test_turns_waiting_for_asks_do_not_block_their_shard(start_worker, connect, fast_settings) -> None:
    """More orchestrators than max_inflight ask actors of their own shard: a turn waiting for
    a reply does not count toward the budget, so the asked actors' messages are read."""
    from .fenced_apps import Orchestrator

    settings = fast_settings.model_copy(update={"shards": 1, "max_inflight": 20})
    await start_worker(app, settings)
    async with connect(app=app, shards=1) as client:
        refs = [Orchestrator.ref(f"o-{n}") for n in range(60)]
        await client.send_many([(ref, Steps()) for ref in refs])
        await eventually(lambda: _all_finished(client, refs), timeout=30)
        assert not await client.store.dead_letters(0, 10)


async def test_a_handler_that_blocks_the_event_loop_is_named_and_dead_lettered(
    spawn_worker, connect, tmp_path
) -> None:
    """``time.sleep`` in a handler blocks its whole worker: the lease keeper's thread names
    the turn in the log, the worker's shards move past --stall-limit, and each recovered run
    of that turn counts toward max_redeliveries, until the message is dead-lettered."""
    first = spawn_worker(APP, "--shards", "1", "--stall-limit", "1.0")
    async with connect(app=app, shards=1) as client:
        await eventually(lambda: _owner(client))
        second = spawn_worker(APP, "--shards", "1", "--stall-limit", "1.0")
        await client.send(Blocker.ref("b"), Block(seconds=4.0))
        await client.send(TwoSteps.ref("bystander"), Steps())
        [letter] = await eventually(lambda: client.store.dead_letters(0, 10), timeout=90)
        assert "interrupted 3 times" in letter.reason, letter.reason
        await eventually(lambda: _finished(client, "bystander"), timeout=30)
    logs = first.log.read_text() + second.log.read_text()
    assert "blocked in the turn of Blocker/b (Blocker.on_block)" in logs, logs[-3000:]


async def test_a_nested_hold_of_one_limiter_is_already_held(
    start_worker, connect, monkeypatch, tmp_path
) -> None:
    """A turn of a type limited by ``one`` (a cap of 1) whose step uses ``limiter="one"``:
    the step's hold is the turn's own, instead of waiting for itself for ever."""
    from .fenced_apps import Nested

    monkeypatch.setenv("ACTORS_TEST_DIR", str(tmp_path))
    await start_worker(app)
    async with connect(app=app) as client:
        refs = [Nested.ref(f"n-{n}") for n in range(3)]
        await client.send_many([(ref, Steps()) for ref in refs])
        await eventually(lambda: _all_finished(client, refs), timeout=20)
        runs = [run for n in range(3) for run in _runs(tmp_path / "effects.log", f"n-{n}", "nested")]
        assert len(runs) == 3 and not _overlaps(runs), "one at a time: the cap still holds"


async def test_an_async_step_past_its_timeout_is_stopped(
    start_worker, connect, monkeypatch, tmp_path
) -> None:
    """``step(timeout=)`` cancels an async function: the attempt fails with TimeoutError, the
    function does not run on, and the failure is journaled as the step's outcome."""
    from .fenced_apps import Impatient

    monkeypatch.setenv("ACTORS_TEST_DIR", str(tmp_path))
    await start_worker(app)
    async with connect(app=app) as client:
        ref = Impatient.ref("i")
        started = time.monotonic()
        await client.send(ref, Steps())
        state = await eventually(lambda: _errored(client, ref), timeout=20)
        assert state.error == "TimeoutError" and time.monotonic() - started < 15
        log = tmp_path / "effects.log"
        assert [w[0] for w in effects(log) if w[1:3] == ["i", "slow"]] == ["start"], "cancelled, never ended"


async def _errored(client: actors.Client, ref: actors.ActorRef):  # type: ignore[no-untyped-def]
    state = await client.state(ref)
    return state if state is not None and state.error else None

"""SIGTERM drains a worker and hands its shards over at once, not after the lease TTL."""

from __future__ import annotations

import signal
import time

import pytest

import actors

from .apps import Add, Counter, Get, app
from .conftest import eventually

pytestmark = pytest.mark.chaos


async def test_sigterm_hands_shards_over_before_the_ttl(spawn_worker, redis_url, namespace) -> None:
    ttl = ["--shards", "4", "--lease-ttl", "6", "--renew-interval", "0.2"]
    leaving = spawn_worker("tests.apps:app", *ttl)
    staying = spawn_worker("tests.apps:app", *ttl)
    async with actors.connect(redis_url, namespace=namespace, app=app, shards=4) as client:

        async def owners() -> set[str]:
            return {(await client.store.shard_info(s)).owner or "-" for s in range(4)}

        await eventually(lambda: _two_owners(owners))
        await client.send_many((Counter.ref(f"g-{i}"), Add()) for i in range(200))
        started = time.monotonic()
        leaving.signal(signal.SIGTERM)
        await eventually(lambda: _only(owners, staying.pid), timeout=5.5)
        handover = time.monotonic() - started
        assert leaving.proc.wait(10) == 0, "a drained worker exits cleanly"
        assert handover < 6, f"handed over after {handover:.2f}s: the leases were released, not expired"
        totals = [await client.ask(Counter.ref(f"g-{i}"), Get(), timeout=10) for i in range(200)]
        assert all(t.total == 1 for t in totals)


async def _two_owners(owners) -> bool:
    held = await owners()
    return "-" not in held and len(held) == 2


async def _only(owners, pid: int) -> bool:
    held = await owners()
    return len(held) == 1 and f"-{pid}-" in next(iter(held))


async def test_sigterm_lets_in_flight_turns_finish_on_the_leaving_worker(
    spawn_worker, connect, tmp_path
) -> None:
    """A turn in the middle of its steps when SIGTERM comes finishes where it runs (within
    --grace): the survivor runs none of its steps again."""
    from .fenced_apps import Steps, TwoSteps
    from .fenced_apps import app as fenced_app
    from .test_fenced_effects import effects

    log = tmp_path / "effects.log"
    leaving = spawn_worker("tests.fenced_apps:app", "--shards", "1", "--grace", "20")
    async with connect(app=fenced_app, shards=1) as client:
        await eventually(lambda: _owned(client))
        staying = spawn_worker("tests.fenced_apps:app", "--shards", "1")
        refs = [TwoSteps.ref(f"f-{n}") for n in range(5)]
        await client.send_many([(ref, Steps(first=1.0, second=0.5)) for ref in refs])
        await eventually(lambda: len([w for w in effects(log) if w[0] == "start"]) == 5)
        leaving.signal(signal.SIGTERM)
        assert leaving.proc.wait(20) == 0  # type: ignore[union-attr]
        for ref in refs:
            state = await eventually(lambda r=ref: client.state(r), timeout=20)
            assert state.done == 1
        runs = [(w[0], w[2], int(w[3])) for w in effects(log) if w[0] in ("start", "end")]
        assert {pid for _, _, pid in runs} == {leaving.pid}, f"the survivor ran steps again: {runs}"
        assert len([r for r in runs if r[0] == "end" and r[1] == "two"]) == 5, "both steps, once each"
        assert staying.pid


async def test_the_grace_cuts_a_drain_short_and_the_survivor_resumes_the_turn(
    spawn_worker, connect, tmp_path
) -> None:
    """A turn that outlasts --grace (here: plain code waiting in the handler, no step running)
    is abandoned when the grace is over; the lease is released then, and the survivor resumes
    the turn from its journal (step one is not run again)."""
    from .fenced_apps import Steps, TwoSteps
    from .fenced_apps import app as fenced_app
    from .test_fenced_effects import effects

    log = tmp_path / "effects.log"
    leaving = spawn_worker("tests.fenced_apps:app", "--shards", "1", "--grace", "0.5")
    async with connect(app=fenced_app, shards=1) as client:
        await eventually(lambda: _owned(client))
        staying = spawn_worker("tests.fenced_apps:app", "--shards", "1")
        await client.send(TwoSteps.ref("slow"), Steps(gap=3600))
        await eventually(lambda: any(w[:2] == ["between", "slow"] for w in effects(log)))
        started = time.monotonic()
        leaving.signal(signal.SIGTERM)
        assert leaving.proc.wait(20) == 0  # type: ignore[union-attr]
        resumed = await eventually(
            lambda: [w for w in effects(log) if w[:2] == ["between", "slow"] and int(w[3]) == staying.pid],
            timeout=20,
        )
        assert resumed and time.monotonic() - started < 20, "resumed long before the hour was up"
        ones = [w for w in effects(log) if w[:3] == ["start", "slow", "one"]]
        assert [int(w[3]) for w in ones] == [leaving.pid], "step one was journaled: not run again"


async def _owned(client: actors.Client) -> bool:
    return (await client.store.shard_info(0)).owner is not None

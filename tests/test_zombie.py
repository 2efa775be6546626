"""A worker SIGSTOPped mid-turn past its lease TTL (a zombie) cannot commit when it wakes."""

from __future__ import annotations

import asyncio
import signal

import pytest
from pydantic import BaseModel

import actors
from actors.routing import shard_of

from .apps import Counter, Nap, app
from .conftest import eventually

pytestmark = pytest.mark.chaos


async def test_a_stopped_worker_is_taken_over_and_applies_nothing_when_it_wakes(
    spawn_worker, redis_url, namespace
) -> None:
    """End to end, with real signals: a SIGSTOPped owner's shards move past the TTL, the
    survivor handles its messages once, and the woken former owner notices its lease is gone
    (by its lease keeper, its lease deadline, or the commit fence, whichever comes first;
    ``test_a_commit_after_the_lease_moved_is_refused`` forces the last one)."""
    zombie = spawn_worker("tests.apps:app", "--shards", "4")
    async with actors.connect(redis_url, namespace=namespace, app=app, shards=4) as client:

        async def owners() -> dict[int, str]:
            infos = [await client.store.shard_info(s) for s in range(4)]
            return {i.shard: i.owner for i in infos if i.owner}

        await eventually(lambda: _count(owners, 4))
        survivor = spawn_worker("tests.apps:app", "--shards", "4")
        await eventually(lambda: _split(owners))  # rebalanced over both processes
        mine = {s for s, owner in (await owners()).items() if f"-{zombie.pid}-" in owner}
        assert mine
        keys = [k for k in (f"z-{n}" for n in range(200)) if shard_of(f"Counter/{k}", 4) in mine][:20]

        for key in keys:
            await client.send(Counter.ref(key), Nap(seconds=0.6))
        await asyncio.sleep(0.3)  # the zombie is now inside those handlers
        zombie.signal(signal.SIGSTOP)
        await eventually(
            lambda: _taken_over(owners, mine, survivor.pid), timeout=10
        )  # survivors lease its shards after the TTL
        await eventually(lambda: _totals(client, keys, 1), timeout=20)
        zombie.signal(signal.SIGCONT)  # it finishes its handlers and tries to commit
        await asyncio.sleep(1.5)

        for key in keys:
            state = await client.state(Counter.ref(key))
            assert state.total == 1, "the zombie's commit was refused: no second effect"
            assert len(state.epochs) == 1 and state.epochs[0] >= 2, "committed only under the new epoch"
    zombie.stop()
    log = zombie.log.read_text()
    assert "lost the lease" in log or "lease lost" in log, log[-3000:]


async def _count(owners, n: int) -> bool:
    return len(await owners()) == n


async def _split(owners) -> bool:
    held = await owners()
    return len(held) == 4 and len({o.split("-")[-2] for o in held.values()}) == 2


async def _taken_over(owners, shards: set[int], pid: int) -> bool:
    held = await owners()
    return all(f"-{pid}-" in held.get(s, "") for s in shards)


async def _totals(client, keys: list[str], total: int) -> bool:
    states = [await client.state(Counter.ref(k)) for k in keys]
    return all(s is not None and s.total == total for s in states)


class Charge(BaseModel):
    order: str


_started: list[str] = []
_charged: list[str] = []


def _charge(order: str) -> str:
    _charged.append(order)
    return f"charged {order}"


class Payment(actors.Actor):
    async def on_charge(self, msg: Charge) -> None:
        _started.append(msg.order)
        await self.step(_charge, msg.order)


async def test_a_former_owner_runs_no_step_for_a_message_it_only_saw(
    start_worker, connect, fast_settings
) -> None:
    """A runner starts a turn as soon as XREAD shows its message, before the fenced commit
    takes it. A runner whose lease moved on without its noticing (its supervisor has not
    ticked yet) must then not run the turn's step: it waits for the take, which is refused."""
    _started.clear()
    _charged.clear()
    settings = fast_settings.model_copy(
        update={"shards": 1, "block_ms": 30_000, "lease": actors.LeaseSettings(ttl=60, renew_interval=30)}
    )
    worker = await start_worker(actors.App(Payment), settings)
    async with connect(app=actors.App(Payment), shards=1) as client:
        store = client.store
        await eventually(lambda: worker.runners)
        await asyncio.sleep(0.2)  # its runner now blocks on XREAD
        await store.redis.delete(store.keys.lease(0))
        epoch = await store.acquire_lease(0, "thief", ttl_ms=60_000)
        assert epoch is not None

        await client.send(Payment.ref("o-1"), Charge(order="o-1"))
        await eventually(lambda: _started == ["o-1"], timeout=5)  # the turn did start
        await eventually(lambda: not worker.runners, timeout=5)  # and its runner stopped
        assert _charged == [], "the step's function never ran on the former owner"
        # The message is still the group's next entry: the new owner reads it.
        fresh, _ = await store.read_new(0, f"thief|{epoch}", "thief", 10)
        assert len(fresh) == 1


class Enter(BaseModel):
    pass


_inside = asyncio.Event()
_release = asyncio.Event()


class Gated(actors.Actor):
    """Its turn waits, inside the handler, until the test lets it go on."""

    class State(BaseModel):
        total: int = 0

    async def on_enter(self, msg: Enter) -> None:
        _inside.set()
        await _release.wait()
        self.state.total += 1


async def test_a_commit_after_the_lease_moved_is_refused(
    start_worker, connect, fast_settings, caplog, monkeypatch
) -> None:
    """The commit fence alone: the lease moves to another owner while a turn runs, and the
    runner has no way to notice before its commit (renewals 30 s apart, a lease deadline a
    minute away). The commit is refused: nothing is written, the message stays pending for
    the new owner, and the runner stops. Without the fence the state would change."""
    import actors.shard.timers

    _inside.clear()
    _release.clear()
    # Nor may the timer loop, a fenced script too, look in the meantime: only the commit can notice.
    monkeypatch.setattr(actors.shard.timers, "TIMER_POLL_MAX", 3600.0)
    settings = fast_settings.model_copy(
        update={"shards": 1, "block_ms": 30_000, "lease": actors.LeaseSettings(ttl=60, renew_interval=30)}
    )
    worker = await start_worker(actors.App(Gated), settings)
    async with connect(app=actors.App(Gated), shards=1) as client:
        store = client.store
        # The timer loop has taken its first look (a fenced script) and now sleeps.
        await eventually(lambda: worker.runners and worker.runners[0].timers.polled)
        await client.send(Gated.ref("g"), Enter())
        await asyncio.wait_for(_inside.wait(), timeout=10)
        await store.redis.delete(store.keys.lease(0))
        epoch = await store.acquire_lease(0, "thief", ttl_ms=60_000)
        assert epoch is not None
        _release.set()
        await eventually(lambda: not worker.runners, timeout=10)  # the runner stopped
        assert await client.state(Gated.ref("g")) is None, "the refused commit wrote nothing"
        claimed = await store.claim_pending(0, "thief", 10)
        fresh, _ = await store.read_new(0, f"thief|{epoch}", "thief", 10)
        assert len(claimed) + len(fresh) == 1, "the message waits for the new owner"
    assert "commit refused" in caplog.text, caplog.text[-2000:]

"""Membership and shard leases: who runs which shard, and the epoch that fences it.

Every ``renew_interval`` the supervisor heartbeats, renews the leases it
holds, and moves toward its share of the shards (``share``: the live workers,
sorted, each hold shards // workers, the first shards % workers one more): it
gives up its extras (after draining them) and takes free shards while it holds
fewer than its share. It also ticks at once when told on ``ns:lease-events``
that a lease was released or a worker joined or is leaving, and tells the others
when it joins and leaves, so a change of membership moves shards in a hand-over's
time, not a tick's. A lease it cannot renew is lost at once; if Redis cannot be
reached for a whole lease TTL, every lease is treated as lost. A LeaseKeeper
thread does the renewing while ``run`` runs, so a busy event loop does not lose
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable

from .lease import Lease
from .settings import LeaseSettings
from .store import STALL_TIMEOUT, LeaseKeeper, Store, is_transient

log = logging.getLogger("actors.supervisor")

SUBSCRIBE_WAIT = 1.0
"""Seconds a starting supervisor waits for its subscription to ``ns:lease-events`` before its
first heartbeat (a worker that joins just after must be heard, or seen by that heartbeat)."""

ACQUIRE_BATCH = 256
"""Shards tried per round trip when taking free ones."""

OnAcquired = Callable[[Lease], None]
OnLost = Callable[[int], None]
OnRelease = Callable[[int], Awaitable[list[str]]]
"""Drains a shard; returns the inbox entries it leaves that no one started (handed over)."""


class Supervisor:
    def __init__(
        self,
        store: Store,
        worker_id: str,
        shards: int,
        settings: LeaseSettings,
        on_acquired: OnAcquired,
        on_lost: OnLost,
        on_release: OnRelease,
        info: Callable[[], dict[str, str]] | None = None,
        slots: Callable[[], list[tuple[str, str]]] = list,
        load: Callable[[int], int] = lambda shard: 0,
        describe: Callable[[], str] = str,
    ) -> None:
        self.store = store
        self.worker_id = worker_id
        self.shards = shards
        self.settings = settings
        self.held: dict[int, Lease] = {}
        self._releasing: set[int] = set()
        self._released = asyncio.Event()
        self._release_tasks: set[asyncio.Task[None]] = set()
        self._on_acquired = on_acquired
        self._on_lost = on_lost
        self._on_release = on_release
        self._ttl_ms = int(settings.ttl * 1000)
        self._info = {"host": socket.gethostname(), "pid": str(os.getpid()), "started": str(time.time())}
        self._more_info = info
        self._slots = slots
        """Limiter slots (limiter, holder) this process holds: renewed with the leases."""
        self._load = load
        self._describe = describe
        """What this event loop runs now (called from the LeaseKeeper's thread)."""
        """Work in flight on a shard: a worker gives up its idlest shards first."""
        """Fields added to the worker's info hash at every heartbeat (e.g. limiter waiters)."""
        self._alive = time.monotonic()
        """When this event loop last ran (the LeaseKeeper renews only while it is recent)."""
        self._keeper: LeaseKeeper | None = None
        """While ``run`` runs: the thread that renews the leases (the tick then does not)."""
        self._live: list[str] | None = None
        """The live workers (sorted) as of the last heartbeat, and the joins and leaves heard since."""
        self._beaten = 0.0
        """When (monotonic) the tick last heartbeat."""
        self.last_tick: float | None = None
        """When (monotonic) a tick last succeeded: heartbeat, renewals, acquisitions (health probes)."""

    async def run(self, stop: asyncio.Event, ready: Callable[[], object] = lambda: None) -> None:
        """Join (listen to ``ns:lease-events``, then the first tick, whose error ends ``run``),
        call ``ready``, and keep leases until ``stop`` is set; then release them all (after
        draining)."""
        subscribed = asyncio.Event()
        listener = asyncio.create_task(self._listen_for_events(subscribed), name="lease-events")
        try:
            with contextlib.suppress(TimeoutError):  # then the ticks alone see the others
                await asyncio.wait_for(subscribed.wait(), SUBSCRIBE_WAIT)
            await self.tick()
        except BaseException:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
            raise
        ready()
        self._keeper = self._new_keeper()
        if self._keeper is not None:
            self._keeper.start()
        self._beat()
        try:
            try:
                await self._loop(stop)
            finally:
                listener.cancel()
                await asyncio.gather(listener, return_exceptions=True)
            await self.release_all()
        finally:
            self._beat_handle.cancel()
            if self._keeper is not None:
                await asyncio.to_thread(self._keeper.stop)
                self._keeper = None

    def _beat(self) -> None:
        """Note every ``renew_interval`` that this event loop runs (for the LeaseKeeper)."""
        self._alive = time.monotonic()
        self._beat_handle = asyncio.get_running_loop().call_later(self.settings.renew_interval, self._beat)

    def _new_keeper(self) -> LeaseKeeper | None:
        """The thread that renews the leases while this loop is busy (see LeaseKeeper)."""
        loop = asyncio.get_running_loop()
        s = self.settings
        return self.store.lease_keeper(
            self.worker_id, self._ttl_ms, s.renew_interval, s.stall_limit,
            leases=lambda: dict(self.held),
            alive=lambda: self._alive,
            lost=lambda lost: loop.call_soon_threadsafe(self._lost_elsewhere, lost),
            slots=self._slots, describe=self._describe,
        )  # fmt: skip

    def _lost_elsewhere(self, lost: dict[int, Lease]) -> None:
        """Leases the keeper could not renew, unless they changed meanwhile (released)."""
        self._lose([s for s, lease in lost.items() if self.held.get(s) is lease])

    async def _loop(self, stop: asyncio.Event) -> None:
        last_ok = time.monotonic()
        delay = self.settings.renew_interval
        told = False
        while not stop.is_set():
            # Cleared before the tick, not after: a release heard during the tick wakes the next one.
            self._released.clear()
            try:
                async with asyncio.timeout(STALL_TIMEOUT):  # a server that stopped answering
                    # Told of a release (or a join or leave): act on the membership known, and
                    # heartbeat only if the last is old (the keeper renews the membership).
                    await self.tick(heartbeat=not told or time.monotonic() - self._beaten > delay)
                last_ok = time.monotonic()
                delay = self.settings.renew_interval
            except Exception as exc:
                if not is_transient(exc):
                    log.exception("supervisor tick failed")
                if time.monotonic() - last_ok > self.settings.ttl and (expired := self._expired()):
                    log.warning(
                        "Redis unreachable for a whole lease TTL: dropping %d shards whose leases were not "
                        "renewed", len(expired),
                    )  # fmt: skip
                    self._lose(expired)
                delay = min(delay * 2, self.settings.ttl / 2)
            told = await self._sleep(stop, delay) and self._keeper is not None

    def _expired(self) -> list[int]:
        """Held shards whose leases may be gone: not renewed for a whole TTL. On one server
        that is every shard once Redis is unreachable; on a cluster only those whose lease
        lives on a primary that is down (the LeaseKeeper renews the others meanwhile)."""
        return [shard for shard, lease in self.held.items() if lease.remaining() < 0]

    async def _sleep(self, stop: asyncio.Event, delay: float) -> bool:
        """Until the next tick: ``delay``, or sooner if stopping or told of an event; returns
        whether it was told."""
        waits = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._released.wait())}
        try:
            await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        return self._released.is_set()

    async def _listen_for_events(self, subscribed: asyncio.Event) -> None:
        """Hear every worker's releases, joins and leaves on ``ns:lease-events``."""
        await self.store.listen(self.store.keys.lease_events(), self._heard, subscribed)

    def _heard(self, event: bytes) -> None:
        """A worker joined (``joined ID``) or is leaving (``leaving ID``): count it in or out
        now, and give up any surplus at once (on a busy event loop every round trip of a tick
        is slow); or a lease was released (``released N``). Either way, wake the tick."""
        kind, _, worker = event.decode(errors="replace").partition(" ")
        if self._live is not None and worker != self.worker_id:
            if kind == "joined" and worker not in self._live:
                self._live = sorted([*self._live, worker])
                self._shed()
            elif kind == "leaving":
                self._live = [w for w in self._live if w != worker]
        self._released.set()

    async def tick(self, heartbeat: bool = True) -> None:
        """Heartbeat (unless told not to: the membership known is recent), then move toward
        this worker's share: give up the surplus, or take free shards."""
        if heartbeat or self._live is None:
            info = self._info if self._more_info is None else {**self._info, **self._more_info()}
            self._live, joined = await self.store.heartbeat(self.worker_id, self._ttl_ms, info)
            self._beaten = time.monotonic()
            if joined:  # the others move toward their new share now, not at their next tick
                await self.store.announce(f"joined {self.worker_id}")
            await self._renew()
        wanted = self._shed()
        if wanted > 0 and not self._releasing:
            await self._acquire(wanted)
        self.last_tick = time.monotonic()

    def _shed(self) -> int:
        """Start releasing what this worker holds beyond its share; returns how many more it
        should hold (negative: how many it releases)."""
        assert self._live is not None
        keeping = [s for s in self.held if s not in self._releasing]
        extra = len(keeping) - share(self.shards, self._live, self.worker_id)
        # The idlest first: a shard with work in flight is the last one given up.
        for shard in sorted(keeping, key=lambda s: (self._load(s), -s))[: max(0, extra)]:
            self._start_release(shard)
        return -extra

    async def _renew(self) -> None:
        """Renew every held lease, draining ones included (a drain may outlast a TTL), unless
        the LeaseKeeper thread does it."""
        if self._keeper is not None:
            return
        held = dict(self.held)
        if held:
            sent = time.monotonic()
            values = {shard: lease.value for shard, lease in held.items()}
            renewed = await self.store.renew_leases(values, self._ttl_ms)
            for shard, ok in renewed.items():
                if ok:
                    held[shard].renewed(sent)
            self._lose([s for s, ok in renewed.items() if not ok and self.held.get(s) is held[s]])
        slots = self._slots()
        if slots:
            await self.store.limiter_renew(slots, self._ttl_ms)

    def _start_release(self, shard: int) -> None:
        """Drain and release in the background, so renewals go on meanwhile."""
        log.info("releasing shard %s", shard)
        self._releasing.add(shard)
        task = asyncio.create_task(self._release(shard), name=f"release-{shard}")
        self._release_tasks.add(task)
        task.add_done_callback(self._release_tasks.discard)

    async def _acquire(self, wanted: int) -> None:
        """Take up to ``wanted`` of the shards no one holds: one round trip to see which are
        free, then at most ``ACQUIRE_BATCH`` per round trip (a busy event loop makes each round
        trip slow). The runners of the shards taken start once the last round trip has
        returned: thousands starting meanwhile would hold up the rest of the tick (and, in the
        first, the renewals, which start after it)."""
        others = [s for s in range(self.shards) if s not in self.held]
        free = await self.store.takeable(others, self.worker_id)
        random.shuffle(free)  # workers starting together should not all try shard 0 first
        acquired: list[Lease] = []
        try:
            while wanted > 0 and free:
                tried, free = free[: min(wanted, ACQUIRE_BATCH)], free[min(wanted, ACQUIRE_BATCH) :]
                sent = time.monotonic()
                taken = await self.store.acquire_leases(tried, self.worker_id, self._ttl_ms)
                for shard, epoch in taken.items():
                    lease = Lease.taken(shard, self.worker_id, epoch, self.settings.ttl, sent)
                    self.held[shard] = lease
                    acquired.append(lease)
                    wanted -= 1
                    log.info("acquired shard %s at epoch %s", shard, epoch)
        finally:
            for lease in acquired:
                self._on_acquired(lease)

    async def _release(self, shard: int) -> None:
        try:
            fresh = await self._on_release(shard)
            lease = self.held.pop(shard, None)
            if lease is not None:
                await self.store.release_lease(shard, lease.value, fresh)
                log.info(
                    "released shard %s (epoch %s), %d never-started entries handed over",
                    shard,
                    lease.epoch,
                    len(fresh),
                )
        except Exception as exc:
            if not is_transient(exc):
                log.exception("releasing shard %s failed", shard)
        finally:
            self._releasing.discard(shard)

    def lose(self, lease: Lease) -> None:
        """A runner found ``lease`` gone (a fenced script refused it, or its deadline passed):
        stop renewing it, unless it was replaced meanwhile. If Redis still holds it, the next
        acquisition takes it afresh, at a new epoch."""
        if self.held.get(lease.shard) is lease:
            self._lose([lease.shard])

    def _lose(self, shards: list[int]) -> None:
        for shard in shards:
            lease = self.held.pop(shard, None)
            if lease is not None:
                log.warning("lost the lease on shard %s (epoch %s)", shard, lease.epoch)
                self._on_lost(shard)

    async def release_all(self) -> None:
        """Graceful exit: leave the membership first (the others count this worker out of
        their shares, and take each shard as soon as it is released), then drain every shard
        (renewing meanwhile) and release it."""
        try:
            await self.store.leave(self.worker_id, info=False)
            await self.store.announce(f"leaving {self.worker_id}")
        except Exception as exc:  # they see it go when its membership expires
            if not is_transient(exc):
                raise
        for shard in list(self.held):
            if shard not in self._releasing:
                self._start_release(shard)
        while self._release_tasks:
            await asyncio.wait(set(self._release_tasks), timeout=self.settings.renew_interval)
            try:
                await self._renew()
            except Exception as exc:
                if not is_transient(exc):
                    raise
        try:
            await self.store.leave(self.worker_id)
        except Exception as exc:
            if not is_transient(exc):
                raise


def share(shards: int, live: list[str], worker_id: str) -> int:
    """How many shards ``worker_id`` should hold: ``shards // workers``, one more for the
    first ``shards % workers`` of the live workers sorted by id. Every worker computes the
    same split, so the shards end evenly spread (16 over 3: 6, 5, 5, never 6, 6, 4)."""
    members = live if worker_id in live else sorted([*live, worker_id])
    low, more = divmod(shards, len(members))
    return low + (1 if members.index(worker_id) < more else 0)

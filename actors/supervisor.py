"""Membership and shard leases: who runs which shard, and the epoch that fences it.

Every ``renew_interval`` the supervisor heartbeats, renews the leases it
holds, and moves toward an even share of the shards over the live workers:
it gives up its extras (after draining them) and takes free shards while it
holds fewer than its share. A lease it cannot renew is lost at once; if Redis
cannot be reached for a whole lease TTL, every lease is treated as lost. A
LeaseKeeper thread does the renewing while ``run`` runs, so a busy event loop
does not lose them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable

from .lease import Lease
from .settings import LeaseSettings
from .store import STALL_TIMEOUT, LeaseKeeper, Store, is_transient

log = logging.getLogger("actors.supervisor")

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
        self.last_tick: float | None = None
        """When (monotonic) a tick last succeeded: heartbeat, renewals, acquisitions (health probes)."""

    async def run(self, stop: asyncio.Event) -> None:
        """Keep leases until ``stop`` is set; then release them all (after draining)."""
        listener = asyncio.create_task(self._listen_for_releases(), name="lease-events")
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
        while not stop.is_set():
            # Cleared before the tick, not after: a release heard during the tick wakes the next one.
            self._released.clear()
            try:
                async with asyncio.timeout(STALL_TIMEOUT):  # a server that stopped answering
                    await self.tick()
                last_ok = time.monotonic()
                delay = self.settings.renew_interval
            except Exception as exc:
                if not is_transient(exc):
                    log.exception("supervisor tick failed")
                if time.monotonic() - last_ok > self.settings.ttl and self.held:
                    log.warning("Redis unreachable for a whole lease TTL: dropping %d shards", len(self.held))
                    self._lose(list(self.held))
                delay = min(delay * 2, self.settings.ttl / 2)
            await self._sleep(stop, delay)

    async def _sleep(self, stop: asyncio.Event, delay: float) -> None:
        """Until the next tick: ``delay``, or sooner if stopping or a lease was released."""
        waits = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._released.wait())}
        try:
            await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def _listen_for_releases(self) -> None:
        """Wake the tick when any worker releases a lease (graceful hand-over in one round trip)."""
        await self.store.listen(self.store.keys.lease_events(), lambda _: self._released.set())

    async def tick(self) -> None:
        info = self._info if self._more_info is None else {**self._info, **self._more_info()}
        live = await self.store.heartbeat(self.worker_id, self._ttl_ms, info)
        await self._renew()
        share = math.ceil(self.shards / max(1, len(live)))
        keeping = [s for s in self.held if s not in self._releasing]
        extra = len(keeping) - share
        if extra > 0:
            # The idlest first: a shard with work in flight is the last one given up.
            for shard in sorted(keeping, key=lambda s: (self._load(s), -s))[:extra]:
                self._start_release(shard)
        elif extra < 0 and not self._releasing:
            await self._acquire(-extra)
        self.last_tick = time.monotonic()

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
        """Try free shards, ``wanted`` at a time (at most ``ACQUIRE_BATCH`` per round trip),
        until ``wanted`` are taken or none is left to try. The runners of the shards taken
        start once the last round trip has returned: thousands starting meanwhile would hold
        up the rest of the tick (and, in the first, the renewals, which start after it)."""
        free = [s for s in range(self.shards) if s not in self.held]
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
        """Graceful exit: drain every shard (renewing meanwhile), release, leave membership."""
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

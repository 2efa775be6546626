"""One owned shard: its parts wired together, in the order a message goes through them.

1. ``Mailbox`` reads the inbox in order (claiming a previous owner's pending entries
   first) and checks each entry; ``Timers`` takes due timers and fires schedules.
2. ``Work`` does each actor's work one piece at a time, in order.
3. ``Turns`` runs a turn's handler; ``Journaling`` writes its journal (the TurnHost).
4. ``Commits`` applies every write of the shard in one fenced script at a time, and
5. forwards the committed cross-shard messages to their shards.

Any Redis error or lost lease ends the runner; its owner (the worker) drops every
activation and starts afresh from what Redis holds, so memory never runs ahead of a commit.
"""

from __future__ import annotations

import asyncio
import time

from ..journal import RedisClock
from ..lease import Lease
from ..settings import WorkerSettings
from ..turn import TurnServices
from .commits import Commits
from .flow import Flow
from .journaling import Journaling
from .mailbox import Mailbox
from .retention import Retention
from .state import Activation
from .timers import Timers
from .turns import Turns
from .work import Work


class ShardRunner:
    def __init__(self, lease: Lease, consumer: str, services: TurnServices, settings: WorkerSettings) -> None:
        self.lease = lease
        self.shard = lease.shard
        self.consumer = consumer
        self.services = services
        self.store = services.store
        self.settings = settings
        self.clock = RedisClock()
        self.activations: dict[str, Activation] = {}
        self.stopping = asyncio.Event()
        """Set when draining begins: read nothing new, finish what was read."""
        self.handed_over: list[str] = []
        """Inbox entries a drain left to the next owner that no one started (released with the
        lease, so the next owner takes them as fresh messages, not as interrupted turns)."""
        self.flow = Flow(settings.max_inflight)
        self.commits = Commits(self)
        self.mailbox = Mailbox(self)
        self.timers = Timers(self)
        self.work = Work(self)
        self.turns = Turns(self)
        self.journaling = Journaling(self)
        self.retention = Retention(self)
        self._failure: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def inflight(self) -> int:
        return self.flow.inflight

    @property
    def lag(self) -> int:
        return self.mailbox.lag

    async def run(self) -> None:
        """Run until cancelled, drained, or an error (which propagates)."""
        tasks = self.work.tasks
        try:
            await self._sync_clock()
            async with asyncio.TaskGroup() as tg:
                helpers = [
                    tg.create_task(self.commits.commit_loop(), name=f"commit-{self.shard}"),
                    tg.create_task(self.commits.forward_loop(), name=f"forward-{self.shard}"),
                    tg.create_task(self._watch_failure(), name=f"actors-{self.shard}"),
                    tg.create_task(self.turns.watch(), name=f"turns-{self.shard}"),
                ]
                timers = tg.create_task(self.timers.timer_loop(), name=f"timers-{self.shard}")
                schedules = tg.create_task(self.timers.schedule_loop(), name=f"schedules-{self.shard}")
                await self.mailbox.read_loop()
                await timers
                await schedules
                await self.flow.idle.wait()
                while tasks:  # resumed turns and deferred messages finish too
                    await asyncio.wait(set(tasks))
                for task in helpers:
                    task.cancel()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def drain(self) -> int:
        """Stop reading and starting turns; ``run`` returns once the turns in progress have
        ended. Messages read ahead and not started are left to the next owner in Redis (see
        ``Work.release_queued``); returns how many."""
        if self.stopping.is_set():
            return 0
        self.stopping.set()
        self.timers.wakeup.set()
        self.mailbox.stop_reading()
        return self.work.release_queued()

    async def forgive_running(self) -> None:
        """A graceful hand-over gives up the turns still running (see ``Turns.forgive_running``)."""
        await self.turns.forgive_running()

    def fail(self, exc: BaseException) -> None:
        """End the runner with ``exc`` (its owner decides what follows)."""
        if not self._failure.done():
            self._failure.set_exception(exc)

    async def _watch_failure(self) -> None:
        """Turn a failed actor task or a lost lease into the runner's failure."""
        await self._failure

    async def _sync_clock(self) -> None:
        sent = time.monotonic()
        now = await self.store.server_time_ms()
        self.clock.observe(now, sent, time.monotonic())

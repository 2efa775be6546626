"""A held shard lease as this process knows it: its fencing epoch, how long it surely lasts,
and the step functions of its shard that are running now.

Redis expires a lease ``ttl`` after the renewal that it last applied. A renewal sent at
monotonic time ``t`` was applied after ``t``, so the lease surely lasts until ``t + ttl``:
that is the local *deadline*, moved on by every confirmed renewal (from the LeaseKeeper
thread or the supervisor's tick). A runner starts no effect outside its commit (a step's
function, an ask, an enqueue, a limiter hold, a forward) unless the deadline is at least a
margin away, whatever path its turn came from; a process that was paused past it finds the
deadline gone when it wakes, before its first effect.

Both threads touch these objects: the keeper moves the deadline and reads the running
steps; the event loop reads the deadline and counts steps in and out (a step function run
in a thread counts itself out from that thread, so a stalled event loop cannot keep it
counted). Simple attribute reads and writes are atomic in CPython; the step counter takes a
lock.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


class StepsInFlight:
    """How many step functions of one shard are executing now.

    While one runs, the shard's lease is renewed even if the event loop is stalled, and a
    graceful hand-over does not release it: a new owner must not run the same step while
    this one still does.
    """

    __slots__ = ("_lock", "_running")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0

    def enter(self) -> None:
        with self._lock:
            self._running += 1

    def leave(self) -> None:
        with self._lock:
            self._running -= 1

    @property
    def running(self) -> int:
        return self._running


@dataclass(slots=True, eq=False)
class Lease:
    shard: int
    epoch: int
    value: str
    """``<worker id>|<epoch>``, what the fenced scripts compare."""
    ttl: float
    deadline: float
    """Monotonic time until which Redis surely keeps this lease (see the module docstring)."""
    steps: StepsInFlight = field(default_factory=StepsInFlight)

    @classmethod
    def taken(cls, shard: int, worker_id: str, epoch: int, ttl: float, sent: float) -> Lease:
        """A lease acquired by a call sent at monotonic time ``sent``."""
        return cls(shard, epoch, f"{worker_id}|{epoch}", ttl, sent + ttl)

    def renewed(self, sent: float) -> None:
        """A renewal sent at monotonic time ``sent`` was applied."""
        self.deadline = max(self.deadline, sent + self.ttl)

    def remaining(self) -> float:
        """Seconds the lease surely lasts from now (negative once it may be gone)."""
        return self.deadline - time.monotonic()

"""What a namespace's durability level adds to a write that tells someone it happened.

``everysec`` adds nothing. ``fsync`` adds ``WAITAOF 1 0 <timeout>`` and ``replica``
``WAIT 1 <timeout>``, each sent in one pipeline right after the write, on the write's own
connection: both wait for the writes of the connection they run on (its last write's
replication offset), so on another connection they would wait for nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio.client import Pipeline

from ..errors import DurabilityTimeout

EVERYSEC, FSYNC, REPLICA = "everysec", "fsync", "replica"


@dataclass(frozen=True, slots=True)
class Acknowledgment:
    level: str = EVERYSEC
    timeout_ms: int = 5_000

    @property
    def waits(self) -> bool:
        """Whether a write waits for more than the server's reply (not with ``everysec``)."""
        return self.level != EVERYSEC

    @property
    def wait_seconds(self) -> float:
        """How long a write may wait for the level at most (0: it does not wait)."""
        return self.timeout_ms / 1000 if self.waits else 0.0

    def queue(self, pipe: Pipeline, node: object = None) -> None:
        """Queue the command that waits for the level, after the pipeline's writes; ``node``:
        the cluster node it must run on (that of the writes)."""
        target = {} if node is None else {"target_nodes": node}
        if self.level == FSYNC:
            pipe.execute_command("WAITAOF", 1, 0, self.timeout_ms, **target)
        elif self.level == REPLICA:
            pipe.execute_command("WAIT", 1, self.timeout_ms, **target)

    def check(self, reply: Any) -> None:
        """Raise DurabilityTimeout unless ``reply`` (of the queued command) says the level holds."""
        if isinstance(reply, BaseException):
            raise reply
        if self.level == FSYNC and int(reply[0]) < 1:
            raise DurabilityTimeout(
                f"the server did not fsync its AOF within {self.timeout_ms} ms (WAITAOF 1 0: {list(reply)}); "
                "the write was applied, its durability is unknown"
            )
        if self.level == REPLICA and int(reply) < 1:
            raise DurabilityTimeout(
                f"no replica acknowledged the write within {self.timeout_ms} ms (WAIT 1: {reply} replicas; "
                "is one connected?); the write was applied, its durability is unknown"
            )

"""One owned shard, its data path split by role, in reading order: ``mailbox`` (read, take,
claim, trim, check), ``work`` (each actor's work in order), ``turns`` (a turn's attempts),
``journaling`` (what a turn writes: the TurnHost), ``commits`` (the commit loop and
forwarding), ``timers`` (timers and schedules); ``runner`` wires them."""

from .runner import ShardRunner
from .state import ShardReset

__all__ = ["ShardReset", "ShardRunner"]

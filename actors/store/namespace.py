"""Which app each worker of a namespace serves (``ns:apps``): written by a worker as it starts,
read by the next one to start (``actors.sharing`` decides whether they may share) and by
``actors doctor``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import cast

from .connection import StoreBase, honours_cancel

START_GRACE_MS = 60_000
"""A record whose worker is not (or not yet) a live member counts this long after it was
written: a worker writes its record before its first heartbeat makes it a member."""


@dataclass(frozen=True, slots=True)
class AppRecord:
    """What a worker serves: its app's name, its actor types, the runtime's version, and when
    it wrote the record (ms, Redis clock)."""

    app: str
    types: tuple[str, ...]
    version: str
    at_ms: int = 0

    def encode(self) -> bytes:
        shown = {"app": self.app, "types": list(self.types), "version": self.version, "at": self.at_ms}
        return json.dumps(shown, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> AppRecord | None:
        """None for a field that is not a record this version understands."""
        try:
            shown = json.loads(raw)
            return cls(str(shown["app"]), tuple(str(t) for t in shown["types"]), str(shown["version"]),
                       int(shown["at"]))  # fmt: skip
        except (ValueError, TypeError, KeyError):
            return None


@honours_cancel
class NamespaceStore(StoreBase):
    async def claim_app(self, worker_id: str, record: AppRecord) -> dict[str, AppRecord]:
        """Write this worker's record, then return the records of the namespace's other
        workers that are live, or started less than ``START_GRACE_MS`` ago. The others'
        records (their workers died) are deleted.

        The write comes before the read: of two workers starting at once, at least the
        second to read sees the first."""
        now = await self.server_time_ms()
        stamped = AppRecord(record.app, record.types, record.version, now)
        await self.redis.hset(self.keys.apps(), worker_id, stamped.encode())
        records, live = await self._records_and_members(now)
        others: dict[str, AppRecord] = {}
        dead: list[str] = []
        for other, found in records.items():
            if other == worker_id:
                continue
            if other in live or (found is not None and now - found.at_ms < START_GRACE_MS):
                if found is not None:
                    others[other] = found
            else:
                dead.append(other)
        if dead:
            await self.redis.hdel(self.keys.apps(), *dead)
        return others

    async def release_app(self, worker_id: str) -> None:
        await self.redis.hdel(self.keys.apps(), worker_id)

    async def live_apps(self) -> tuple[list[str], dict[str, AppRecord]]:
        """The live workers (sorted), and the records of those that wrote one."""
        now = await self.server_time_ms()
        records, live = await self._records_and_members(now)
        return sorted(live), {w: r for w, r in records.items() if w in live and r is not None}

    async def _records_and_members(self, now: int) -> tuple[dict[str, AppRecord | None], set[str]]:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.apps())
            pipe.zrangebyscore(self.keys.workers(), now, "+inf")
            raw, members = await pipe.execute()
        records = {k.decode(): AppRecord.decode(v) for k, v in cast("dict[bytes, bytes]", raw).items()}
        return records, {m.decode() for m in cast("list[bytes]", members)}

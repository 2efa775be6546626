"""Limiters and their queues: slots, tokens, queued items."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from ..codec import FIELD
from .connection import StoreBase, honours_cancel
from .records import QUEUED, RELEASED, Dispatch, OutItem, StreamRows, out_item


@honours_cancel
class LimitStore(StoreBase):
    async def limiter_acquire(
        self, name: str, holder: str, lease_ms: int, cap: int, interval_ms: float, tolerance_ms: float
    ) -> tuple[bool, int, int]:
        """Take a slot and reserve a rate token; returns (granted, wait ms, Redis now ms).

        Not granted: every slot is held; the wait is until the earliest slot lease expires.
        """
        k = self.keys
        granted, wait, now = await self._run(
            "limiter_acquire",
            [k.limiter_slots(name), k.limiter_tat(name)],
            [holder, lease_ms, cap, interval_ms, tolerance_ms],
        )
        return bool(granted), int(wait), int(now)

    async def limiter_release(self, name: str, holder: str) -> bool:
        k = self.keys
        return bool(
            await self._run(
                "limiter_release", [k.limiter_slots(name)], [holder, k.limiter_events(), f"{RELEASED}{name}"]
            )
        )

    async def limiter_renew(self, held: Sequence[tuple[str, str]], lease_ms: int) -> None:
        """Extend the leases of held slots, (limiter, holder) pairs, in one round trip."""
        now = await self.server_time_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            for name, holder in held:
                pipe.zadd(self.keys.limiter_slots(name), {holder: now + lease_ms}, xx=True)
            await pipe.execute()

    async def declare_limiters(self, definitions: dict[str, str]) -> dict[str, str]:
        """Record limiter definitions (JSON) not recorded yet; returns every recorded one."""
        key = self.keys.limiters()
        async with self.redis.pipeline(transaction=False) as pipe:
            for name, definition in definitions.items():
                pipe.hsetnx(key, name, definition)
            pipe.hgetall(key)
            *_, recorded = await pipe.execute()
        return {n.decode(): d.decode() for n, d in recorded.items()}

    async def queue_enqueue(
        self, name: str, item_id: str, shard: int, envelope: bytes, dedup_id: str, partition: str,
        priority: int, dedup_ttl_ms: int, seen_ttl_ms: int,
    ) -> tuple[bool, str]:  # fmt: skip
        """Queue an item; returns (True, item id), or (False, id of the item holding ``dedup_id``).

        An item id queued before (within ``seen_ttl_ms``) is not queued again: a turn that
        re-runs its journaled ``enqueue`` after the item was dispatched queues nothing."""
        k = self.keys
        keys = [k.queue(name, p) for p in ("items", "ready", "vtimes", "last_rounds", "counts")]
        keys.append(k.queue(name, f"dedup:{dedup_id}") if dedup_id else keys[0])
        keys.append(k.queue_seen(name, item_id))
        args = [
            item_id,
            shard,
            envelope,
            dedup_id,
            partition,
            priority,
            dedup_ttl_ms,
            k.limiter_events(),
            f"{QUEUED}{name}",
            seen_ttl_ms,
        ]
        queued, holder = await self._run_acknowledged("queue_enqueue", keys, args)
        return bool(queued), holder.decode()

    async def queue_dispatch(
        self, name: str, lease_ms: int, cap: int, interval_ms: float, tolerance_ms: float, deadline_ms: int
    ) -> tuple[int, int, Dispatch | None]:
        """Take the next queued item with a slot and a token: (1, wait ms, the item to append),
        (0, ms until a slot lease expires, None) if every slot is held, (2, 0, None) if empty.
        The dispatch lapses ``deadline_ms`` after the wait (``Dispatch.deadline_ms``)."""
        k = self.keys
        keys = [k.limiter_slots(name), k.limiter_tat(name)]
        parts = ("items", "ready", "dispatching", "vtimes", "last_rounds", "counts")
        keys += [k.queue(name, p) for p in parts]
        reply = await self._run(
            "queue_dispatch", keys, [lease_ms, cap, interval_ms, tolerance_ms, deadline_ms]
        )
        status = int(reply[0])
        if status != 1:
            return status, int(reply[1]) if status == 0 else 0, None
        return 1, int(reply[1]), Dispatch(reply[2].decode(), int(reply[3]), bytes(reply[4]), int(reply[5]))

    async def queue_dispatched(
        self, name: str, item_id: str, entry_id: str = "", actor_id: str = "", check_ms: int = 0,
        deadline_ms: int = 0,
    ) -> int:  # fmt: skip
        """The item is in its actor's inbox (at ``entry_id``, '' if unknown): it leaves the
        queue (its slot and dedup id stay). One with a dedup id is recorded in ``out``, its
        first look at its shard due in ``check_ms`` (``queue_checks``).

        Returns how long (ms) another dispatch of the item than the caller's (whose deadline
        was ``deadline_ms``; 0: unknown) may still append it: 0 if none may; -1 if the item
        was confirmed before (then the caller knows nothing about the others)."""
        parts = ("items", "ready", "dispatching", "counts", "last_rounds", "out", "checks")
        keys = [self.keys.queue(name, p) for p in parts]
        args = [item_id, entry_id, actor_id, check_ms, deadline_ms or ""]
        return int(await self._run("queue_dispatched", keys, args))

    async def queue_done(self, items: Sequence[tuple[str, str, str]]) -> None:
        """(limiter, item id, dedup id) of queued items whose turns ended, in one round trip."""
        k = self.keys
        script = self._scripts["queue_done"]
        async with self._script_pipeline() as pipe:
            for name, item_id, dedup_id in items:
                slots = k.limiter_slots(name)
                dedup = k.queue(name, f"dedup:{dedup_id}") if dedup_id else slots
                args = [item_id, "1" if dedup_id else "", k.limiter_events(), f"{RELEASED}{name}"]
                keys = [slots, dedup, k.queue(name, "out"), k.queue(name, "checks")]
                await script(keys=keys, args=args, client=pipe)
            await pipe.execute()

    async def queue_depths(self, name: str) -> tuple[dict[str, int], int]:
        """Queued items by partition, and items being dispatched."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.queue(name, "counts"))
            pipe.zcard(self.keys.queue(name, "dispatching"))
            counts, dispatching = await pipe.execute()
        return {p.decode(): int(n) for p, n in counts.items()}, int(dispatching)

    async def limiter_holders(self, name: str) -> int:
        """How many slots of the limiter are held now (leases not expired)."""
        now = await self.server_time_ms()
        return int(await self.redis.zcount(self.keys.limiter_slots(name), now, "+inf"))

    async def queue_checks(self, name: str, interval_ms: int, limit: int) -> list[OutItem]:
        """Claim up to ``limit`` dispatched items due for a look at their shards; the next
        look at each is then ``interval_ms`` on."""
        keys = [self.keys.queue(name, "out"), self.keys.queue(name, "checks")]
        reply = await self._run("queue_checks", keys, [interval_ms, limit])
        return [out_item(reply[i].decode(), reply[i + 1]) for i in range(0, len(reply), 2)]

    async def queue_out_item(self, name: str, item_id: str) -> OutItem | None:
        """The ``out`` record of a dispatched item with a dedup id (None: none)."""
        record = cast("bytes | None", await self.redis.hget(self.keys.queue(name, "out"), item_id))
        return None if record is None else out_item(item_id, record)

    async def items_alive(self, items: Sequence[OutItem]) -> list[bool]:
        """Per dispatched item: whether its shard still holds it (``item_alive.lua``), in one
        round trip. Each look is one script on one shard's keys."""
        k = self.keys
        script = self._scripts["item_alive"]
        async with self._script_pipeline() as pipe:
            for item in items:
                keys = [k.inbox(item.shard), k.turns(item.shard), k.deferred(item.shard, item.actor_id),
                        k.journal(item.shard, item.actor_id)]  # fmt: skip
                await script(keys=keys, args=[item.entry_id, item.actor_id, item.envelope], client=pipe)
            return [bool(alive) for alive in await pipe.execute()]

    async def find_entry(self, shard: int, envelope: bytes, page: int = 500) -> str:
        """The id of the inbox entry holding ``envelope`` ('' if the inbox no longer holds it:
        trimmed, so delivered and no longer pending). Reads the whole inbox: only for a queued
        item whose append was confirmed by no one (its dispatcher died right after it)."""
        start = "-"
        while True:
            found = await self.redis.xrange(self.keys.inbox(shard), start, "+", count=page)
            rows = cast("StreamRows", found)
            for entry_id, fields in rows:
                if fields.get(FIELD) == envelope:
                    return entry_id.decode()
            if len(rows) < page:
                return ""
            start = "(" + rows[-1][0].decode()

"""Fencing at the commit: a worker whose lease moved on cannot write anything."""

from __future__ import annotations

import pytest

from actors import LeaseLost
from actors.codec import Envelope, encode_envelope
from actors.journal import OpenTurn, Record
from actors.keys import GROUP
from actors.store import DONE, DUPLICATE, Write


async def test_commit_with_a_stale_epoch_is_refused_and_writes_nothing(connect) -> None:
    async with connect() as client:
        store = client.store
        shard = 0
        first = await store.acquire_lease(shard, "old", ttl_ms=200)
        assert first is not None
        raw = encode_envelope(Envelope("m1", "Counter", "k", "Add", {"by": 1}), 1 << 20)
        await store.append(shard, raw)
        [(entry_id, _)], _ = await store.read_new(shard, f"old|{first}", "old", 10)

        # The old owner pauses past its TTL; a new owner takes the shard at a higher epoch.
        await store.redis.delete(store.keys.lease(shard))
        second = await store.acquire_lease(shard, "new", ttl_ms=10_000)
        assert second == first + 1
        record = Write("c", "Counter/k", "i", entry_id, b"\x81\xa5total\x01", [raw], [(1, raw)])
        with pytest.raises(LeaseLost):
            await store.commit(shard, f"old|{first}", [record], reply_ttl_ms=1000)
        await store.append(shard, raw)
        with pytest.raises(LeaseLost):  # nor can it take new entries into its pending list
            await store.read_new(shard, f"old|{first}", "old", 10)

        assert await store.load_state(shard, "Counter/k") is None
        assert await store.redis.xlen(store.keys.outbox(shard)) == 0
        pending = await store.redis.xpending(store.keys.inbox(shard), GROUP)
        assert pending["pending"] == 1, "the entry stays pending for the new owner"

        # The new owner claims and commits it; a second commit of the same entry is a duplicate.
        claimed = await store.claim_pending(shard, "new", 10)
        assert [e for e, _ in claimed] == [entry_id]
        fresh, _ = await store.read_new(shard, f"new|{second}", "new", 10)
        assert len(fresh) == 1
        assert await store.commit(shard, f"new|{second}", [record], 1000) == [DONE]
        assert await store.commit(shard, f"new|{second}", [record], 1000) == [DUPLICATE]
        assert await store.load_state(shard, "Counter/k") == b"\x81\xa5total\x01"
        assert await store.redis.xlen(store.keys.outbox(shard)) == 1, "sent once, not twice"


async def test_a_journal_write_retried_after_it_was_applied_writes_nothing_twice(connect) -> None:
    """redis-py retries a script after a lost reply: the retry must be recognised."""
    async with connect() as client:
        store = client.store
        shard = 0
        epoch = await store.acquire_lease(shard, "w", ttl_ms=10_000)
        lease = f"w|{epoch}"
        raw = encode_envelope(Envelope("m1", "Counter", "k", "Add", {"by": 1}), 1 << 20)
        await store.append(shard, raw)
        [(entry_id, _)], _ = await store.read_new(shard, lease, "w", 10)
        sent = encode_envelope(Envelope("m2", "Counter", "other", "Add", {"by": 1}), 1 << 20)

        def journal(origin: str, ref: str, write: int) -> Write:
            turn = OpenTurn(raw, [Record("send", "Counter/other:Add", None)], write=write).encode()
            return Write("j", "Counter/k", origin, ref, remote=[(1, sent)], open_turn=turn)

        opening = journal("i", entry_id, 1)
        assert await store.commit(shard, lease, [opening], 1000) == [DONE]
        assert await store.commit(shard, lease, [opening], 1000) == [DUPLICATE]
        progress = journal("o", "1", 2)
        assert await store.commit(shard, lease, [progress], 1000) == [DONE]
        assert await store.commit(shard, lease, [progress], 1000) == [DUPLICATE]
        assert await store.redis.xlen(store.keys.outbox(shard)) == 2, "each write's send once"
        closing = Write("c", "Counter/k", "o", "2", b"\x81\xa5total\x01")
        assert await store.commit(shard, lease, [closing], 1000) == [DONE]
        assert await store.commit(shard, lease, [closing], 1000) == [DUPLICATE]
        assert await store.redis.hlen(store.keys.turns(shard)) == 0

"""Fencing at the commit: a worker whose lease moved on cannot write anything."""

from __future__ import annotations

import pytest

from actors import LeaseLost
from actors.codec import Envelope, encode_envelope
from actors.errors import Diverged
from actors.journal import OpenTurn, Record, encode_record
from actors.keys import GROUP
from actors.store import DONE, DUPLICATE, Take, Write


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

        record = encode_record(Record("send", "Counter/other:Add", None))

        def journal(origin: str, ref: str, write: int, keep: int, items: list[bytes]) -> Write:
            turn = OpenTurn(raw, [], write=write).header()
            return Write("j", "Counter/k", origin, ref, remote=[(1, sent)], open_turn=turn,
                         journal_keep=keep, journal_items=items)  # fmt: skip

        opening = journal("i", entry_id, 1, 0, [raw, record])
        assert await store.commit(shard, lease, [opening], 1000) == [DONE]
        assert await store.commit(shard, lease, [opening], 1000) == [DUPLICATE]
        progress = journal("o", "1", 2, 2, [record])
        assert await store.commit(shard, lease, [progress], 1000) == [DONE]
        assert await store.commit(shard, lease, [progress], 1000) == [DUPLICATE]
        assert await store.redis.xlen(store.keys.outbox(shard)) == 2, "each write's send once"
        journal_key = store.keys.journal(shard, "Counter/k")
        assert await store.redis.lrange(journal_key, 0, -1) == [raw, record, record], "appended once"
        closing = Write("c", "Counter/k", "o", "2", b"\x81\xa5total\x01")
        assert await store.commit(shard, lease, [closing], 1000) == [DONE]
        assert await store.commit(shard, lease, [closing], 1000) == [DUPLICATE]
        assert await store.redis.hlen(store.keys.turns(shard)) == 0
        assert not await store.redis.exists(journal_key), "the journal closes with its turn"


async def test_entries_seen_with_xread_are_taken_by_the_fenced_commit(connect) -> None:
    """A runner dispatches what a plain XREAD (the inbox reader's) shows; its next commit takes those entries
    into the group first. With a stale lease nothing is taken or written; if the entries
    are not the next ones, the commit writes nothing (what it took stays pending)."""
    async with connect() as client:
        store = client.store
        shard = 0
        first_epoch = await store.acquire_lease(shard, "old", ttl_ms=10_000)
        raws = [
            encode_envelope(Envelope(f"m{i}", "Counter", "k", "Add", {"by": 1}), 1 << 20) for i in range(3)
        ]
        for raw in raws[:2]:
            await store.append(shard, raw)
        reader = store.inbox_reader(10, block_ms=100)
        try:
            seen = await reader.open(shard).read_after("0-0")
        finally:
            await reader.close()
        assert [e for _, e in seen] == raws[:2]
        (first, _), (second, _) = seen
        commit = Write("c", "Counter/k", "i", first, b"\x81\xa5total\x01")

        # The lease moved on: the former owner can neither take the entries nor write.
        await store.redis.delete(store.keys.lease(shard))
        epoch = await store.acquire_lease(shard, "new", ttl_ms=10_000)
        with pytest.raises(LeaseLost):
            await store.commit(shard, f"old|{first_epoch}", [commit], 1000, Take("old", second, 2))
        assert (await store.redis.xpending(store.keys.inbox(shard), GROUP))["pending"] == 0

        # The owner takes both and commits the first in one script; the second stays pending.
        lease = f"new|{epoch}"
        assert await store.commit(shard, lease, [commit], 1000, Take("new", second, 2)) == [DONE]
        assert await _pending(store, shard) == [(second, b"new")]
        assert await store.load_state(shard, "Counter/k") == b"\x81\xa5total\x01"

        # A retry of that commit (its reply lost) finds nothing left to take: refused whole.
        other = Write("c", "Counter/k", "i", second, b"\x81\xa5total\x02")
        with pytest.raises(Diverged):
            await store.commit(shard, lease, [other], 1000, Take("new", second, 2))
        # Entries that are not the ones seen: refused, nothing written.
        await store.append(shard, raws[2])
        with pytest.raises(Diverged):
            await store.commit(shard, lease, [other], 1000, Take("new", second, 1))
        assert await store.load_state(shard, "Counter/k") == b"\x81\xa5total\x01"
        # What the refused take delivered is pending, so the restarted runner claims it.
        claimed = await store.claim_pending(shard, "new", 10)
        assert [e for _, e in claimed] == raws[1:]


async def _pending(store, shard: int) -> list[tuple[str, bytes]]:
    rows = await store.redis.xpending_range(store.keys.inbox(shard), GROUP, "-", "+", 10)
    return [(row["message_id"].decode(), row["consumer"]) for row in rows]

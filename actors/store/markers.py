"""Idempotency markers whose protection has ended: deleted, or kept only as long as still needed."""

from __future__ import annotations

from collections.abc import Sequence

from ..keys import hash_tag
from .connection import StoreBase, honours_cancel


@honours_cancel
class MarkerStore(StoreBase):
    async def forget_markers(self, markers: Sequence[tuple[str, int]]) -> None:
        """(key, ms it must still live) pairs, in one round trip: a key with 0 ms is deleted
        (those of one hash tag by one UNLINK, so each command stays in one cluster slot), any
        other's life is cut to its ms. Deleting or shortening a key twice does no harm, so a
        retry after a lost reply is safe."""
        doomed: dict[str, list[str]] = {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, keep_ms in markers:
                if keep_ms > 0:
                    pipe.pexpire(key, keep_ms)
                else:
                    doomed.setdefault(hash_tag(key), []).append(key)
            for keys in doomed.values():
                # As a command, not pipe.unlink: a cluster pipeline's unlink is a coroutine
                # that splits keys by slot instead of a queued command.
                pipe.execute_command("UNLINK", *keys)
            await pipe.execute()

"""Waiting for the replies to ``ask``: one pub/sub subscription per process.

The committing script both stores a reply under a key with a TTL and
publishes it on the asker's channel. The channel is the fast path; the key
covers a subscription that dropped for a moment and a re-sent (deduplicated)
ask whose first reply went to another channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any

from .codec import REJECTION, Reply, decode_envelope, decode_reply
from .errors import AskTimeout, DecodeError, HandlerError, Rejected
from .store import Store, is_transient

log = logging.getLogger("actors.replies")


class ReplyListener:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.client_id = uuid.uuid4().hex
        self.channel = store.keys.reply_channel(self.client_id)
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="actors-replies")
        await self._ready.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for fut in self._waiting.values():
            fut.cancel()

    async def request(
        self,
        shard: int,
        message_id: str,
        data: bytes,
        idempotency_key: str | None,
        ttl_ms: int,
        timeout: float,
        *,
        digest: str = "",
    ) -> Reply:
        """Append an ask to ``shard``'s inbox and wait for its reply.

        With an idempotency key already accepted for the target actor, nothing is
        appended and the reply awaited is the first message's; with a ``digest``
        (``codec.message_digest``) that differs from the first message's, IdempotencyConflict.
        No digest (a turn's asks, keyed by their deterministic message id): the first
        message wins, as a re-run turn may build its ask's payload anew (a fresh uuid, a time).
        """
        fut = self.expect(message_id)
        wait_id = message_id
        try:
            if idempotency_key is None:
                await self.store.append(shard, data)
            else:
                # The envelope names the target, the key's scope (the caller may be a turn,
                # which passes only the encoded envelope).
                target = decode_envelope(data).actor_id
                appended, first_id = await self.store.append_once(
                    shard, target, idempotency_key, message_id, data, ttl_ms, digest=digest
                )
                if not appended:
                    self.forget(message_id)
                    wait_id = first_id
                    fut = self.expect(wait_id)
        except BaseException:
            self.forget(message_id)
            raise
        return await self.wait(shard, wait_id, fut, timeout)

    def expect(self, message_id: str) -> asyncio.Future[Reply]:
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[message_id] = fut
        return fut

    def forget(self, message_id: str) -> None:
        self._waiting.pop(message_id, None)

    async def wait(self, shard: int, message_id: str, fut: asyncio.Future[Reply], timeout: float) -> Reply:
        """Wait for ``fut``; before giving up, look for a stored reply once more."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        return await asyncio.wait_for(asyncio.shield(fut), timeout=1.0)
                    except TimeoutError:
                        stored = await self._stored(shard, message_id)
                        if stored is not None:
                            return stored
        except TimeoutError:
            stored = await self._stored(shard, message_id)
            if stored is not None:
                return stored
            raise AskTimeout(f"no reply to message {message_id} within {timeout}s") from None
        finally:
            self.forget(message_id)

    async def _stored(self, shard: int, message_id: str) -> Reply | None:
        try:
            raw = await self.store.get_reply(shard, message_id)
        except Exception as exc:
            if not is_transient(exc):
                raise
            return None
        return None if raw is None else decode_reply(raw)

    async def _listen(self) -> None:
        await self.store.listen(self.channel, self._deliver, self._ready)

    def _deliver(self, data: bytes) -> None:
        try:
            reply = decode_reply(data)
        except DecodeError:
            log.warning("dropped an undecodable reply")
            return
        fut = self._waiting.pop(reply.message_id, None)
        if fut is not None and not fut.done():
            fut.set_result(reply)


def reply_value(reply: Reply, cls: Any, message_type: str) -> Any:
    """Turn a Reply into the handler's return value, or raise its error (Rejected for a
    rejection, else HandlerError)."""
    if not reply.ok:
        if reply.type == REJECTION:
            raise Rejected(reply.error, reply.payload)
        raise HandlerError(reply.error, reply.detail)
    if reply.payload is None:
        return None
    if cls is not None:
        handler = cls.handlers.get(message_type)
        if handler is not None and handler.reply is not None:
            return handler.reply.model_validate(reply.payload)
    return reply.payload

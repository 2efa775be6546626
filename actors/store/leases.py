"""Membership, shard leases and the thread that renews them."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import redis
from redis.exceptions import NoScriptError, ResponseError
from redis.typing import EncodableT, FieldT

from ..errors import ConfigurationError
from ..keys import Keys
from ..lease import Lease
from ..settings import MAX_SHARDS, check_shard_count
from .connection import StoreBase, honours_cancel, script_text

log = logging.getLogger("actors.store")

HANDOVER_TTL_MS = 60_000
"""How long the entries a graceful drain handed over as never started are kept for the next
owner (who takes them at once): a shard no one takes within this counts them as recovered."""
LOOP_LAG_WARNING = 1.0
"""Seconds beyond a renew interval that the event loop may not run before it is reported."""


@honours_cancel
class LeaseStore(StoreBase):
    async def shard_count(self, wanted: int | None, default: int | None) -> int:
        """The namespace's shard count, recording ``wanted`` (or ``default``) if none is yet.

        Raises ConfigurationError if ``wanted`` differs from the record, or if
        nothing is recorded and there is nothing to record.
        """
        meta = self.keys.meta()
        proposal = wanted if wanted is not None else default
        if proposal is not None:
            await self.redis.hsetnx(meta, "shards", proposal)
        raw = await self.redis.hget(meta, "shards")
        if raw is None:
            raise ConfigurationError(
                f"namespace {self.keys.namespace!r} has no shard count yet: no worker or client has used "
                "it (is the namespace right?)"
            )
        recorded = _recorded_count(raw, self.keys.namespace)
        if wanted is not None and recorded != wanted:
            raise ConfigurationError(
                f"Redis records {recorded} shards for namespace {self.keys.namespace!r}, "
                f"but this process is configured with {wanted}; use --shards {recorded} "
                "(the shard count of a namespace cannot change)"
            )
        return recorded

    async def heartbeat(self, worker_id: str, ttl_ms: int, info: dict[str, str]) -> list[str]:
        """Refresh this worker's membership; returns every live worker id (sorted)."""
        now = await self.server_time_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(self.keys.workers(), {worker_id: now + ttl_ms})
            pipe.zremrangebyscore(self.keys.workers(), "-inf", now)
            # redis-py's Mapping[FieldT, ...] is invariant in its key, so dict[str, str] needs the cast.
            pipe.hset(self.keys.worker_info(worker_id), mapping=cast("Mapping[FieldT, EncodableT]", info))
            pipe.pexpire(self.keys.worker_info(worker_id), ttl_ms)
            pipe.zrangebyscore(self.keys.workers(), now, "+inf")
            *_, live = await pipe.execute()
        return sorted(i.decode() for i in live)

    async def leave(self, worker_id: str) -> None:
        await self.redis.zrem(self.keys.workers(), worker_id)
        await self.redis.delete(self.keys.worker_info(worker_id))

    async def worker_infos(self, worker_ids: Sequence[str]) -> list[dict[str, str]]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for worker_id in worker_ids:
                pipe.hgetall(self.keys.worker_info(worker_id))
            infos = await pipe.execute()
        return [{k.decode(): v.decode() for k, v in info.items()} for info in infos]

    async def live_workers(self) -> list[str]:
        now = await self.server_time_ms()
        ids = cast("list[bytes]", await self.redis.zrangebyscore(self.keys.workers(), now, "+inf"))
        return sorted(i.decode() for i in ids)

    async def acquire_lease(self, shard: int, worker_id: str, ttl_ms: int) -> int | None:
        k = self.keys
        epoch = await self._run(
            "acquire_lease", [k.lease(shard), k.epoch(shard), k.inbox(shard)], [worker_id, ttl_ms]
        )
        return None if int(epoch) < 0 else int(epoch)

    async def acquire_leases(self, shards: Sequence[int], worker_id: str, ttl_ms: int) -> dict[int, int]:
        """``acquire_lease`` for many shards in one round trip (a worker taking thousands at
        start must not hold up its heartbeat behind as many round trips); returns shard ->
        epoch of those taken."""
        k = self.keys
        script = self._scripts["acquire_lease"]
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in shards:
                keys = [k.lease(shard), k.epoch(shard), k.inbox(shard)]
                await script(keys=keys, args=[worker_id, ttl_ms], client=pipe)
            epochs = await pipe.execute()
        return {shard: int(e) for shard, e in zip(shards, epochs, strict=True) if int(e) >= 0}

    async def renew_leases(self, leases: dict[int, str], ttl_ms: int) -> dict[int, bool]:
        """Renew many leases in one round trip; returns shard -> still held."""
        shards = list(leases)
        script = self._scripts["renew_lease"]
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in shards:
                await script(keys=[self.keys.lease(shard)], args=[leases[shard], ttl_ms], client=pipe)
            results = await pipe.execute()
        return {shard: bool(r) for shard, r in zip(shards, results, strict=True)}

    async def release_lease(self, shard: int, lease: str, fresh: Sequence[str] = ()) -> bool:
        """Give the lease up, naming the entries its runner took and never started (``fresh``)."""
        keys = [self.keys.lease(shard), self.keys.handover(shard)]
        released = bool(await self._run("release_lease", keys, [lease, HANDOVER_TTL_MS, *fresh]))
        if released:
            try:
                await self.redis.publish(self.keys.lease_events(), str(shard))
            except ResponseError as exc:  # e.g. an ACL without the channel: the lease is released
                # all the same; the other supervisors see the free shard at their next tick.
                log.warning("could not announce the release of shard %s: %s", shard, exc)
        return released

    async def take_handover(self, shard: int) -> set[str]:
        """The entries the last owner handed over as never started, once: the set is deleted
        (a runner that restarts later counts them as it would any claimed entry)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.smembers(self.keys.handover(shard))
            pipe.delete(self.keys.handover(shard))
            members, _ = await pipe.execute()
        return {m.decode() for m in members}

    def lease_keeper(self, worker_id: str, ttl_ms: int, interval: float, stall_limit: float,
                     leases: Callable[[], dict[int, Lease]], alive: Callable[[], float],
                     lost: Callable[[dict[int, Lease]], object],
                     slots: Callable[[], list[tuple[str, str]]] = list,
                     describe: Callable[[], str] = str) -> LeaseKeeper | None:  # fmt: skip
        """A LeaseKeeper for this store's server and namespace (None if its URL is unknown)."""
        if self.url is None:
            return None
        return LeaseKeeper(self.url, self.keys, worker_id, ttl_ms, interval, stall_limit,
                           leases, alive, lost, slots, describe)  # fmt: skip


class LeaseKeeper:
    """Renews a worker's leases, membership and limiter slots from a thread with a client of
    its own.

    A burst of turns can keep a worker's event loop from running for longer than a
    lease's TTL (a loop iteration runs every ready turn); its leases would then expire
    and its shards move for nothing. This thread renews them meanwhile, but only while
    the loop still shows progress (``alive()``, a monotonic time, within
    ``stall_limit`` seconds): a loop stuck for longer lets them expire, and its shards
    move, except a shard whose step function is still executing (a new owner would run
    it again alongside). Limiter slots are renewed for as long as they are held, whatever
    the loop does: a slot lasts exactly as long as the code that holds it. Each renewed
    lease's deadline moves on (``Lease.renewed``). It never acquires or releases; ``lost``
    is called (on this thread) with the leases it found lost.
    """

    def __init__(self, url: str, keys: Keys, worker_id: str, ttl_ms: int, interval: float, stall_limit: float,
                 leases: Callable[[], dict[int, Lease]], alive: Callable[[], float],
                 lost: Callable[[dict[int, Lease]], object],
                 slots: Callable[[], list[tuple[str, str]]] = list,
                 describe: Callable[[], str] = str) -> None:  # fmt: skip
        # A blocking client: the thread has no event loop. Its timeout bounds a stuck server.
        self._redis = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=ttl_ms / 1000)
        self._renew = self._redis.register_script(script_text("renew_lease"))
        self._packed: dict[int, tuple[str, bytes]] = {}
        """Shard -> (lease value, its renewal packed)."""
        self._keys, self._worker_id, self._ttl_ms = keys, worker_id, ttl_ms
        self._interval, self._stall_limit = interval, stall_limit
        self._leases, self._alive, self._lost, self._slots = leases, alive, lost, slots
        self._describe = describe
        self._warned = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing (blocks until the thread ends: call it off the event loop)."""
        self._stop.set()
        self._thread.join()
        self._redis.close()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._watch_loop()
            stalled = time.monotonic() - self._alive() > self._stall_limit
            leases = self._leases()
            if stalled:  # the loop is stuck: let its leases expire, unless a step still runs
                leases = {shard: lease for shard, lease in leases.items() if lease.steps.running}
            try:
                self._keep(leases, self._slots(), membership=not stalled)
            except redis.RedisError as exc:  # the loop's own tick sees and reports Redis trouble
                log.debug("lease keeper: %r", exc)
            except Exception:  # the thread must outlive any surprise; the loop's tick renews too
                log.exception("lease keeper")

    def _watch_loop(self) -> None:
        """Say, once per stall, that the event loop has not run for a while, and in which
        turn: a handler that blocks it (``time.sleep``, CPU-bound work) stalls every turn
        of the process, and past ``stall_limit`` its shards move (and its turn, recovered
        elsewhere, counts toward ``max_redeliveries``)."""
        lag = time.monotonic() - self._alive()
        if lag <= self._interval + LOOP_LAG_WARNING:
            self._warned = False
        elif not self._warned:
            self._warned = True
            where = self._describe() or "no turn (the runtime itself, or a step's callback)"
            log.warning(
                "the event loop has not run for %.1fs; it is blocked in %s (past %ss its shards move)",
                lag, where, self._stall_limit,
            )  # fmt: skip

    def _keep(self, leases: dict[int, Lease], slots: list[tuple[str, str]], membership: bool) -> None:
        seconds, micros = self._redis.time()
        now_ms = seconds * 1000 + micros // 1000
        if membership or slots:
            with self._redis.pipeline(transaction=False) as pipe:
                if membership:
                    pipe.zadd(self._keys.workers(), {self._worker_id: now_ms + self._ttl_ms})
                for name, holder in slots:
                    pipe.zadd(self._keys.limiter_slots(name), {holder: now_ms + self._ttl_ms}, xx=True)
                pipe.execute()
        if not leases:
            return
        sent = time.monotonic()
        lost = {}
        for (shard, lease), ok in zip(leases.items(), self._renewals(leases), strict=True):
            if ok:
                lease.renewed(sent)
            else:
                lost[shard] = lease
        if lost:
            self._lost(lost)

    def _renewals(self, leases: dict[int, Lease]) -> list[bool]:
        """Renew ``leases`` in one round trip: whether each is still held. Each renewal is
        packed once for as long as its lease is held: packing thousands with redis-py at every
        renewal cost more than everything else an idle worker does."""
        packed = {shard: self._renewal(shard, lease.value) for shard, lease in leases.items()}
        self._packed = packed
        command = b"".join(renewal for _, renewal in packed.values())
        replies = self._send(command, len(packed))
        if any(isinstance(reply, NoScriptError) for reply in replies):  # the server restarted
            self._redis.script_load(self._renew.script)
            replies = self._send(command, len(packed))
        error = next((reply for reply in replies if isinstance(reply, ResponseError)), None)
        if error is not None:
            raise error
        return [reply == 1 for reply in replies]

    def _renewal(self, shard: int, value: str) -> tuple[str, bytes]:
        """``EVALSHA <renew_lease> 1 <lease key> <value> <ttl>``, packed (RESP)."""
        known = self._packed.get(shard)
        if known is not None and known[0] == value:
            return known
        args = ("EVALSHA", self._renew.sha, "1", self._keys.lease(shard), value, str(self._ttl_ms))
        encoded = [arg.encode() for arg in args]
        return value, b"*%d\r\n" % len(encoded) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in encoded)

    def _send(self, command: bytes, replies: int) -> list[Any]:
        """Send ``command`` (``replies`` commands, packed) and read every reply; an error
        reply is returned as its exception, not raised."""
        pool = self._redis.connection_pool
        conn: Any = pool.get_connection()  # redis-py's blocking Connection is untyped
        try:
            conn.send_packed_command([command])  # chunks: a bytes object would be iterated
            return [_reply(conn) for _ in range(replies)]
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)


def _reply(conn: Any) -> Any:
    try:
        return conn.read_response()
    except ResponseError as exc:
        return exc


def _recorded_count(raw: bytes | str, namespace: str) -> int:
    """The shard count a namespace records, refused unless 1 to MAX_SHARDS (an older version let
    ``connect(shards=0)`` record 0, which every later client divided by)."""
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    try:
        return check_shard_count(int(text))
    except (ValueError, ConfigurationError):
        raise ConfigurationError(
            f"namespace {namespace!r} records an invalid shard count {text!r} (1 to {MAX_SHARDS}); "
            f"if you know the count its data was written with, set it: HSET {namespace}:meta shards N"
        ) from None

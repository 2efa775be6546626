"""Membership, shard leases and the thread that renews them."""

from __future__ import annotations

import functools
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
from .cluster import is_cluster, make_sync_client, pipelined_by_node
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

    async def heartbeat(self, worker_id: str, ttl_ms: int, info: dict[str, str]) -> tuple[list[str], bool]:
        """Refresh this worker's membership; returns every live worker id (sorted), and
        whether this one was not a member before (it joins, or comes back after expiring)."""
        now = await self.server_time_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(self.keys.workers(), "-inf", now)
            pipe.zadd(self.keys.workers(), {worker_id: now + ttl_ms})
            # redis-py's Mapping[FieldT, ...] is invariant in its key, so dict[str, str] needs the cast.
            pipe.hset(self.keys.worker_info(worker_id), mapping=cast("Mapping[FieldT, EncodableT]", info))
            pipe.pexpire(self.keys.worker_info(worker_id), ttl_ms)
            pipe.zrangebyscore(self.keys.workers(), now, "+inf")
            _, added, *_, live = await pipe.execute()
        return sorted(i.decode() for i in live), bool(added)

    async def leave(self, worker_id: str, info: bool = True) -> None:
        """Leave the membership (and delete the info hash, with ``info``)."""
        await self.redis.zrem(self.keys.workers(), worker_id)
        if info:
            await self.redis.delete(self.keys.worker_info(worker_id))

    async def announce(self, event: str) -> None:
        """Tell every supervisor of the namespace to tick now (``ns:lease-events``): a lease
        was released, or a worker joined or is leaving. A publish the server refuses (e.g. an
        ACL without the channel) is logged: the others then see it at their next tick."""
        try:
            await self.redis.publish(self.keys.lease_events(), event)
        except ResponseError as exc:
            log.warning("could not announce %r: %s", event, exc)

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

    async def takeable(self, shards: Sequence[int], worker_id: str) -> list[int]:
        """Those of ``shards`` that ``acquire_lease`` would give ``worker_id`` now (no one
        holds them, or Redis still has a lease of its own it dropped), in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in shards:
                pipe.get(self.keys.lease(shard))
            values = await pipe.execute()
        ours = f"{worker_id}|".encode()
        return [s for s, v in zip(shards, values, strict=True) if v is None or v.startswith(ours)]

    async def acquire_leases(self, shards: Sequence[int], worker_id: str, ttl_ms: int) -> dict[int, int]:
        """Try to take each of ``shards`` (``acquire_lease``) in one round trip; returns the
        epoch of each one taken. A shard whose reply is an error is not taken as far as the
        caller knows: if the script did take it, the lease is this worker's, and its next
        acquisition takes it again at a new epoch (or it expires)."""
        replies = await self._acquire_pipelined(shards, worker_id, ttl_ms)
        unloaded = [shard for shard, r in replies.items() if isinstance(r, NoScriptError)]
        if unloaded:  # a pipeline that does not load its scripts (a cluster's): load it, once more
            await self.redis.script_load(self._scripts["acquire_lease"].script)
            replies.update(await self._acquire_pipelined(unloaded, worker_id, ttl_ms))
        for shard, reply in replies.items():
            if isinstance(reply, Exception):
                log.debug("acquiring the lease on shard %s: %r", shard, reply)
        return {shard: int(r) for shard, r in replies.items() if not isinstance(r, Exception) and int(r) >= 0}

    async def _acquire_pipelined(self, shards: Sequence[int], worker_id: str, ttl_ms: int) -> dict[int, Any]:
        k, script = self.keys, self._scripts["acquire_lease"]
        async with self._script_pipeline() as pipe:
            for shard in shards:
                await script(keys=[k.lease(shard), k.epoch(shard), k.inbox(shard)], args=[worker_id, ttl_ms],
                             client=pipe)  # fmt: skip
            replies = await pipe.execute(raise_on_error=False)
        return dict(zip(shards, replies, strict=True))

    async def renew_leases(self, leases: dict[int, str], ttl_ms: int) -> dict[int, bool]:
        """Renew many leases in one round trip; returns shard -> still held."""
        shards = list(leases)
        script = self._scripts["renew_lease"]
        async with self._script_pipeline() as pipe:
            for shard in shards:
                await script(keys=[self.keys.lease(shard)], args=[leases[shard], ttl_ms], client=pipe)
            results = await pipe.execute()
        return {shard: bool(r) for shard, r in zip(shards, results, strict=True)}

    async def release_lease(self, shard: int, lease: str, fresh: Sequence[str] = ()) -> bool:
        """Give the lease up, naming the entries its runner took and never started (``fresh``)."""
        keys = [self.keys.lease(shard), self.keys.handover(shard)]
        event = f"released {shard}"
        args = [lease, HANDOVER_TTL_MS, self.keys.lease_events(), event, *fresh]
        released = int(await self._run("release_lease", keys, args))
        if released == 2:  # the script's PUBLISH was refused: the lease is released all the same
            log.warning("could not announce %r on %s", event, self.keys.lease_events())
        return released > 0

    async def take_handover(self, shard: int) -> set[str]:
        """The entries the last owner handed over as never started, once: the set is deleted
        (a runner that restarts later counts them as it would any claimed entry)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.smembers(self.keys.handover(shard))
            pipe.execute_command("DEL", self.keys.handover(shard))  # a cluster pipe.delete is not queued
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
        self._redis = make_sync_client(url, socket_timeout=ttl_ms / 1000)
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
        if is_cluster(self._redis):
            try:
                self._keep_by_node(leases, slots, membership)
            except NoScriptError:  # a promoted replica has no scripts; a cluster's pipeline
                self._redis.script_load(self._renew.script)  # does not load them (all primaries)
                self._keep_by_node(leases, slots, membership)
            return
        seconds, micros = self._redis.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        if membership or slots:
            with self._redis.pipeline(transaction=False) as pipe:
                if membership:  # renewed only (xx): a worker that left is not added back
                    pipe.zadd(self._keys.workers(), {self._worker_id: now_ms + self._ttl_ms}, xx=True)
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

    def _keep_by_node(self, leases: dict[int, Lease], slots: list[tuple[str, str]], membership: bool) -> None:
        """``_keep`` on a cluster: each primary's commands in a pipeline of their own."""
        now_ms = self._now_ms()
        if now_ms is None:  # a cluster whose node answering TIME is down: leases need no clock
            membership, slots = False, []
        sent = time.monotonic()
        commands: list[tuple[str, Callable[[Any], object]]] = []
        if membership and now_ms is not None:
            workers = self._keys.workers()
            expiry = now_ms + self._ttl_ms
            commands.append((workers, functools.partial(_queue_member, workers, self._worker_id, expiry)))
        for shard, lease in leases.items():
            key = self._keys.lease(shard)
            commands.append((key, functools.partial(self._queue_renewal, key, lease.value)))
        for name, holder in slots:
            key = self._keys.limiter_slots(name)
            commands.append((key, functools.partial(_queue_slot, key, holder, (now_ms or 0) + self._ttl_ms)))
        # Each reply on its own: on a cluster a primary that is down fails only the renewals
        # of its shards (neither renewed nor known lost: they run out).
        replies = pipelined_by_node(self._redis, commands)
        renewed = replies[int(membership) : int(membership) + len(leases)]
        lost = {}
        for (shard, lease), ok in zip(leases.items(), renewed, strict=True):
            if isinstance(ok, Exception):
                if isinstance(ok, NoScriptError):
                    raise ok
                continue
            if ok:
                lease.renewed(sent)
            else:
                lost[shard] = lease
        if lost or len(renewed) != sum(1 for ok in renewed if ok is True or ok == 1):
            log.debug(
                "lease keeper: renewals %s", {s: repr(ok) for s, ok in zip(leases, renewed, strict=True)}
            )
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

    def _queue_renewal(self, key: str, value: str, pipe: Any) -> None:
        self._renew(keys=[key], args=[value, self._ttl_ms], client=pipe)

    def _now_ms(self) -> int | None:
        """Redis's time on a cluster, or None while the node that answers TIME is down."""
        try:
            seconds, micros = self._redis.time()
        except redis.RedisError:
            return None
        return int(seconds) * 1000 + int(micros) // 1000


def _reply(conn: Any) -> Any:
    try:
        return conn.read_response()
    except ResponseError as exc:
        return exc


def _queue_slot(key: str, holder: str, expiry_ms: int, pipe: Any) -> None:
    pipe.zadd(key, {holder: expiry_ms}, xx=True)


def _queue_member(key: str, worker_id: str, expiry_ms: int, pipe: Any) -> None:
    pipe.zadd(key, {worker_id: expiry_ms}, xx=True)  # renewed only: a worker that left is not added back


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

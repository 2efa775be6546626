"""Every Redis key the runtime uses, built in one place.

A shard's keys all carry the hash tag ``{<shard>}`` so every script touches a
single cluster slot. Global keys (no hash tag) are never used inside a script
together with shard keys.
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "workers"
"""Consumer group name on every inbox stream."""


@dataclass(frozen=True, slots=True)
class Keys:
    namespace: str = "actors"

    # ---- global keys (no hash tag) -------------------------------------
    def meta(self) -> str:
        """hash: cluster-wide settings (``shards``)."""
        return f"{self.namespace}:meta"

    def workers(self) -> str:
        """zset: worker id -> heartbeat deadline (ms, Redis clock)."""
        return f"{self.namespace}:workers"

    def worker_info(self, worker_id: str) -> str:
        """hash: host, pid, started (unix time) of one live worker (expires)."""
        return f"{self.namespace}:worker:{worker_id}"

    def apps(self) -> str:
        """hash: worker id -> JSON ``{app, types, version, at}``: the app a worker of the namespace
        serves, written when it starts (before it joins), deleted when it stops or is refused; a
        dead worker's field is deleted by the next worker that starts (``store/namespace.py``)."""
        return f"{self.namespace}:apps"

    def probe(self) -> str:
        """A name in the namespace that is never written: workers and ``actors doctor`` check
        the Redis user's rights with harmless commands on it (a PEXPIRE of this missing key,
        a SUBSCRIBE and a PUBLISH on this channel, which nothing listens to)."""
        return f"{self.namespace}:probe"

    def lease_events(self) -> str:
        """pub/sub channel: a lease was released; supervisors look for free shards at once."""
        return f"{self.namespace}:lease-events"

    def limiters(self) -> str:
        """hash: limiter name -> its definition (JSON), as the workers that use it declare it."""
        return f"{self.namespace}:limiters"

    def limiter_slots(self, name: str) -> str:
        """zset: holder id -> lease expiry (ms) of each held concurrency slot of a limiter."""
        return f"{self.namespace}:{{limit:{name}}}:slots"

    def limiter_tat(self, name: str) -> str:
        """string: the GCRA theoretical arrival time (ms, Redis clock) of a limiter's rate."""
        return f"{self.namespace}:{{limit:{name}}}:tat"

    def queue(self, name: str, part: str) -> str:
        """The keys of limiter ``name``'s queue, beside its slots (same hash tag):
        ``items`` hash id -> msgpack [shard, envelope, dedup id, partition, score, round];
        ``ready`` zset id -> score (priority, then fair round, then arrival);
        ``dispatching`` zset id -> deadline of a dispatch in progress;
        ``vtimes`` hash priority -> the round being dispatched at that priority;
        ``last_rounds`` hash ``<priority>:<partition>`` -> the last round given there;
        ``counts`` hash partition -> items ready;
        ``dedup:<id>`` string -> item id while the item is queued or running (PX 7 days, a
        last resort: it is deleted when the item's turn ends, or found ended);
        ``out`` hash id -> msgpack [shard, actor id, dedup id, entry id, envelope] and
        ``checks`` zset id -> when to look next: dispatched items with a dedup id;
        ``seen:<item id>`` string: the item id was queued (see ``queue_seen``)."""
        return f"{self.namespace}:{{limit:{name}}}:q:{part}"

    def queue_seen(self, name: str, item_id: str) -> str:
        """string with TTL: item ``item_id`` was queued on limiter ``name``'s queue; a second
        enqueue of the id queues nothing. Deleted once no enqueue of the id can run again."""
        return self.queue(name, f"seen:{item_id}")

    def limiter_events(self) -> str:
        """pub/sub channel: ``released:<limiter>`` (a slot was given back: waiters ask again)
        or ``queued:<limiter>`` (an item was queued: dispatchers look)."""
        return f"{self.namespace}:limiter-events"

    def reply_channel(self, client_id: str) -> str:
        """pub/sub channel: replies to ``ask`` calls made by one client."""
        return f"{self.namespace}:replies:{client_id}"

    # ---- shard keys (hash tag {shard}) ---------------------------------
    def _tag(self, shard: int) -> str:
        return f"{self.namespace}:{{{shard}}}"

    def inbox(self, shard: int) -> str:
        """stream: the shard's mailbox; one consumer group ``workers``."""
        return f"{self._tag(shard)}:inbox"

    def state(self, shard: int) -> str:
        """hash: actor id -> msgpack state snapshot, for every actor of the shard."""
        return f"{self._tag(shard)}:state"

    def lease(self, shard: int) -> str:
        """string with PX TTL: ``<worker id>|<epoch>`` of the current owner."""
        return f"{self._tag(shard)}:lease"

    def epoch(self, shard: int) -> str:
        """string (integer): fencing epoch, incremented on every change of owner."""
        return f"{self._tag(shard)}:epoch"

    def outbox(self, shard: int) -> str:
        """stream: messages committed by this shard's turns for other shards."""
        return f"{self._tag(shard)}:outbox"

    def forwarded(self, shard: int) -> str:
        """hash: source shard -> last outbox entry id forwarded into this shard."""
        return f"{self._tag(shard)}:forwarded"

    def idempotency(self, shard: int, actor_id: str, key: str) -> str:
        """string with TTL: ``<digest>:<first message id>`` of an idempotency key accepted
        for one actor of this shard.

        The actor id's length comes first: actor keys and idempotency keys may hold ':' and
        '/', and without it ``A/x:y`` with key ``z`` and ``A/x`` with key ``y:z`` would meet.
        """
        return f"{self._tag(shard)}:idem:{len(actor_id)}:{actor_id}:{key}"

    def reply(self, shard: int, message_id: str) -> str:
        """string with TTL: the encoded reply to an ``ask`` (kept for late readers)."""
        return f"{self._tag(shard)}:reply:{message_id}"

    def fence(self, shard: int) -> str:
        """string, PX 1 s: written by a process of a namespace with a durability level that read
        a stored reply of the shard, so that its WAIT / WAITAOF covers the commit it read."""
        return f"{self._tag(shard)}:fence"

    def handover(self, shard: int) -> str:
        """set: inbox entries the last owner took and never started (a graceful drain left them
        pending): the next owner's runner takes them as fresh messages, and deletes the set."""
        return f"{self._tag(shard)}:handover"

    def deliveries(self, shard: int) -> str:
        """hash: actor id -> ``<delivery>#<n>``: a recovered turn was started ``n`` times
        without ending (its worker died, exited or lost the lease mid-turn); deleted when
        the turn commits or is dead-lettered (see ``count_delivery.lua``)."""
        return f"{self._tag(shard)}:deliveries"

    def turns(self, shard: int) -> str:
        """hash: actor id -> its open turn (message, journal, what it waits for), while one is open.

        A turn opens at its first journal write (a completed step, a sleep, a wait)
        and closes when it commits; meanwhile its message lives here, not in the inbox.
        """
        return f"{self._tag(shard)}:turns"

    def journal(self, shard: int, actor_id: str) -> str:
        """list: an open turn's message, then its journal records, appended as the turn goes;
        deleted with the turn's header in ``turns`` when the turn commits or is dead-lettered.

        The actor id's length comes first, as for idempotency keys: actor keys may hold ':'.
        """
        return f"{self._tag(shard)}:journal:{len(actor_id)}:{actor_id}"

    def timers(self, shard: int) -> str:
        """zset: actor id -> when it needs the owner's attention (ms, Redis clock).

        0: now (a running open turn to recover, or deferred messages to handle);
        a time: a sleep or a wait's timeout; ``FOREVER``: a wait with no timeout, or parked.
        """
        return f"{self._tag(shard)}:timers"

    def deferred(self, shard: int, actor_id: str) -> str:
        """list: messages that reached an actor while it had an open turn, in arrival order."""
        return f"{self._tag(shard)}:deferred:{actor_id}"

    def deferred_of_type(self, shard: int, actor_id: str, message_type: str) -> str:
        """list: the messages of one type in an actor's deferred list, in the same order, each
        ``<inbox entry id>|<envelope>`` (the entry id: when it reached the shard's inbox, on
        Redis's clock). ``commit.lua`` keeps it with the deferred list, so that a ``wait_for``
        reads the messages of its type only, however many others wait behind the turn.

        The actor id's length comes first, as for idempotency keys: actor keys may hold ':'.
        """
        return f"{self._tag(shard)}:deferred-type:{len(actor_id)}:{actor_id}:{message_type}"

    def idle(self, shard: int, actor_type: str) -> str:
        """zset: actor id -> when its last turn ended (ms, Redis clock), for the actors of one
        type with ``retention`` (``commit.lua`` marks them; the sweep deletes the idle ones)."""
        return f"{self._tag(shard)}:idle:{actor_type}"

    def schedules(self, shard: int) -> str:
        """hash: ``<actor id>#<schedule>`` -> the newest slot fired (ms), for the shard's actors."""
        return f"{self._tag(shard)}:schedules"

    def dead_letters(self, shard: int) -> str:
        """stream: messages this shard could not handle, with the reason."""
        return f"{self._tag(shard)}:dlq"


def hash_tag(key: str) -> str:
    """The part of ``key`` that Redis hashes to pick its cluster slot: the text between its
    first ``{`` and the next ``}``, if not empty; else the whole key."""
    start = key.find("{")
    end = key.find("}", start + 1) if start >= 0 else -1
    return key[start + 1 : end] if end > start + 1 else key

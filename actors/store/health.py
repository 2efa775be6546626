"""What a starting worker and ``actors doctor`` ask the server about itself: the rights of its
Redis user, its eviction policy, version, persistence and memory. Nothing here writes: the
rights are checked with ``ACL DRYRUN`` where the user may run it, else with commands that
change nothing (see ``Keys.probe``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.exceptions import NoPermissionError, ResponseError

from .cluster import each_primary, is_cluster
from .connection import StoreBase, honours_cancel

NO_SCRIPT = "0" * 40
"""The SHA of no script: an EVALSHA of it is refused (NOSCRIPT) after the ACL check passed."""

NO_USER = "user"
"""The right ``dry_run`` reports when the user does not exist."""

RUNTIME_COMMANDS: dict[str, tuple[str, ...]] = {
    # connection and server
    "ping": (), "time": (), "info": ("memory",), "client|setinfo": ("LIB-NAME", "actors"),
    # scripts (every atomic step is a script, called by SHA, loaded again if the server lost it)
    "evalsha": (NO_SCRIPT, "1", "{k}"), "script|load": ("return 1",), "script|exists": (NO_SCRIPT,),
    # transactions: one shard's keys read at one moment (``wait_idle``, ``actors status``)
    "multi": (), "exec": (),
    # pub/sub: replies to ask, lease hand-overs, limiter slots
    "publish": ("{c}", "x"), "subscribe": ("{c}",),
    # strings
    "get": ("{k}",), "set": ("{k}", "x"), "del": ("{k}",), "exists": ("{k}",), "incr": ("{k}",),
    "pexpire": ("{k}", "1"), "pttl": ("{k}",),
    # hashes
    "hget": ("{k}", "f"), "hset": ("{k}", "f", "x"), "hsetnx": ("{k}", "f", "x"), "hdel": ("{k}", "f"),
    "hexists": ("{k}", "f"), "hincrby": ("{k}", "f", "1"), "hgetall": ("{k}",), "hmget": ("{k}", "f"),
    "hlen": ("{k}",), "hscan": ("{k}", "0"),
    # lists
    "rpush": ("{k}", "x"), "lpop": ("{k}",), "lrange": ("{k}", "0", "-1"), "llen": ("{k}",),
    "lindex": ("{k}", "0"), "lpos": ("{k}", "x"), "lrem": ("{k}", "0", "x"), "ltrim": ("{k}", "0", "-1"),
    # sets (the entries a drain hands over)
    "sadd": ("{k}", "m"), "smembers": ("{k}",),
    # sorted sets
    "zadd": ("{k}", "1", "m"), "zrem": ("{k}", "m"), "zcard": ("{k}",), "zcount": ("{k}", "0", "1"),
    "zrange": ("{k}", "0", "-1"), "zrangebyscore": ("{k}", "0", "1"),
    "zremrangebyscore": ("{k}", "0", "1"), "zscore": ("{k}", "m"), "zmscore": ("{k}", "m"),
    "zscan": ("{k}", "0"),
    # streams
    "xadd": ("{k}", "*", "f", "x"), "xack": ("{k}", "g", "0-1"), "xautoclaim": ("{k}", "g", "c", "0", "0-0"),
    "xdel": ("{k}", "0-1"), "xgroup|create": ("{k}", "g", "0"), "xinfo|groups": ("{k}",),
    "xinfo|stream": ("{k}",),
    "xlen": ("{k}",), "xpending": ("{k}", "g"), "xrange": ("{k}", "-", "+"),
    "xread": ("STREAMS", "{k}", "0"), "xreadgroup": ("GROUP", "g", "c", "STREAMS", "{k}", ">"),
    "xrevrange": ("{k}", "+", "-"), "xtrim": ("{k}", "MAXLEN", "0"),
}  # fmt: skip
"""Every command the runtime (workers, clients, the CLI but ``bench``) sends, scripts' included,
with arguments to try it with (``{k}``: a key of the namespace, ``{c}``: one of its channels)."""


def acl_rules(namespace: str) -> str:
    """The rules of a Redis user that may run the runtime in ``namespace`` and nothing else:
    ``ACL SETUSER <name> on ><password> <these rules>``."""
    commands = " ".join(f"+{command}" for command in RUNTIME_COMMANDS)
    return f"resetkeys resetchannels -@all ~{namespace}:* &{namespace}:* {commands}"


@dataclass(frozen=True, slots=True)
class Refusal:
    """A right the user lacks: what it is for, and the server's words."""

    right: str
    error: str


@honours_cancel
class HealthStore(StoreBase):
    async def ping(self) -> None:
        """Raise if the server cannot be reached (or refuses this login)."""
        await self.redis.ping()

    async def missing_rights(self) -> list[Refusal]:
        """Try, with commands that change nothing, what a worker needs: the namespace's keys
        (read and write), its scripts, its channels (publish and subscribe), the clock."""
        k = self.keys
        probes: list[tuple[str, tuple[str, ...]]] = [
            (f"read keys {k.namespace}:*", ("HGET", k.meta(), "shards")),
            (f"write keys {k.namespace}:*", ("PEXPIRE", k.probe(), "1")),  # the key never exists
            ("run scripts", ("EVALSHA", NO_SCRIPT, "1", k.probe())),
            (f"publish on channels {k.namespace}:*", ("PUBLISH", k.probe(), "")),
            ("read the server's clock", ("TIME",)),
        ]
        refused: list[Refusal] = []
        for right, command in probes:
            try:
                await self.redis.execute_command(*command)  # type: ignore[no-untyped-call]
            except NoPermissionError as exc:
                refused.append(Refusal(right, str(exc)))
            except ResponseError:  # NOSCRIPT: the ACL let it through
                pass
        subscribed = await self._subscribe_refusal()
        if subscribed is not None:
            refused.append(Refusal(f"subscribe to channels {k.namespace}:*", subscribed))
        return refused

    async def _subscribe_refusal(self) -> str | None:
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(self.keys.probe())
            await pubsub.get_message(timeout=5.0)  # the confirmation, or the refusal raised
            return None
        except NoPermissionError as exc:
            return str(exc)
        finally:
            await pubsub.aclose()

    async def dry_run(self, user: str) -> list[Refusal] | None:
        """``ACL DRYRUN`` of every runtime command for ``user`` on the namespace's keys and
        channels; None if this connection may not run ``ACL DRYRUN`` (it needs admin rights)."""
        fill = {"{k}": self.keys.probe(), "{c}": self.keys.probe()}
        async with self.redis.pipeline(transaction=False) as pipe:
            for command, args in RUNTIME_COMMANDS.items():
                filled = (fill.get(a, a) for a in args)
                pipe.execute_command("ACL", "DRYRUN", user, *command.split("|"), *filled)
            results = await pipe.execute(raise_on_error=False)
        first = results[0]  # ping, which every server has
        if isinstance(first, ResponseError):
            if "not found" in str(first):  # no such user
                return [Refusal(NO_USER, str(first))]
            return None  # no right to ACL DRYRUN (or a server without it)
        return [
            Refusal(f"+{command}", _text(result))
            for command, result in zip(RUNTIME_COMMANDS, results, strict=True)
            # an error: a command this server does not have (client|setinfo before Redis 7.2)
            if not isinstance(result, ResponseError) and _text(result) != "OK"
        ]

    async def acl_user(self) -> str | None:
        """The connection's Redis user, if it may ask (``ACL WHOAMI``)."""
        try:
            return _text(await self.redis.execute_command("ACL", "WHOAMI"))  # type: ignore[no-untyped-call]
        except ResponseError:
            return None

    async def info(self, section: str) -> dict[str, Any] | None:
        """A section of ``INFO``; None if refused (ACL, or a managed service)."""
        try:
            return await self.redis.info(section)
        except ResponseError:
            return None

    async def config_value(self, name: str) -> str | None:
        """``CONFIG GET name``; None if refused or unknown."""
        try:
            found = await self.redis.config_get(name)
        except ResponseError:
            return None
        value = found.get(name)
        return None if value is None else _text(value)

    async def full_coverage_required(self) -> bool:
        """Whether a cluster stops serving every slot while one primary's slots are uncovered
        (``cluster-require-full-coverage yes`` on any primary); False for one server, or where
        CONFIG is refused."""
        if not is_cluster(self.redis):
            return False
        try:
            found = await each_primary(self.redis, "CONFIG GET", "cluster-require-full-coverage")
        except ResponseError:
            return False
        return any(
            _text(v) == "yes" for reply in found for k, v in reply.items() if _text(k).endswith("coverage")
        )

    async def eviction_policy(self) -> str | None:
        """The server's ``maxmemory-policy`` (from ``INFO memory``, else ``CONFIG GET``); None if
        neither may be read."""
        memory = await self.info("memory")
        if memory is not None and "maxmemory_policy" in memory:
            return str(memory["maxmemory_policy"])
        return await self.config_value("maxmemory-policy")

    async def recorded_shards(self) -> int | None:
        raw = await self.redis.hget(self.keys.meta(), "shards")
        return None if raw is None else int(raw)

    async def namespaces(self, rounds: int = 20) -> list[str] | None:
        """Namespaces on the server with a shard count (a bounded ``SCAN`` for ``*:meta``: at
        most ``rounds`` calls of 1,000); None if SCAN is refused."""
        found: set[str] = set()
        cursor = 0
        try:
            for _ in range(rounds):
                cursor, names = await self.redis.scan(cursor, match="*:meta", count=1000)
                for name in names:
                    if await self.redis.hexists(name, "shards"):
                        found.add(_text(name).removesuffix(":meta"))
                if cursor == 0:
                    break
        except ResponseError:
            return None
        return sorted(found)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

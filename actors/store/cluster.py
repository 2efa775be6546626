"""Redis Cluster and Valkey cluster: the URL that names one, and the clients made for it.

A cluster is named by its URL's scheme: ``redis+cluster://`` (or ``valkey+cluster://``;
``rediss+cluster://`` / ``valkeys+cluster://`` with TLS), with any node as the seed. The rest
of the URL (password, user, TLS options) reads as for one server.

redis-py's cluster client offers what the store uses: commands routed by key (every script's
keys share one hash tag, so each script runs on the primary of that slot), pipelines split by
node (one connection per node, in order), transactions within one slot, scripts loaded on every
primary, and pub/sub. It follows MOVED and ASK and refreshes its map of the slots after a
failover. What differs is kept here and asked for with ``is_cluster``:

- a pool per node that opens a connection when every one is busy, up to
  ``NODE_CONNECTIONS`` (redis-py's cluster client has no blocking pool);
- classic pub/sub: a ``PUBLISH`` on any node reaches subscribers on every node, so replies,
  lease and limiter events need nothing of their own;
- the inbox reader's ``XREAD`` names streams of one slot only (``reader.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.cluster import RedisCluster as SyncRedisCluster
from redis.exceptions import ClusterDownError, MovedError, RedisError, TryAgainError
from redis.retry import Retry as SyncRetry

SCHEMES = {
    "redis+cluster": "redis",
    "valkey+cluster": "redis",
    "rediss+cluster": "rediss",
    "valkeys+cluster": "rediss",
}
"""A cluster URL's scheme → the scheme of its seed node's URL."""

NODE_CONNECTIONS = 1024
"""Connections per node at most. A burst of calls beyond the idle ones opens more (the cluster
client cannot wait for a busy one), so this is a ceiling, not a pool size."""

CLUSTER_ERRORS: tuple[type[BaseException], ...] = (ClusterDownError, MovedError, TryAgainError)
"""Errors a failover brings for a moment: the call's outcome is known (not run) or it is retried."""


def seed_url(url: str) -> str | None:
    """The seed node's plain URL if ``url`` names a cluster, else None."""
    parts = urlsplit(url)
    scheme = SCHEMES.get(parts.scheme.lower())
    return None if scheme is None else urlunsplit(parts._replace(scheme=scheme))


def is_cluster(client: object) -> bool:
    return isinstance(client, RedisCluster | SyncRedisCluster)


async def primaries_of(client: aioredis.Redis, keys: Sequence[str]) -> list[object]:
    """The primaries that serve ``keys`` now, each once (the nodes a durability wait must run
    on, see ``StoreBase._acknowledged``)."""
    nodes = {}
    for key in keys:
        node = await node_of(client, key)
        nodes[cast(ClusterNode, node).name] = node
    return list(nodes.values())


async def each_primary(client: aioredis.Redis, *command: str) -> list[Any]:
    """``command``'s reply from every primary of a cluster, or from the one server."""
    if not is_cluster(client):
        # execute_command is unannotated in redis-py's asyncio client.
        return [await client.execute_command(*command)]  # type: ignore[no-untyped-call]
    cluster = cast(RedisCluster, client)
    await cluster.initialize()  # the map of nodes (a no-op once known)
    # One call per primary: a call to several returns their replies by node, but one node's
    # reply bare, and a reply that is itself a dict (CONFIG GET) cannot be told from those.
    calls = (cluster.execute_command(*command, target_nodes=node) for node in cluster.get_primaries())
    return list(await asyncio.gather(*calls))


async def node_of(client: aioredis.Redis, key: str) -> object:
    """The primary that serves ``key`` as far as the client knows: a call sent there with
    ``target_nodes`` needs no ``COMMAND GETKEYS`` round trip, which redis-py makes first for a
    command whose keys it cannot find by itself (``XREAD``)."""
    cluster = cast(RedisCluster, client)
    await cluster.initialize()
    node = cluster.get_node_from_key(key)
    if node is None:
        raise ClusterDownError(f"no node serves the slot of {key!r}")
    return node


async def primary_names(client: aioredis.Redis) -> set[str]:
    """The primaries the cluster client knows of (it reads the map first if it has none)."""
    cluster = cast(RedisCluster, client)
    await cluster.initialize()  # a no-op once the map is known
    return {node.name for node in cluster.get_primaries()}


async def refresh(client: aioredis.Redis) -> None:
    """Read a cluster's map of slots again (a no-op for one server). Commands do it when a
    node fails them; a pub/sub subscription does not, and would keep trying a dead node."""
    if is_cluster(client):
        with contextlib.suppress(RedisError):
            await cast(RedisCluster, client).nodes_manager.initialize()


def make_cluster_client(url: str, retries: int, keepalive: dict[int, int]) -> aioredis.Redis:
    """An asyncio cluster client seeded by ``url`` (a plain node URL, see ``seed_url``)."""
    client = RedisCluster.from_url(
        url,
        max_connections=NODE_CONNECTIONS,
        require_full_coverage=False,  # a client may start while a failover leaves slots uncovered
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries),
        socket_connect_timeout=5,
        socket_timeout=None,  # as make_client: keepalive finds a dead peer
        socket_keepalive=True,
        socket_keepalive_options=keepalive,
        health_check_interval=30,
    )
    # The store's modules are typed against the single-server client; the cluster client has
    # the same commands, pipelines, scripts and pub/sub, and where it differs they ask
    # ``is_cluster``.
    return cast(aioredis.Redis, client)


def make_sync_client(url: str, socket_timeout: float) -> redis.Redis:
    """A blocking client (the LeaseKeeper's thread) for a server or a cluster URL. On a
    cluster it never retries: a call to a primary that is down fails at once rather than
    hold up the renewals of the others until the failover ends (``pipelined_by_node``)."""
    seed = seed_url(url)
    if seed is None:
        return redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=socket_timeout)
    client: Any = SyncRedisCluster.from_url(
        seed, socket_connect_timeout=min(5.0, socket_timeout), socket_timeout=socket_timeout,
        retry=SyncRetry(NoBackoff(), 0), require_full_coverage=False,
    )  # fmt: skip
    return cast(redis.Redis, client)


def pipelined_by_node(
    client: redis.Redis, commands: Sequence[tuple[str, Callable[[Any], object]]]
) -> list[Any]:
    """Run ``commands`` (a key each, and what queues the command in a pipeline) with their
    replies in order, errors as replies, on a cluster: each primary's commands go in a
    pipeline of their own, so one primary that is down fails only its own (each reply the
    error), and the map of slots is read again so the next call finds its replacement."""
    cluster = cast(SyncRedisCluster, client)
    groups: dict[str, list[int]] = {}
    for index, (key, _) in enumerate(commands):
        node = cluster.get_node_from_key(key)  # type: ignore[no-untyped-call]  # unannotated in redis-py
        groups.setdefault(node.name if node is not None else "", []).append(index)
    replies: list[Any] = [None] * len(commands)
    failed = False
    for indexes in groups.values():
        try:
            with cluster.pipeline(transaction=False) as pipe:  # type: ignore[no-untyped-call]
                for index in indexes:
                    commands[index][1](pipe)
                done = pipe.execute(raise_on_error=False)
        except RedisError as exc:
            done, failed = [exc] * len(indexes), True
        for index, reply in zip(indexes, done, strict=True):
            replies[index] = reply
    if failed:
        with contextlib.suppress(RedisError):
            cluster.nodes_manager.initialize()
    return replies

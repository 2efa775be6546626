"""The runtime on a real cluster (3 primaries + 3 replicas from the shipped server binary):
URLs, shards spread over the primaries, durability waits on the node that wrote, and a
primary's SIGKILL ridden by the workers with nothing acknowledged lost and fencing kept.

The core, workflow and limiter tests run against the session's cluster as well
(``CLUSTER_MODULES`` in conftest); the tests here that stop or kill nodes have a cluster of
their own."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import actors
from actors import DurabilityTimeout
from actors.cluster_server import LocalCluster
from actors.codec import actor_id
from actors.keys import Keys
from actors.routing import shard_of
from actors.store.cluster import seed_url

from .apps import Add, Counter, Get, Total, app

pytestmark = pytest.mark.chaos


def test_a_cluster_url_names_its_seed_node() -> None:
    assert seed_url("redis+cluster://:pw@10.0.0.1:7000") == "redis://:pw@10.0.0.1:7000"
    assert seed_url("valkey+cluster://h:7000") == "redis://h:7000"
    assert (
        seed_url("rediss+cluster://u:p@h:7000?ssl_cert_reqs=none") == "rediss://u:p@h:7000?ssl_cert_reqs=none"
    )
    assert seed_url("redis://h:6379/0") is None


@pytest.fixture(scope="module")
def own_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A cluster for the tests that stop or kill its nodes."""
    cluster = LocalCluster(tmp_path_factory.mktemp("own-cluster")).start()
    yield cluster
    cluster.stop()


def _actor_on(cluster: LocalCluster, namespace: str, node_port: int, shards: int = 16) -> str:
    """A Counter key whose shard's keys live on the primary at ``node_port``."""
    keys = Keys(namespace)
    for n in range(10_000):
        shard = shard_of(actor_id("Counter", f"a{n}"), shards)
        if cluster.master_of(keys.inbox(shard)).port == node_port:
            return f"a{n}"
    raise AssertionError(f"no actor key lands on {node_port}")


@pytest.mark.cluster
async def test_shards_spread_over_the_primaries_and_each_serves_its_actors(
    redis_cluster: LocalCluster, start_worker: Callable[..., Any], connect: Callable[..., Any], namespace: str
) -> None:
    keys = Keys(namespace)
    primaries = {redis_cluster.master_of(keys.inbox(shard)).port for shard in range(16)}
    assert primaries == {node.port for node in redis_cluster.primaries()}, "every primary serves shards"
    await start_worker(app)
    async with connect(app=app) as client:
        names = [_actor_on(redis_cluster, namespace, port) for port in sorted(primaries)]
        for name in names:
            await client.send(Counter.ref(name), Add(by=2))
        for name in names:
            assert await client.ask(Counter.ref(name), Get()) == Total(total=2)


async def test_replica_durability_waits_for_the_replica_of_the_node_that_wrote(
    own_cluster: LocalCluster, namespace: str
) -> None:
    """WAIT runs on the node of the write: with one primary's replica stopped, a send to a
    shard of that primary times out and a send to a shard of another is acknowledged."""
    first, second = own_cluster.primaries()[:2]
    stalled, healthy = (
        _actor_on(own_cluster, namespace, first.port),
        _actor_on(own_cluster, namespace, second.port),
    )
    replica = own_cluster.replica_of(first)
    async with actors.connect(
        own_cluster.url, namespace=namespace, app=app, durability="replica", durability_timeout=1.0
    ) as client:
        await client.send(Counter.ref(stalled), Add(by=1))
        assert replica.process is not None
        replica.process.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(DurabilityTimeout):
                await client.send(Counter.ref(stalled), Add(by=1))
            await client.send(Counter.ref(healthy), Add(by=1))
        finally:
            replica.process.send_signal(signal.SIGCONT)


@pytest.mark.cluster
async def test_a_durable_commit_publishes_its_replies_on_a_cluster(
    start_worker: Callable[..., Any], connect: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """With a durability level the replies are published after the wait, by the worker's
    client: a cluster pipeline refuses its ``publish`` method, which failed every such
    commit after it was applied (its runner restarted, the asker read the stored reply a second
    later)."""
    async with connect(app=app, durability="replica", shards=4) as client:
        await start_worker(app)
        for n in range(1, 4):
            await client.send(Counter.ref("durable"), Add(by=1))
            assert await client.ask(Counter.ref("durable"), Get()) == Total(total=n)
    assert "runner failed" not in caplog.text, caplog.text[-3000:]
    assert "blocked when running redis in cluster mode" not in caplog.text


async def test_fsync_durability_on_a_cluster_of_one_primary(tmp_path: Path, namespace: str) -> None:
    """Its checks ask every primary for ``appendfsync``: with one primary the cluster client
    returns that node's reply bare, not by node, and a ``CONFIG GET`` reply (a dict) was taken
    for replies by node (AttributeError)."""
    cluster = LocalCluster(tmp_path / "one", masters=1, replicas=0, appendfsync="always").start()
    try:
        async with actors.connect(cluster.url, namespace=namespace, app=app, durability="fsync") as client:
            assert client.durability == "fsync"
            await client.send(Counter.ref("a"), Add(by=1))
    finally:
        cluster.stop()

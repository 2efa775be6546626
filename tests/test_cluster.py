"""The runtime on a real cluster (3 primaries + 3 replicas from the shipped server binary):
URLs, shards spread over the primaries, durability waits on the node that wrote, and a
primary's SIGKILL ridden by the workers with nothing acknowledged lost and fencing kept.

The core, workflow and limiter tests run against the session's cluster as well
(``CLUSTER_MODULES`` in conftest); the tests here that stop or kill nodes have a cluster of
their own."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.exceptions import NoScriptError

import actors
from actors import DurabilityTimeout, cluster_server
from actors.cluster_server import ClusterNode, LocalCluster
from actors.codec import actor_id
from actors.keys import Keys
from actors.routing import shard_of
from actors.store import Store
from actors.store.cluster import seed_url

from .apps import Add, Counter, Get, Total, app
from .conftest import WorkerProcess, eventually
from .test_chaos import assert_held_by_one_process_at_a_time
from .test_cli import actors_cli, ok

pytestmark = pytest.mark.chaos
LOG_LEVEL = os.environ.get("ACTORS_TEST_LOG", "WARNING")


def test_a_cluster_url_names_its_seed_node() -> None:
    assert seed_url("redis+cluster://:pw@127.0.0.1:7000") == "redis://:pw@127.0.0.1:7000"
    assert seed_url("valkey+cluster://127.0.0.1:7000") == "redis://127.0.0.1:7000"
    assert (
        seed_url("rediss+cluster://u:p@127.0.0.1:7000?ssl_cert_reqs=none")
        == "rediss://u:p@127.0.0.1:7000?ssl_cert_reqs=none"
    )
    assert seed_url("redis://127.0.0.1:6379/0") is None


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


@pytest.mark.cluster
async def test_the_cli_reads_and_writes_a_namespace_on_a_cluster(
    redis_url: str, start_worker: Callable[..., Any], namespace: str
) -> None:
    await start_worker(app)

    async def run(*args: str) -> str:
        return ok(await actors_cli(*args, "--redis", redis_url, "--namespace", namespace))

    await run("send", "Counter/c", "Add", '{"by": 5}', "--app", "tests.apps:app")
    assert '"total": 5' in await run("ask", "Counter/c", "Get", "{}", "--app", "tests.apps:app")
    status = await run("status", "--wait-idle")
    assert "4 shards, 1 live workers" in status and "shards [0, 1, 2, 3]" in status, status
    doctor = await run("doctor")
    assert "4 shards" in doctor and "1 live" in doctor, doctor


async def test_pipelines_of_scripts_load_them_on_primaries_that_lack_them(
    own_cluster: LocalCluster, namespace: str
) -> None:
    """A cluster's pipeline does not load a script a node lacks, and a promoted replica lacks
    every script (they are not replicated): a pipeline of script calls loads them first on every
    primary not known to hold them; one that lost them (restarted) fails one call."""
    store = Store.from_url(own_cluster.url, namespace)
    unheld = dict.fromkeys(range(16), False)
    try:
        for node in own_cluster.primaries():
            own_cluster.cli(node, "SCRIPT", "FLUSH")
        assert await store.renew_leases(dict.fromkeys(range(16), "nobody|1"), 1000) == unheld
        for node in own_cluster.primaries():
            own_cluster.cli(node, "SCRIPT", "FLUSH")
        with pytest.raises(NoScriptError):
            await store.renew_leases(dict.fromkeys(range(16), "nobody|1"), 1000)
        assert await store.renew_leases(dict.fromkeys(range(16), "nobody|1"), 1000) == unheld
    finally:
        await store.close()


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


async def test_with_everysec_a_failover_loses_exactly_what_the_replica_had_not_received(
    own_cluster: LocalCluster, namespace: str
) -> None:
    """Replication is asynchronous: sends acknowledged while the replica lagged (here: stopped,
    its link cut) are lost when it takes over; everything it had received is kept."""
    primary = own_cluster.primaries()[0]
    replica = own_cluster.replica_of(primary)
    name = _actor_on(own_cluster, namespace, primary.port)
    inbox = Keys(namespace).inbox(shard_of(actor_id("Counter", name), 16))
    async with actors.connect(own_cluster.url, namespace=namespace, app=app) as client:
        for n in range(20):
            await client.send(Counter.ref(name), Add(sender="s", seq=n))
        await eventually(lambda: _offset(own_cluster, primary, "master_repl_offset")
                         == _offset(own_cluster, replica, "slave_repl_offset"))  # fmt: skip
        assert replica.process is not None
        replica.process.send_signal(signal.SIGSTOP)
        # Its link is cut while it is stopped, so it cannot take what follows from its socket.
        own_cluster.cli(primary, "CLIENT", "KILL", "TYPE", "replica")
        for n in range(20, 30):
            await client.send(Counter.ref(name), Add(sender="s", seq=n))
        own_cluster.kill(primary)
        replica.process.send_signal(signal.SIGCONT)
        own_cluster.cli(replica, "CLUSTER", "FAILOVER", "TAKEOVER")
        await asyncio.to_thread(own_cluster.wait_failover, primary)
    assert own_cluster.cli(replica, "XLEN", inbox) == "20", "kept what the replica had, lost the rest"
    await asyncio.to_thread(own_cluster.restart, primary)


def _offset(cluster: LocalCluster, node: ClusterNode, field: str) -> int:
    info = cluster.cli(node, "INFO", "replication")
    return int(next(line.split(":")[1] for line in info.splitlines() if line.startswith(field)))


async def test_a_worker_warns_when_the_cluster_requires_full_coverage(
    own_cluster: LocalCluster,
    namespace: str,
    fast_settings: actors.WorkerSettings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With full coverage required, a primary's failure stops every shard: the worker says so."""
    for node in own_cluster.primaries():
        own_cluster.cli(node, "CONFIG", "SET", "cluster-require-full-coverage", "yes")
    try:
        where = actors.RedisSettings(url=own_cluster.url, namespace=namespace)
        worker = actors.Worker(app, where, fast_settings)
        task = asyncio.create_task(worker.run())
        await asyncio.wait_for(worker.ready.wait(), 15)
        worker.stop()
        await asyncio.wait_for(task, 20)
    finally:
        for node in own_cluster.primaries():
            own_cluster.cli(node, "CONFIG", "SET", "cluster-require-full-coverage", "no")
    assert any("cluster-require-full-coverage yes" in r.getMessage() for r in caplog.records)


async def test_a_primary_killed_under_load_loses_nothing_acknowledged_and_fencing_holds(
    own_cluster: LocalCluster, spawn_worker: Callable[..., WorkerProcess], namespace: str
) -> None:
    """Two worker processes and a sender with durability ``replica``; the primary of one
    actor's shard is SIGKILLed and its replica takes over. The workers ride the failover (no
    restart), every acknowledged send is handled exactly once and in order, and no actor is
    ever held by two processes at once (its lease key was on the dead primary)."""
    victim = own_cluster.primaries()[0]
    names = [_actor_on(own_cluster, namespace, victim.port)] + [f"k{n}" for n in range(7)]
    workers = [spawn_worker(url=own_cluster.url, log_level=LOG_LEVEL) for _ in range(2)]
    async with actors.connect(own_cluster.url, namespace=namespace, app=app, durability="replica") as client:

        async def answered() -> bool:
            with contextlib.suppress(actors.AskTimeout):
                return await client.ask(Counter.ref(names[0]), Get(), timeout=2.0) is not None
            return False

        await eventually(answered, timeout=30)
        acked: list[int] = []
        stop = asyncio.Event()

        async def load() -> None:
            seq = 0
            while not stop.is_set():
                with contextlib.suppress(Exception):  # the dead primary's shard refuses for a while
                    await client.send(Counter.ref(names[seq % len(names)]), Add(sender="s", seq=seq))
                    acked.append(seq)
                seq += 1
                await asyncio.sleep(0.005)

        sender = asyncio.create_task(load())
        await asyncio.sleep(1.0)
        before = len(acked)
        promoted = own_cluster.replica_of(victim)
        own_cluster.kill(victim)
        await asyncio.to_thread(own_cluster.wait_failover, victim)
        restarted = asyncio.create_task(asyncio.to_thread(own_cluster.restart, victim))  # for the next test
        await eventually(lambda: len(acked) > before + 50, timeout=30)
        stop.set()
        await sender

        async def handled() -> bool:
            states = await asyncio.gather(*(client.state(Counter.ref(n)) for n in names))
            seen = [seq for s in states if s is not None for seq in s.seqs.get("s", [])]
            assert len(seen) == len(set(seen)), "a message was handled twice"
            return set(acked) <= set(seen)

        await eventually(handled, timeout=60, interval=0.2)
        for state in await asyncio.gather(*(client.state(Counter.ref(n)) for n in names)):
            assert state is not None
            assert state.seqs["s"] == sorted(state.seqs["s"]), "per-sender order held"
            assert state.epochs == sorted(set(state.epochs)), "no commit under an older epoch"
            assert_held_by_one_process_at_a_time(state.held)
    assert all(w.proc is not None and w.proc.poll() is None for w in workers), "the workers rode the failover"
    keys = Keys(namespace)
    on_victim = {s for s in range(16) if own_cluster.master_of(keys.inbox(s)).port == promoted.port}
    lost = {int(m) for w in workers for m in re.findall(r"lost the lease on shard (\d+)", w.log.read_text())}
    assert lost <= on_victim, "only the shards of the dead primary lost their leases"
    await restarted


async def test_a_client_subscribes_again_after_its_reply_channels_primary_fails(
    own_cluster: LocalCluster,
    start_worker: Callable[..., Any],
    namespace: str,
    fast_settings: actors.WorkerSettings,
) -> None:
    """A subscription does not follow a failover by itself: the listener reads the map of
    slots again, and the client's reply channel has a subscriber again once a replica took
    over (before, it kept trying the dead node and every ask waited for the stored reply)."""
    await start_worker(app, url=own_cluster.url)
    async with actors.connect(own_cluster.url, namespace=namespace, app=app) as client:
        assert await client.ask(Counter.ref("a"), Get()) == Total(total=0)
        channel = client._replies.channel  # type: ignore[union-attr]
        victim = own_cluster.master_of(channel)
        own_cluster.kill(victim)
        try:
            await asyncio.to_thread(own_cluster.wait_failover, victim)

            def subscribers() -> int:
                live = [n for n in own_cluster.nodes if n.alive]
                return sum(int(own_cluster.cli(n, "PUBSUB", "NUMSUB", channel).split()[-1]) for n in live)

            await eventually(subscribers, timeout=30)
            # An actor elsewhere: a send to the dead primary's shards fails once per client
            # after a failover (README), which is not what this test is about.
            other = next(p for p in own_cluster.primaries() if p.port != own_cluster.master_of(channel).port)
            elsewhere = _actor_on(own_cluster, namespace, other.port, shards=fast_settings.shards)
            assert await client.ask(Counter.ref(elsewhere), Get()) == Total(total=0)
        finally:
            await asyncio.to_thread(own_cluster.restart, victim)


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


def test_a_node_whose_bus_port_was_taken_meanwhile_starts_on_other_ports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ports a node gets were free when picked, but another process may take one before
    the node binds it (an outgoing connection's ephemeral port, on a busy machine): that node
    exits at once. The cluster starts on other ports; it used to wait 60 s for the dead node
    to answer, and fail (seen under ACTORS_TEST_CLUSTER=all)."""
    port = cluster_server._free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taker:
        taker.bind(("127.0.0.1", port + 10_000))  # the node's cluster bus port
        taker.listen()
        picks = iter([port])
        real = cluster_server._free_port
        monkeypatch.setattr(cluster_server, "_free_port", lambda: next(picks, None) or real())
        cluster = LocalCluster(tmp_path / "c", masters=1, replicas=0)
        try:
            [node] = cluster.start().nodes
            assert node.alive and node.port != port
            assert "cluster_state:ok" in cluster.cli(node, "CLUSTER", "INFO")
        finally:
            cluster.stop()

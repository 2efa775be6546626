"""OpenTelemetry: one trace follows a message from the client's send through an ask, a
sleep, an approval sent from another process and a worker crash; off, nothing is traced."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import actors
from actors import telemetry
from actors.codec import decode_envelope
from actors.routing import shard_of

from .conftest import eventually
from .test_cli import actors_cli, ok
from .trace_apps import Start, Traced, app

TRACE_APP = "tests.trace_apps:app"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.use(provider)
    yield exporter
    telemetry.use(None)


def by_name(spans: list[ReadableSpan], prefix: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name.startswith(prefix)]


async def test_one_trace_follows_a_message_through_an_ask_a_sleep_and_an_approval(
    spans, connect, start_worker, redis_url, namespace
) -> None:
    await start_worker(app)
    async with connect(app=app) as client:
        ref = Traced.ref("t1")
        await client.send(ref, Start(request_id="r1"))
        await eventually(lambda: _waiting(client, ref), timeout=20)
        # The approval comes from another process, which does not trace.
        ok(await actors_cli("approve", ref.id, "--request-id", "r1", "--approve", "--by", "ops",
                            "--redis", redis_url, "--namespace", namespace))  # fmt: skip
        await eventually(lambda: _approved(client, ref), timeout=20)

    finished = spans.get_finished_spans()
    [send] = by_name(finished, "send Start")
    trace_id = send.context.trace_id
    turns = by_name(finished, "turn Traced.on_start")
    assert len(turns) >= 3, "first run, after the sleep, after the approval"
    for turn in turns:
        assert turn.context.trace_id == trace_id, "every run of the turn is in the send's trace"
        assert turn.parent is not None and turn.parent.span_id == send.context.span_id
        assert turn.attributes is not None
        assert turn.attributes["actor.type"] == "Traced" and turn.attributes["actor.key"] == "t1"
        assert {"shard", "attempt", "epoch", "message.id"} <= set(turn.attributes)
    assert [t.attributes["turn.outcome"] for t in turns][-1] == "done"  # type: ignore[index]
    assert turns[0].attributes["turn.outcome"] == "suspended"  # type: ignore[index]
    [ask] = by_name(finished, "ask Note")
    assert ask.parent is not None and ask.parent.span_id == turns[0].context.span_id
    [helper] = by_name(finished, "turn Helper.on_note")
    assert helper.parent is not None and helper.parent.span_id == ask.context.span_id
    [step] = by_name(finished, "step slow")
    assert step.parent is not None and step.parent.span_id == turns[0].context.span_id
    assert step.attributes is not None and step.attributes["step.attempt"] == 1
    for woke in (*by_name(finished, "timer fired Traced"), *by_name(finished, "wait resumed Traced")):
        assert woke.context.trace_id == trace_id
    assert by_name(finished, "timer fired Traced") and by_name(finished, "wait resumed Traced")
    traced = {s.context.trace_id for s in finished if s.name != "send Approval"}
    assert traced == {trace_id}, "exactly one trace"


async def test_with_tracing_off_no_span_is_made_and_no_context_travels(connect, start_worker) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # a global SDK provider alone does not turn tracing on
    telemetry.use(None)
    assert not telemetry.tracing()
    async with connect(app=app, shards=4) as client:
        ref = Traced.ref("off")
        await client.send(ref, Start(request_id="r2"))
        [(_, fields)] = await client.store.redis.xrange(
            client.store.keys.inbox(shard_of(ref.id, client.shards))
        )
        assert decode_envelope(fields[b"e"]).headers == {}, "no trace context in the message"
        await start_worker(app)
        await eventually(lambda: _waiting(client, ref), timeout=20)
    assert exporter.get_finished_spans() == ()


@pytest.mark.chaos
async def test_a_turn_resumed_after_a_crash_joins_its_trace(spans, connect, spawn_worker) -> None:
    first = spawn_worker(TRACE_APP, "--otel", "console")
    async with connect(app=app) as client:
        ref = Traced.ref("crash")
        await client.send(ref, Start(request_id="r3", pause=3.0))
        await eventually(lambda: _in_slow_step(client, ref), timeout=20)
        first.signal(signal.SIGKILL)
        first.proc.wait()  # type: ignore[union-attr]
        second = spawn_worker(TRACE_APP, "--otel", "console")
        await eventually(lambda: _waiting(client, ref), timeout=30)  # re-ran the step, slept, waits
        second.stop()  # graceful: flushes its spans
    [send] = by_name(spans.get_finished_spans(), "send Start")
    exported = _turn_spans(second.log)
    assert exported, "the survivor exported the resumed turn's spans"
    metrics = [line for line in second.log.read_text().splitlines() if line.startswith('{"resource_metrics"')]
    assert metrics and "actors.turns" in metrics[-1], "and its metrics, at the latest when it stopped"
    for span in exported:
        assert int(span["context"]["trace_id"], 16) == send.context.trace_id
        assert int(span["parent_id"], 16) == send.context.span_id
        assert span["attributes"]["resumed"] is True


def _turn_spans(log: Path) -> list[dict]:  # type: ignore[type-arg]
    lines = log.read_text().splitlines() if log.exists() else []
    exported = [json.loads(line) for line in lines if line.startswith("{")]  # spans and metrics
    return [s for s in exported if "context" in s and s["name"].startswith("turn Traced")]


async def _waiting(client, ref) -> bool:  # type: ignore[no-untyped-def]
    view = await client.inspect(ref)
    return view.turn is not None and view.turn.status == "waiting"


async def _in_slow_step(client, ref) -> bool:  # type: ignore[no-untyped-def]
    view = await client.inspect(ref)
    return view.turn is not None and view.turn.journal == ["ask Helper/crash:Note"]


async def _approved(client, ref) -> bool:  # type: ignore[no-untyped-def]
    state = await client.state(ref)
    return state is not None and state.approved


async def test_metrics_count_turns_time_them_and_watch_the_worker(connect, start_worker) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from .apps import Add, Counter, Get
    from .apps import app as counter_app

    reader = InMemoryMetricReader()
    telemetry.use(None, MeterProvider(metric_readers=[reader]))
    try:
        await start_worker(counter_app)
        async with connect(app=counter_app) as client:
            for _ in range(5):
                await client.send(Counter.ref("m"), Add())
            await client.ask(Counter.ref("m"), Get(), timeout=10)
            await client.store.append(0, b"not an envelope")
            await eventually(lambda: _dead(client), timeout=10)
            data = reader.get_metrics_data()
    finally:
        telemetry.use(None)
    found = {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    turns = sum(
        p.value for p in found["actors.turns"].data.data_points if p.attributes["actor.type"] == "Counter"
    )
    assert turns == 6
    [durations] = found["actors.turn.duration"].data.data_points
    assert durations.count == 6
    [waits] = found["actors.message.queue_wait"].data.data_points
    assert waits.count == 6 and waits.min >= 0
    assert sum(p.value for p in found["actors.dead_letters"].data.data_points) == 1
    [leases] = found["actors.leases.held"].data.data_points
    assert leases.value == 4
    assert {p.attributes["shard"] for p in found["actors.shard.inflight"].data.data_points} == {0, 1, 2, 3}
    assert {p.attributes["shard"] for p in found["actors.shard.lag"].data.data_points} == {0, 1, 2, 3}


async def _dead(client) -> bool:  # type: ignore[no-untyped-def]
    return len(await client.store.dead_letters(0, 10)) == 1


async def test_actors_top_shows_throughput_latency_workers_shards_and_open_turns(
    connect, start_worker, redis_url, namespace
) -> None:
    from .apps import Add, Counter, Get
    from .apps import app as counter_app

    both = actors.App(*counter_app.actor_types, *app.actor_types)
    worker = await start_worker(both)
    async with connect(app=both) as client:
        await client.send_many([(Counter.ref(f"c{n}"), Add()) for n in range(200)])
        await client.ask(Counter.ref("c0"), Get(), timeout=10)
        await client.send(Traced.ref("top"), Start(request_id="r9"))
        await eventually(lambda: _waiting(client, Traced.ref("top")), timeout=20)
        await asyncio.sleep(1.5)  # a heartbeat carries the latest turn figures
        text = ok(await actors_cli("top", "--frames", "2", "--interval", "0.2",
                                   "--redis", redis_url, "--namespace", namespace))  # fmt: skip
    frames = text.split("actors top - namespace ")
    assert len(frames) == 3 and frames[1].startswith(namespace)
    last = frames[2]
    assert "handled 0/s" in last, "nothing new between the two frames"
    assert "open turns 1" in last
    [row] = [line.split() for line in last.splitlines() if line.startswith(worker.id)]
    assert int(row[1]) == 4 and int(row[2]) >= 203, "shards held, turns done"
    assert float(row[3]) > 0 and float(row[4]) >= float(row[3]), "p50 and p99 turn times"

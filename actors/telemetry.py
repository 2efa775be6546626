"""OpenTelemetry traces and metrics, off unless configured.

Turn it on with the standard environment (``OTEL_TRACES_EXPORTER=console|otlp``,
``OTEL_METRICS_EXPORTER``, ``OTEL_SERVICE_NAME``, ``OTEL_EXPORTER_OTLP_ENDPOINT``...),
with ``actors worker --otel console``, or in code with ``actors.telemetry.use(tracer_provider,
meter_provider)``. Off, no span is created and no instrument is touched: each hook is one
flag test.

The W3C trace context travels in each envelope's headers (``traceparent``), so a turn's
span is the child of the span that sent its message; a turn resumed after a sleep, a
wait or a crash runs from the same envelope, so it joins the trace it started in, again
as a child of that send.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from opentelemetry import metrics, propagate, trace
from opentelemetry.metrics import Observation
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from .errors import ConfigurationError

TRACER_NAME = "actors"
_tracer: trace.Tracer | None = None
_instruments: _Instruments | None = None


class _Instruments:
    def __init__(self, meter: metrics.Meter) -> None:
        self.turns = meter.create_counter(
            "actors.turns", description="turn attempts (first runs, retries, resumes), by type and outcome"
        )
        self.turn_latency = meter.create_histogram(
            "actors.turn.duration", unit="ms", description="a turn attempt, its limiter waits included"
        )
        self.queue_wait = meter.create_histogram(
            "actors.message.queue_wait", unit="ms", description="from send to the start of its turn"
        )
        self.dead_letters = meter.create_counter("actors.dead_letters", description="messages dead-lettered")
        self.timer_lateness = meter.create_histogram(
            "actors.timer.lateness", unit="ms", description="how long after its due time a timer fired"
        )
        self.limiter_wait = meter.create_histogram(
            "actors.limiter.wait", unit="ms", description="time spent waiting for a limiter"
        )
        self.timers_fired = meter.create_counter("actors.timers.fired", description="timers taken when due")
        self.meter = meter


def observe_worker(
    leases: Callable[[], int], inflight: Callable[[], dict[int, int]], lag: Callable[[], dict[int, int]]
) -> None:
    """Gauges read from a worker when metrics are collected: leases held and, per shard, the
    messages read but not yet finished, and the mailbox lag (entries not yet read, as of the
    shard's last chores, every ``trim_interval``)."""
    if _instruments is None:
        return
    meter = _instruments.meter
    meter.create_observable_gauge(
        "actors.leases.held", callbacks=[lambda _: [Observation(leases())]], description="shard leases held"
    )
    meter.create_observable_gauge(
        "actors.shard.inflight",
        callbacks=[lambda _: [Observation(n, {"shard": s}) for s, n in inflight().items()]],
        description="messages read but not yet finished, per shard",
    )
    meter.create_observable_gauge(
        "actors.shard.lag",
        callbacks=[lambda _: [Observation(n, {"shard": s}) for s, n in lag().items()]],
        description="inbox entries not yet read, per shard",
    )


def use(
    tracer_provider: trace.TracerProvider | None = None, meter_provider: metrics.MeterProvider | None = None
) -> None:
    """Turn tracing and/or metrics on with these providers (None leaves that signal off)."""
    global _tracer, _instruments
    _tracer = None if tracer_provider is None else tracer_provider.get_tracer(TRACER_NAME)
    _instruments = None if meter_provider is None else _Instruments(meter_provider.get_meter(TRACER_NAME))


def configure(exporter: str | None = None) -> bool:
    """Set up the SDK from ``exporter`` (``console``, ``otlp`` or ``none``) or, if None, from
    ``OTEL_TRACES_EXPORTER``; returns whether tracing is on."""
    choice = (exporter or os.environ.get("OTEL_TRACES_EXPORTER") or "none").lower()
    if choice == "none":
        use(None, None)
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    span_exporter: SpanExporter
    if choice == "console":
        span_exporter = ConsoleSpanExporter(out=sys.stdout, formatter=lambda s: s.to_json(indent=None) + "\n")
    elif choice == "otlp":
        try:
            # An optional package (checked for just below), absent from the dev environment.
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found, unused-ignore]
                OTLPSpanExporter,
            )
        except ImportError as exc:
            raise ConfigurationError(
                "OTLP export needs the exporter package: pip install opentelemetry-exporter-otlp-proto-http"
            ) from exc
        span_exporter = OTLPSpanExporter()
    else:
        raise ConfigurationError(f"unknown trace exporter {choice!r} (use console, otlp or none)")
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "actors")})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)
    use(provider, _meter_provider(choice, resource))
    return True


def _meter_provider(traces: str, resource: Any) -> metrics.MeterProvider | None:
    """Metrics go where ``OTEL_METRICS_EXPORTER`` says (default: where traces go)."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        ConsoleMetricExporter,
        MetricExporter,
        PeriodicExportingMetricReader,
    )

    choice = (os.environ.get("OTEL_METRICS_EXPORTER") or traces).lower()
    exporter: MetricExporter
    if choice == "none":
        return None
    if choice == "console":
        exporter = ConsoleMetricExporter(out=sys.stdout, formatter=lambda m: m.to_json(indent=None) + "\n")
    elif choice == "otlp":
        try:  # the optional exporter package, as for traces above
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (  # type: ignore[import-not-found, unused-ignore]
                OTLPMetricExporter,
            )
        except ImportError as exc:
            raise ConfigurationError(
                "OTLP export needs the exporter package: pip install opentelemetry-exporter-otlp-proto-http"
            ) from exc

        exporter = OTLPMetricExporter()
    else:
        raise ValueError(f"unknown metrics exporter {choice!r} (use console, otlp or none)")
    provider = MeterProvider(resource=resource, metric_readers=[PeriodicExportingMetricReader(exporter)])
    metrics.set_meter_provider(provider)
    return provider


def shutdown() -> None:
    """Flush what the SDK still holds (at process exit)."""
    for provider in (trace.get_tracer_provider(), metrics.get_meter_provider()):
        if hasattr(provider, "shutdown"):
            provider.shutdown()


def metering() -> bool:
    return _instruments is not None


def tracing() -> bool:
    return _tracer is not None


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Add the current trace context to a message's headers (when tracing)."""
    if _tracer is not None:
        propagate.inject(headers)
    return headers


_OFF: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
"""What ``span`` returns when tracing is off: one shared, stateless context manager, so an
untraced send or turn builds no generator-based one (a few µs each)."""


def span(
    name: str,
    attributes: Mapping[str, Any] | None = None,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    parent: Mapping[str, str] | None = None,
) -> contextlib.AbstractContextManager[Span | None]:
    """A span, current inside the block (None when tracing is off). ``parent``: the headers
    of a message, whose trace context becomes this span's parent."""
    if _tracer is None:
        return _OFF
    context = propagate.extract(parent) if parent is not None else None
    return _tracer.start_as_current_span(name, context=context, kind=kind, attributes=attributes)


def failed(current: Span | None, exc: BaseException) -> None:
    if current is not None:
        current.record_exception(exc)
        current.set_status(Status(StatusCode.ERROR, str(exc)))


def annotate(key: str, value: Any) -> None:
    """An attribute on the current span (when tracing)."""
    if _tracer is not None:
        trace.get_current_span().set_attribute(key, value)


def waited(limiter: str, ms: float) -> None:
    """A step waited ``ms`` for a limiter: on the current span, and in the histogram."""
    if _tracer is not None:
        trace.get_current_span().set_attribute("limiter.wait_ms", ms)
    record("limiter_wait", ms, {"limiter": limiter})


def count_turn(actor_type: str, outcome: str, duration_ms: float) -> None:
    if _instruments is not None:
        attrs = {"actor.type": actor_type, "outcome": outcome}
        _instruments.turns.add(1, attrs)
        _instruments.turn_latency.record(duration_ms, attrs)


def record(instrument: str, value: float, attributes: Mapping[str, Any] | None = None) -> None:
    """Record on one of the histograms or counters by attribute name (when metrics are on)."""
    if _instruments is not None:
        target = getattr(_instruments, instrument)
        if hasattr(target, "record"):
            target.record(value, attributes)
        else:
            target.add(value, attributes)

"""``actors worker`` with tracing on (traces only, no metrics) and a span exporter that does
nothing, for ``benchmarks.latency``'s tracing-overhead measurement.

    python -m benchmarks.traced_worker worker MODULE:app [worker options]

``BENCH_SPAN_PROCESSOR`` chooses what is behind the tracer provider:

* ``batch`` (default): a ``BatchSpanProcessor`` over an exporter whose ``export()`` only
  counts the spans: the cost of making spans and batching them, without serialising or I/O;
* ``none``: no span processor at all: only the cost of making spans.

At exit one line ``traced_worker: processor=... spans exported=N`` goes to stderr.

``actors worker`` calls ``telemetry.configure(args.otel)``, which would turn tracing off again
(no ``--otel``, no ``OTEL_TRACES_EXPORTER``); so ``configure`` is replaced, in this process only,
by a function that installs the provider above.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from actors import cli, telemetry

PROCESSOR_ENV = "BENCH_SPAN_PROCESSOR"


class CountingExporter(SpanExporter):
    """Accepts every batch and keeps only the number of spans."""

    def __init__(self) -> None:
        self.exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.exported += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        print(f"traced_worker: processor=batch spans exported={self.exported}", file=sys.stderr, flush=True)


def install(exporter: str | None = None) -> bool:
    """Stands in for ``telemetry.configure``: tracing on, with the provider ``PROCESSOR_ENV`` says."""
    processor = os.environ.get(PROCESSOR_ENV, "batch")
    provider = TracerProvider()
    if processor == "batch":
        provider.add_span_processor(BatchSpanProcessor(CountingExporter()))
    elif processor != "none":
        raise SystemExit(f"{PROCESSOR_ENV} must be batch or none, not {processor!r}")
    trace.set_tracer_provider(provider)  # so telemetry.shutdown() flushes it at exit
    telemetry.use(provider, None)  # traces only, like --otel console with OTEL_METRICS_EXPORTER=none
    return True


if __name__ == "__main__":
    telemetry.configure = install
    sys.exit(cli.main())

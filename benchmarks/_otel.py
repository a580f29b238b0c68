"""The OpenTelemetry SDK as the README recommends for a high-throughput service, and a
dummy OTLP/HTTP receiver to export to (the tracing section)."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased

METRIC_INTERVAL_MS = 5000
# The README's "Tracing at high throughput" settings: batches of 2,048 spans (the SDK
# default is 512) in a queue of 8,192 (default 2,048), so a burst is not dropped; and,
# for the sampled variant, the ratio of runs traced.
MAX_QUEUE = 8192
MAX_BATCH = 2048
SAMPLE_RATIO = 0.05


def ratio_sampler() -> Sampler:
    """The README's sampler: a run's start span is sampled at SAMPLE_RATIO, and every
    span under it (its attempts, in any process) follows its decision."""
    return ParentBased(TraceIdRatioBased(SAMPLE_RATIO))


class _Counting(SpanExporter):
    """Counts what the wrapped exporter exported, and its failed exports."""

    def __init__(self, inner: SpanExporter, counts: dict[str, int]) -> None:
        self.inner = inner
        self.counts = counts

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = self.inner.export(spans)
        if result is SpanExportResult.SUCCESS:
            self.counts["exported"] += len(spans)
        else:
            self.counts["export_failures"] += 1
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class _Ended(SpanProcessor):
    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts

    def on_end(self, span: ReadableSpan) -> None:
        self.counts["ended"] += 1


class Tracing:
    """A TracerProvider (``sampler``: the SDK default, ParentBased(ALWAYS_ON), records
    every span) with a BatchSpanProcessor (queue MAX_QUEUE, batches of MAX_BATCH, every
    5 s) exporting over OTLP/HTTP, and a MeterProvider with a
    PeriodicExportingMetricReader over OTLP/HTTP. Counting wrappers tell exported from
    dropped spans. Providers are process-long objects: one per process (and, in the
    benchmark process, one per variant of the client)."""

    def __init__(
        self,
        endpoint: str,
        metric_interval_ms: float = METRIC_INTERVAL_MS,
        sampler: Sampler | None = None,
    ) -> None:
        self.counts = {"ended": 0, "exported": 0, "export_failures": 0}
        self.tracer_provider = TracerProvider(sampler=sampler)
        self.tracer_provider.add_span_processor(_Ended(self.counts))
        exporter = OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces")
        self.tracer_provider.add_span_processor(
            BatchSpanProcessor(
                _Counting(exporter, self.counts),
                max_queue_size=MAX_QUEUE,
                max_export_batch_size=MAX_BATCH,
            )
        )
        reader = PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=f"{endpoint}/v1/metrics"),
            export_interval_millis=metric_interval_ms,
        )
        self.meter_provider = MeterProvider(metric_readers=[reader])

    def flush(self) -> dict[str, int]:
        self.tracer_provider.force_flush()
        self.meter_provider.force_flush()
        return dict(self.counts)

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


class _Discard(BaseHTTPRequestHandler):
    """Accepts any OTLP/HTTP export and answers 200 with an empty body."""

    protocol_version = "HTTP/1.1"  # keep-alive, as a real collector

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def receiver_main() -> None:
    """Serve on 127.0.0.1 (a free port, printed as ``{"port": N}``) until stdin closes."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Discard)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    sys.stdout.write(json.dumps({"port": server.server_address[1]}) + "\n")
    sys.stdout.flush()
    sys.stdin.read()  # until the parent closes our stdin (or dies)
    server.shutdown()

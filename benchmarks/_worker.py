"""A worker process of benchmarks/run.py, driven over stdin/stdout (one JSON object a line).

    python benchmarks/_worker.py            # a worker: saga orchestrator or plain queue
    python benchmarks/_worker.py receiver   # a dummy OTLP/HTTP receiver on 127.0.0.1

Worker commands (each answered by one line; errors by ``{"event": "error", ...}``):

- ``{"cmd": "open", "kind": "saga", "dsn": ..., "saga": "noop"|"compensate"|"gate",
  "concurrency": C, "tracing": null | {"endpoint": ..., "metric_interval_ms": ...},
  "gate_target": N}`` opens ``saga.Orchestrator(dsn, sagas=[...], concurrency=C,
  migrate=False)`` (defaults otherwise) -> ``{"event": "opened"}``. With the ``gate``
  saga, the first step of every run waits until ``release``; once ``gate_target`` steps
  wait, the worker says ``{"event": "gate_full"}`` by itself.
- ``{"cmd": "open", "kind": "queue", "dsn": ..., "concurrency": C}`` starts C tasks of the
  hand-written SKIP LOCKED queue (see QUEUE_CLAIM / QUEUE_COMPLETE) -> ``opened``.
- ``{"cmd": "release"}`` -> ``{"event": "released"}``.
- ``{"cmd": "close"}`` closes what is open -> ``{"event": "closed", "spans": {...},
  "calls": {...}}`` (spans: exported/dropped counts when traced; calls: saga Store calls
  when opened with ``"count_calls": true``).

End of input closes everything and exits. structlog and logging are set to WARNING; both
log to stderr (stdout is the protocol).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import asyncpg
from _common import SAGAS, build_gate_saga, configure_logging

import saga

# The "no framework" reference: a jobs table, one row per step. Claim one pending job
# (SKIP LOCKED), run it, then complete it and insert the chain's next step in one
# statement: one claim commit and one completion commit per step.
QUEUE_DDL = """
CREATE TABLE jobs (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    chain       bigint NOT NULL,
    step        integer NOT NULL,
    status      text NOT NULL DEFAULT 'pending',
    payload     jsonb NOT NULL,
    result      jsonb,
    worker      text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
CREATE INDEX jobs_pending ON jobs (id) WHERE status = 'pending';
"""
QUEUE_START = "INSERT INTO jobs (chain, step, payload) VALUES ($1, 1, $2::jsonb)"
QUEUE_CLAIM = """
UPDATE jobs SET status = 'running', worker = $1
WHERE id = (SELECT id FROM jobs WHERE status = 'pending'
            ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING id, chain, step, payload::text AS payload
"""
QUEUE_COMPLETE = """
WITH done AS (
    UPDATE jobs SET status = 'done', result = $2::jsonb, finished_at = now() WHERE id = $1
)
INSERT INTO jobs (chain, step, payload) SELECT $3, $4 + 1, $5::jsonb WHERE $4 < 3
"""
QUEUE_STEPS = 3
QUEUE_IDLE_SLEEP = (0.005, 0.05)  # an idle task polls again after 5 ms, doubling to 50 ms


async def no_reset(_conn: asyncpg.Connection) -> None:
    """Pool reset: nothing (as saga's own pool; asyncpg's default reset is a round trip)."""


def emit(**message: Any) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


class Tracing:
    """The OpenTelemetry SDK as an application would set it up: a TracerProvider with a
    BatchSpanProcessor (SDK defaults: queue 2048, batch 512, every 5 s) exporting over
    OTLP/HTTP, and a MeterProvider with a PeriodicExportingMetricReader over OTLP/HTTP.
    Counting wrappers tell exported from dropped spans."""

    def __init__(self, endpoint: str, metric_interval_ms: float) -> None:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )

        counts = self.counts = {"ended": 0, "exported": 0, "export_failures": 0}

        class Counting(SpanExporter):
            def __init__(self, inner: SpanExporter) -> None:
                self.inner = inner

            def export(self, spans: Any) -> SpanExportResult:
                result = self.inner.export(spans)
                if result is SpanExportResult.SUCCESS:
                    counts["exported"] += len(spans)
                else:
                    counts["export_failures"] += 1
                return result

            def shutdown(self) -> None:
                self.inner.shutdown()

            def force_flush(self, timeout_millis: int = 30000) -> bool:
                return self.inner.force_flush(timeout_millis)

        class Ended(SpanProcessor):
            def on_end(self, span: ReadableSpan) -> None:
                counts["ended"] += 1

        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(Ended())
        self.tracer_provider.add_span_processor(
            BatchSpanProcessor(Counting(OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces")))
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


_tracing: Tracing | None = None

# Store calls counted while a window runs with "count_calls" (the profile rows): how many
# claims, transitions, heartbeats, ... a run costs, and how many items the claims returned.
CALLS: dict[str, int] = {}
COUNTED = (
    "start_run",
    "claim",
    "transition",
    "heartbeat",
    "release",
    "census",
    "count_unclaimable",
    "watch_run",
    "get_run",
    "notify_work",
)


def count_store_calls() -> None:
    """Wrap saga's Store methods (once per process) to count calls; benchmark-only."""
    from saga._store import Store

    if getattr(Store, "_bench_counted", False):
        return
    for name in COUNTED:
        original = getattr(Store, name)

        def wrap(original: Any = original, name: str = name) -> Any:
            async def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
                result = await original(self, *args, **kwargs)
                CALLS[name] = CALLS.get(name, 0) + 1
                if name == "claim":
                    CALLS["claimed items"] = CALLS.get("claimed items", 0) + len(result)
                    if not result:
                        CALLS["empty claims"] = CALLS.get("empty claims", 0) + 1
                return result

            return counted

        setattr(Store, name, wrap())
    Store._bench_counted = True  # type: ignore[attr-defined]


def tracing_for(spec: dict[str, Any] | None) -> Tracing | None:
    """One SDK setup per process (providers are process-long objects)."""
    global _tracing
    if spec is None:
        return None
    if _tracing is None:
        _tracing = Tracing(spec["endpoint"], spec["metric_interval_ms"])
    return _tracing


async def queue_task(pool: asyncpg.Pool, worker: str, stop: asyncio.Event) -> None:
    idle = QUEUE_IDLE_SLEEP[0]
    while not stop.is_set():
        job = await pool.fetchrow(QUEUE_CLAIM, worker)
        if job is None:
            await asyncio.sleep(idle)
            idle = min(idle * 2, QUEUE_IDLE_SLEEP[1])
            continue
        idle = QUEUE_IDLE_SLEEP[0]
        result = "1"  # the no-op step
        await pool.execute(
            QUEUE_COMPLETE, job["id"], result, job["chain"], job["step"], job["payload"]
        )


class Worker:
    def __init__(self) -> None:
        self.stack: contextlib.AsyncExitStack | None = None
        self.gate = asyncio.Event()
        self.waiting = 0
        self.gate_target = 0
        self.tracing: Tracing | None = None
        self.spans_before: dict[str, int] = {}

    async def _gate(self) -> None:
        self.waiting += 1
        if self.waiting == self.gate_target:
            emit(event="gate_full", waiting=self.waiting)
        await self.gate.wait()

    async def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        name = cmd["cmd"]
        if name == "open":
            if self.stack is not None:
                raise RuntimeError("already open")
            stack = contextlib.AsyncExitStack()
            try:
                if cmd["kind"] == "saga":
                    await self._open_saga(stack, cmd)
                else:
                    await self._open_queue(stack, cmd)
            except BaseException:
                await stack.aclose()
                raise
            self.stack = stack
            return {"event": "opened"}
        if name == "release":
            self.gate.set()
            return {"event": "released"}
        if name == "close":
            await self.close()
            spans: dict[str, int] = {}
            if self.tracing is not None:
                after = self.tracing.flush()
                spans = {k: v - self.spans_before.get(k, 0) for k, v in after.items()}
                self.tracing = None
            calls = dict(CALLS)
            CALLS.clear()
            return {"event": "closed", "spans": spans, "calls": calls}
        raise ValueError(f"unknown command {name!r}")

    async def _open_saga(self, stack: contextlib.AsyncExitStack, cmd: dict[str, Any]) -> None:
        if cmd["saga"] == "gate":
            self.gate, self.waiting = asyncio.Event(), 0
            self.gate_target = int(cmd.get("gate_target") or 0)
            definition = build_gate_saga(self._gate)
        else:
            definition = SAGAS[cmd["saga"]]()
        CALLS.clear()
        if cmd.get("count_calls"):
            count_store_calls()
        self.tracing = tracing_for(cmd.get("tracing"))
        providers: dict[str, Any] = {}
        if self.tracing is not None:
            self.spans_before = dict(self.tracing.counts)
            providers = {
                "tracer_provider": self.tracing.tracer_provider,
                "meter_provider": self.tracing.meter_provider,
            }
        orch = saga.Orchestrator(
            cmd["dsn"],
            sagas=[definition],
            concurrency=int(cmd["concurrency"]),
            migrate=False,
            **providers,
        )
        await stack.enter_async_context(orch)

    async def _open_queue(self, stack: contextlib.AsyncExitStack, cmd: dict[str, Any]) -> None:
        concurrency = int(cmd["concurrency"])
        pool = await asyncpg.create_pool(
            cmd["dsn"], min_size=1, max_size=max(4, min(concurrency + 2, 20)), reset=no_reset
        )
        stack.push_async_callback(pool.close)
        stop = asyncio.Event()
        tasks = [asyncio.create_task(queue_task(pool, f"q{i}", stop)) for i in range(concurrency)]

        async def finish() -> None:
            stop.set()
            await asyncio.gather(*tasks)

        stack.push_async_callback(finish)

    async def close(self) -> None:
        stack, self.stack = self.stack, None
        if stack is not None:
            self.gate.set()
            await stack.aclose()


async def worker_main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    worker = Worker()
    try:
        while line := await reader.readline():
            cmd = json.loads(line)
            try:
                reply = await worker.handle(cmd)
            except Exception as exc:
                emit(event="error", message=f"{type(exc).__name__}: {exc}")
            else:
                emit(**reply)
    finally:
        await worker.close()


class _Discard(BaseHTTPRequestHandler):
    """Accepts any OTLP/HTTP export and answers 200 with an empty body."""

    protocol_version = "HTTP/1.1"  # keep-alive, as a real collector

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def receiver_main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Discard)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    emit(port=server.server_address[1])
    sys.stdin.read()  # until the parent closes our stdin (or dies)
    server.shutdown()


if __name__ == "__main__":
    configure_logging()
    if sys.argv[1:] == ["receiver"]:
        receiver_main()
    else:
        asyncio.run(worker_main())

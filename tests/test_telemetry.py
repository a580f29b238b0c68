"""OpenTelemetry: one trace per run across orchestrators, metrics that move as documented,
the OTLP wire path, and no payloads in spans."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import anyio
import asyncpg
import pytest
from opentelemetry.metrics import CallbackOptions
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import StatusCode
from pydantic import BaseModel

import saga
from saga._tally import LIMIT, OVERFLOW, Tally
from saga.testing import Faults, advance
from tests._sagas import FAST, parked_saga, permanent, small_saga, transient
from tests.conftest import OrchestratorFactory

SECRET = "sentinel-7777-never-in-spans"


class Order(BaseModel):
    order_id: str


class Tracing:
    def __init__(self, sampler: Sampler | None = None, ids: IdGenerator | None = None) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider(sampler=sampler, id_generator=ids)
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())


def build(fail: bool = False, name: str = "traced") -> saga.Saga[Order]:
    """reserve (compensated; its first attempt fails), then charge (fails for good when
    ``fail``); both errors carry SECRET, which must stay out of spans."""
    return small_saga(
        name,
        ["reserve", "charge"],
        input=Order,
        compensate={"reserve"},
        fail={
            "reserve": transient(1, ConnectionError, f"flaky {SECRET}"),
            **({"charge": permanent(f"declined {SECRET}")} if fail else {}),
        },
        result={"reserve": lambda ctx: f"r-{ctx.input.order_id}", "charge": lambda _: "c"},
        retry={"reserve": FAST},
        undo_retry=None,
    )


def by_name(spans: list[ReadableSpan]) -> dict[str, list[ReadableSpan]]:
    out: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        out.setdefault(span.name, []).append(span)
    return out


async def test_completed_run_is_one_trace_under_the_caller(
    orchestrator: OrchestratorFactory,
) -> None:
    """start() inside a request span records a child span; every step attempt (retries
    as separate spans carrying their attempt number) is a child of the start span in the
    same trace; a failed attempt records its error type, an ``exception`` event and an
    error status; the last attempt carries the run's outcome as an attribute (no event:
    a successful attempt records no event at all)."""
    tracing = Tracing()
    s = build()
    await orchestrator(s, tracer_provider=tracing.provider)
    tracer = tracing.provider.get_tracer("app")
    with tracer.start_as_current_span("POST /orders") as request:
        run = await s.start(Order(order_id=SECRET))
    assert await run.result(timeout=10) == "c"
    with anyio.fail_after(5):
        while "saga.step charge" not in by_name(tracing.spans()):  # noqa: ASYNC110
            await anyio.sleep(0.01)
    spans = by_name(tracing.spans())
    [start] = spans["saga.start traced"]
    assert start.parent is not None
    assert start.parent.span_id == request.get_span_context().span_id
    assert start.attributes is not None
    assert start.attributes["saga.run.id"] == str(run.id)
    reserve = sorted(spans["saga.step reserve"], key=lambda sp: sp.start_time or 0)
    assert [sp.attributes and sp.attributes["saga.attempt"] for sp in reserve] == [1, 2]
    assert [sp.attributes and sp.attributes["saga.outcome"] for sp in reserve] == [
        "retry",
        "success",
    ]
    assert reserve[0].status.status_code is StatusCode.ERROR
    assert reserve[0].attributes is not None
    assert reserve[0].attributes["error.type"] == "ConnectionError"
    assert [event.name for event in reserve[0].events] == ["exception"]
    [charge] = spans["saga.step charge"]
    assert charge.attributes is not None
    assert charge.attributes["saga.run.status"] == "completed"
    assert not charge.events
    assert not reserve[1].events
    trace_id = request.get_span_context().trace_id
    for span in [*reserve, charge]:
        assert span.context is not None
        assert span.context.trace_id == trace_id
        assert span.parent is not None
        assert span.parent.span_id == start.context.span_id if start.context else False
    assert_no_secret(tracing.spans())


async def test_compensated_run_traced_across_orchestrators(
    orchestrator: OrchestratorFactory,
) -> None:
    """A run started by a client orchestrator and executed (forward and compensation) by
    another, with its own tracer provider as another process would have, still forms one
    trace: the worker's spans are children of the client's start span."""
    client_tracing, worker_tracing = Tracing(), Tracing()
    definition = build(fail=True)
    client = await orchestrator(definition, concurrency=0, tracer_provider=client_tracing.provider)
    await orchestrator(build(fail=True), tracer_provider=worker_tracing.provider)
    run = await client.start(definition, Order(order_id="o-2"))
    with pytest.raises(saga.RunCompensatedError):
        await run.result(timeout=10)
    with anyio.fail_after(5):
        while "saga.compensate reserve" not in by_name(worker_tracing.spans()):  # noqa: ASYNC110
            await anyio.sleep(0.01)
    [start] = client_tracing.spans()
    assert start.context is not None
    worker_spans = by_name(worker_tracing.spans())
    assert set(worker_spans) == {"saga.step reserve", "saga.step charge", "saga.compensate reserve"}
    for spans in worker_spans.values():
        for span in spans:
            assert span.context is not None
            assert span.context.trace_id == start.context.trace_id
            assert span.parent is not None
            assert span.parent.span_id == start.context.span_id
    [charge] = worker_spans["saga.step charge"]
    assert charge.attributes is not None
    assert charge.attributes["saga.outcome"] == "failure"
    assert charge.attributes["error.type"] == "saga.PermanentError"
    [undo] = worker_spans["saga.compensate reserve"]
    assert undo.attributes is not None
    assert undo.attributes["saga.kind"] == "compensation"
    assert undo.attributes["saga.run.status"] == "compensated"
    assert_no_secret([*client_tracing.spans(), *worker_tracing.spans()])


class _OneInTwo(IdGenerator):
    """Trace ids alternately sampled and not by any TraceIdRatioBased: it decides on the
    low 64 bits (sampled below ratio x 2**64), here 1, then all ones."""

    def __init__(self) -> None:
        self.made = 0
        self.spans = RandomIdGenerator()

    def generate_span_id(self) -> int:
        return self.spans.generate_span_id()

    def generate_trace_id(self) -> int:
        self.made += 1
        return (self.made << 64) | (1 if self.made % 2 else (1 << 64) - 1)


async def test_attempt_spans_follow_the_start_spans_sampling(
    orchestrator: OrchestratorFactory,
) -> None:
    """The README's high-throughput setup: with ParentBased(TraceIdRatioBased(0.05)) in
    the process that calls start(), a run whose start span is sampled is traced whole by
    another orchestrator (its own provider, the SDK's default sampler): every attempt,
    the retry included, in the start span's trace. A run whose start span is not sampled
    exports no span from either process. Metrics count both runs."""
    client_tracing = Tracing(ParentBased(TraceIdRatioBased(0.05)), _OneInTwo())
    worker_tracing = Tracing()
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    definition = build()
    client = await orchestrator(definition, concurrency=0, tracer_provider=client_tracing.provider)
    await orchestrator(build(), tracer_provider=worker_tracing.provider, meter_provider=meters)
    sampled = await client.start(definition, Order(order_id="sampled"))
    unsampled = await client.start(definition, Order(order_id="unsampled"))
    for run in (sampled, unsampled):
        assert await run.result(timeout=10) == "c"
    with anyio.fail_after(5):  # counted once the attempt's span has ended
        while total(points(reader), "saga.step.attempts") < 6:  # noqa: ASYNC110
            await anyio.sleep(0.01)
    [start] = client_tracing.spans()
    assert start.attributes is not None
    assert start.attributes["saga.run.id"] == str(sampled.id)
    assert start.context is not None
    attempts = worker_tracing.spans()
    names = sorted(span.name for span in attempts)
    assert names == ["saga.step charge", "saga.step reserve", "saga.step reserve"]
    for span in attempts:
        assert span.attributes is not None
        assert span.attributes["saga.run.id"] == str(sampled.id)
        assert span.context is not None
        assert span.context.trace_id == start.context.trace_id
        assert span.parent is not None
        assert span.parent.span_id == start.context.span_id
    assert total(points(reader), "saga.runs.completed") == 2


def test_counters_are_cumulative_per_attribute_set() -> None:
    """saga's counters are counted in the process and reported by observable counters:
    one cumulative sum per attribute set (in whatever order its attributes were given),
    still counting across collections; past the SDK's own limit of attribute sets per
    metric, the rest is counted under its overflow attribute."""
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    tally = Tally.observed(meter, "test.count", "{thing}", "Things.")
    tally.add(1, {"saga.name": "a", "saga.step": "b"})
    tally.add(2, {"saga.step": "b", "saga.name": "a"})
    assert points(reader)["test.count"] == [({"saga.name": "a", "saga.step": "b"}, 3)]
    tally.add(1, {"saga.name": "a", "saga.step": "b"})
    assert points(reader)["test.count"] == [({"saga.name": "a", "saga.step": "b"}, 4)]
    for i in range(LIMIT + 5):
        tally.add(1, {"i": i})
    observed = {tuple(o.attributes.items()): o.value for o in tally.observe(CallbackOptions())}
    assert len(observed) == LIMIT + 1
    assert observed[OVERFLOW] == 6


def assert_no_secret(spans: list[ReadableSpan]) -> None:
    texts = [repr(dict(span.attributes or {})) for span in spans]
    texts += [repr(dict(event.attributes or {})) for span in spans for event in span.events]
    texts += [span.status.description or "" for span in spans]
    assert spans
    assert not [t for t in texts if SECRET in t]


def points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict[str, Any], Any]]]:
    data = reader.get_metrics_data()
    out: dict[str, list[tuple[dict[str, Any], Any]]] = {}
    if data is None:  # nothing recorded or observed yet
        return out
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    value = getattr(point, "value", None)
                    if value is None:
                        value = point.count  # type: ignore[union-attr]
                    out.setdefault(metric.name, []).append((dict(point.attributes or {}), value))
    return out


def total(found: dict[str, list[tuple[dict[str, Any], Any]]], name: str, **attrs: Any) -> Any:
    return sum(
        value
        for point_attrs, value in found.get(name, [])
        if all(point_attrs.get(k) == v for k, v in attrs.items())
    )


async def test_metrics_move_as_documented(orchestrator: OrchestratorFactory) -> None:
    """Counters and histograms for runs, attempts, durations, expired leases and refused
    writes, and the database-wide gauges, each move as the README documents."""
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    s = build()
    failing = build(fail=True, name="declined")
    faults = Faults()
    faults.crash_after("charge", run_id=None)
    worker = await orchestrator(s, meter_provider=meters, census_interval=0.1, lease_seconds=0.5)
    faults.attach(worker)
    ok = await s.start(Order(order_id="a"))
    assert await ok.result(timeout=15) == "c"

    other = await orchestrator(failing, meter_provider=meters, census_interval=0.1)
    bad = await other.start(failing, Order(order_id="b"))
    with pytest.raises(saga.RunCompensatedError):
        await bad.result(timeout=10)
    # The worker counts a run's end just after its commit, which may wake result() first.
    with anyio.fail_after(5):
        while total(points(reader), "saga.runs.compensated") < 1:  # noqa: ASYNC110
            await anyio.sleep(0.02)

    found = points(reader)
    assert total(found, "saga.runs.started", **{"saga.name": "traced"}) == 1
    assert total(found, "saga.runs.started", **{"saga.name": "declined"}) == 1
    assert total(found, "saga.runs.completed") == 1
    assert total(found, "saga.runs.compensated") == 1
    assert total(found, "saga.step.attempts", **{"saga.outcome": "retry"}) == 2
    assert total(found, "saga.step.attempts", **{"saga.outcome": "failure"}) == 1
    crashed = {"saga.step": "charge", "saga.outcome": "interrupted"}
    assert total(found, "saga.step.attempts", **crashed) == 1
    assert total(found, "saga.compensation.attempts", **{"saga.outcome": "success"}) == 1
    assert total(found, "saga.step.duration") >= 5  # histogram: number of attempts timed
    assert total(found, "saga.run.duration") == 2
    assert total(found, "saga.leases.expired") == 1
    pending = {"saga.run.status": "pending"}
    with anyio.fail_after(5):  # gauges show the last census (every 0.1 s here)
        while total(points(reader), "saga.runs.active", **pending) != 0:  # noqa: ASYNC110
            await anyio.sleep(0.05)

    # A run of an unknown version waits, counted; the lag of runnable work shows.
    ghost = parked_saga("ghost", version=9, input=Order)
    client = await orchestrator(ghost, concurrency=0, meter_provider=meters, census_interval=0.1)
    await client.start(ghost, Order(order_id="g"))
    await anyio.sleep(0.5)
    found = points(reader)
    assert total(found, "saga.runs.unclaimable", **{"saga.name": "ghost"}) >= 1
    assert total(found, "saga.runs.active", **pending) >= 1
    assert max(v for _, v in found["saga.runs.oldest_active_age"]) > 0


async def test_stale_writes_are_counted(orchestrator: OrchestratorFactory) -> None:
    """A write refused because its lease was taken over moves saga.writes.refused."""
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    gate = anyio.Event()
    s = saga.Saga("refused", input=Order)  # written out: the two attempts' interplay

    @s.step()
    async def slow(ctx: saga.Context[Order]) -> int:
        if ctx.attempt == 1:
            await gate.wait()
        else:
            gate.set()
        return ctx.attempt

    faults = Faults()
    faults.expire_lease(slow)
    faults.attach(await orchestrator(s, meter_provider=meters))
    run = await s.start(Order(order_id="x"))
    assert await run.result(timeout=10) == 2
    with anyio.fail_after(5):
        while not total(points(reader), "saga.writes.refused"):  # noqa: ASYNC110
            await anyio.sleep(0.01)
    assert total(points(reader), "saga.writes.refused") == 1


class _Receiver(BaseHTTPRequestHandler):
    received: list[ExportTraceServiceRequest] = []  # noqa: RUF012 - test-only state

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/v1/traces":
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            self.received.append(request)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture
def otlp_receiver() -> Iterator[str]:
    """A local OTLP/HTTP receiver on 127.0.0.1 that decodes the trace requests it gets."""
    _Receiver.received = []
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


async def test_spans_arrive_over_otlp(
    orchestrator: OrchestratorFactory, otlp_receiver: str
) -> None:
    """With the OTLP/HTTP exporter and a batch processor, a run's spans reach a real
    receiver over the wire, decode, and carry the saga.* attributes."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_receiver)))
    s = build()
    await orchestrator(s, tracer_provider=provider)
    run = await s.start(Order(order_id="w"))
    await run.result(timeout=10)
    await anyio.sleep(0.1)  # the last span ends just after the result is visible
    await anyio.to_thread.run_sync(provider.force_flush)
    provider.shutdown()
    names: dict[str, dict[str, Any]] = {}
    for request in _Receiver.received:
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    attrs = {a.key: a.value for a in span.attributes}
                    names[span.name] = attrs
    assert {"saga.start traced", "saga.step reserve", "saga.step charge"} <= set(names)
    assert names["saga.step charge"]["saga.run.id"].string_value == str(run.id)
    assert names["saga.step charge"]["saga.run.status"].string_value == "completed"


async def test_waiting_runs_and_timer_lag_are_gauged(orchestrator: OrchestratorFactory) -> None:
    """saga.runs.waiting counts sleeping runs by saga; saga.timers.lag shows how late
    the oldest overdue timer is when no worker wakes it (here: only a census-taking
    orchestrator that executes nothing), and saga.runs.active reports sleeping."""
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    s = saga.Saga("napping", input=Order)

    @s.step()
    async def first(ctx: saga.Context[Order]) -> str:
        return "a"

    s.sleep(timedelta(hours=1))

    @s.step()
    async def second(ctx: saga.Context[Order]) -> str:
        return "b"

    worker = await orchestrator(s)
    run = await worker.start(s, Order(order_id="n"))
    with anyio.fail_after(10):
        while (await run.info()).status is not saga.RunStatus.SLEEPING:  # noqa: ASYNC110
            await anyio.sleep(0.02)
    await worker.aclose()
    watcher = await orchestrator(s, concurrency=0, meter_provider=meters, census_interval=0.1)
    await advance(watcher, run, timedelta(hours=1, seconds=5))
    sleeping = {"saga.name": "napping", "saga.run.status": "sleeping"}
    # A census taken before advance() shows the run sleeping with no lag: wait for the
    # first one taken after it (every 0.1 s).
    with anyio.fail_after(5):
        while True:
            found = points(reader)
            lag = max((v for _, v in found.get("saga.timers.lag", ())), default=0.0)
            if total(found, "saga.runs.waiting", **sleeping) == 1 and lag >= 5:
                break
            await anyio.sleep(0.05)
    assert total(found, "saga.runs.active", **{"saga.run.status": "sleeping"}) == 1


async def test_parallel_branches_are_sibling_spans_that_overlap(
    orchestrator: OrchestratorFactory,
) -> None:
    """A graph run is one trace: the attempt spans of b, c and d (run in parallel after
    a) are siblings under the start span, and overlap in time; the join e comes after
    all three and carries the run's outcome."""
    tracing = Tracing()
    s = small_saga(
        "traced_graph",
        ["a", "b", "c", "d", "e"],
        input=Order,
        after={"b": ["a"], "c": ["a"], "d": ["a"], "e": ["b", "c", "d"]},
        delay={"b": 0.2, "c": 0.2, "d": 0.2},
    )
    await orchestrator(s, tracer_provider=tracing.provider)
    run = await s.start(Order(order_id="o-1"))
    assert await run.result(timeout=10) == "e"
    with anyio.fail_after(5):
        while "saga.step e" not in by_name(tracing.spans()):  # noqa: ASYNC110
            await anyio.sleep(0.01)
    spans = by_name(tracing.spans())
    [start] = spans["saga.start traced_graph"]
    assert start.context is not None
    branches = [spans[f"saga.step {name}"][0] for name in "bcd"]
    for span in branches:
        assert span.parent is not None
        assert span.parent.span_id == start.context.span_id
        assert span.context is not None
        assert span.context.trace_id == start.context.trace_id
    starts = [span.start_time or 0 for span in branches]
    ends = [span.end_time or 0 for span in branches]
    assert max(starts) < min(ends)  # all three were running at one moment
    [join] = spans["saga.step e"]
    assert (join.start_time or 0) >= max(ends)
    assert join.attributes is not None
    assert join.attributes["saga.run.status"] == "completed"


async def test_an_attempt_cancelled_for_a_lost_lease_records_no_message(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """The heartbeat cancels an attempt whose lease is no longer its worker's: its span
    says lease_lost, by type, and carries no exception event or status text of the
    cancellation that ended it (spans hold types, never messages)."""
    tracing = Tracing()
    s = saga.Saga("taken", input=Order)  # written out: the two attempts' interplay
    started = anyio.Event()

    @s.step(lease_seconds=0.6)  # heartbeats every 0.2 s
    async def slow(ctx: saga.Context[Order]) -> int:
        if ctx.attempt == 1:
            started.set()
            await anyio.sleep(30)  # until the heartbeat finds the lease gone
        return ctx.attempt

    first_worker = await orchestrator(s, concurrency=1, tracer_provider=tracing.provider)
    run = await first_worker.start(s, Order(order_id="x"))
    with anyio.fail_after(10):
        await started.wait()
    # The lease passes to a worker that vanished at once (its lease expired): the first
    # worker's heartbeat finds it gone and cancels attempt 1 (saga.testing's
    # expire_lease stalls that heartbeat instead, so the attempt would run on), and
    # whichever worker claims next runs attempt 2.
    await db.execute(
        "UPDATE saga.runs SET lease_owner = 'vanished', due_at = now() - interval '1 ms'"
        " WHERE id = $1",
        run.id,
    )
    await orchestrator(s)
    assert await run.result(timeout=15) == 2
    with anyio.fail_after(5):
        while not [p for p in tracing.spans() if p.attributes.get("saga.attempt") == 1]:  # noqa: ASYNC110
            await anyio.sleep(0.02)
    first = [p for p in tracing.spans() if p.attributes.get("saga.attempt") == 1]
    assert [p.attributes.get("saga.outcome") for p in first] == ["lease_lost"]
    assert not [e for e in first[0].events if "exception.message" in (e.attributes or {})]
    assert "Cancelled" not in (first[0].status.description or "")

"""The README's "Tracing and metrics", "Tracing at high throughput" and "Logging"
promises, checked literally with the OpenTelemetry SDK's in-memory span exporter and
metric reader against real runs: every documented instrument's name, kind, unit and
attributes; run ends counted however they happen (a graph run's lost commit reply, an
operator's skip); lag, gauges that drain to 0, resolved runs leaving the active gauge;
one trace per run; no payload in spans or logs."""

# Polling the SDK reader and the database (no event to wait on); paired asserts narrow types.
# ruff: noqa: ASYNC110, PT018

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import anyio
import asyncpg
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    InMemoryMetricReader,
    Metric,
    Sum,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode
from pydantic import BaseModel
from structlog.testing import capture_logs

import saga
from saga.testing import Faults
from tests._sagas import FAST, Fail, Gate, Job, parked_saga, permanent, small_saga
from tests.conftest import OrchestratorFactory
from tests.test_telemetry import Tracing, points, total

SECRET = "h8-secret-marker-0451"


def _meters() -> tuple[InMemoryMetricReader, MeterProvider]:
    reader = InMemoryMetricReader()
    return reader, MeterProvider(metric_readers=[reader])


async def _until(check: Callable[[], Any], timeout: float = 10.0) -> bool:
    """Poll ``check`` until true or ``timeout``; whether it became true."""
    with anyio.move_on_after(timeout):
        while not check():
            await anyio.sleep(0.05)
        return True
    return False


async def _until_async(check: Callable[[], Any], timeout: float = 10.0) -> bool:
    with anyio.move_on_after(timeout):
        while not await check():
            await anyio.sleep(0.05)
        return True
    return False


def _metrics(reader: InMemoryMetricReader) -> dict[str, Metric]:
    data = reader.get_metrics_data()
    out: dict[str, Metric] = {}
    if data is None:
        return out
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                out[metric.name] = metric
    return out


def _gauge(reader: InMemoryMetricReader, name: str) -> float:
    found = points(reader).get(name, [])
    return max((v for _, v in found), default=0.0)


def _by_name(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return sorted((s for s in spans if s.name == name), key=lambda s: (s.start_time or 0, s.name))


def _attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


# -- run ends, lag and gauges ----------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_graph_run_whose_final_commit_reply_was_lost_is_counted_as_ended(
    orchestrator: OrchestratorFactory,
) -> None:
    """README: `saga.runs.completed` (and the other end counters) count "how runs end",
    `saga.run.duration` is "start to terminal state", and "the attempt that ends the run
    carries `saga.run.status`". A run whose steps run in parallel (`after=`) whose last
    item's commit reached the database but whose reply was lost
    (Faults.drop_connection_at_commit, resolved from the history) must be counted and
    timed like a linear one (the linear case: tests/test_telemetry_edges.py)."""
    reader, meters = _meters()
    tracing = Tracing()
    s = small_saga(
        "h8_graph_reply", ["a", "b", "c", "d"], after={"b": ["a"], "c": ["a"], "d": ["b", "c"]}
    )
    faults = Faults()
    faults.drop_connection_at_commit("d")
    with capture_logs() as logs:
        orch = await orchestrator(s, meter_provider=meters, tracer_provider=tracing.provider)
        assert s.graph is not None  # steps in parallel: the graph runner runs it
        faults.attach(orch)
        run = await s.start(Job())
        assert await run.result(timeout=20) == "d"
        assert faults.fired["drop_connection_at_commit"] == 1
        await _until(lambda: total(points(reader), "saga.runs.completed") >= 1, 5)
        await _until(lambda: _by_name(tracing.spans(), "saga.step d"), 5)
    resolved = [line for line in logs if line["event"] == "ambiguous_commit_resolved"]
    assert [line["committed"] for line in resolved] == [True]  # the premise: reply lost
    found = points(reader)
    assert total(found, "saga.runs.completed", **{"saga.name": "h8_graph_reply"}) == 1, (
        "the graph run that completed is missing from saga.runs.completed"
    )
    assert total(found, "saga.run.duration", **{"saga.name": "h8_graph_reply"}) == 1
    [last] = _by_name(tracing.spans(), "saga.step d")
    assert _attrs(last).get("saga.run.status") == "completed"


@pytest.mark.timeout(60)
async def test_scheduler_lag_counts_a_run_whose_lease_expired(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """DESIGN: "scheduler lag (now minus the oldest runnable item)"; README:
    `saga.scheduler.lag` is "now minus the due time of the oldest runnable item". A run
    whose worker died mid-step (its lease ran out 3 s ago, nobody renewed it) is
    runnable: the claim takes expired leases like due runs, and saga.queue.depth and
    saga.queue.wait count it as due and not taken. While the only worker's slot is busy
    nobody takes it, and the lag must show it as queue.wait does (here it reads 0)."""
    reader, meters = _meters()
    gate = Gate("hold")
    blocker = small_saga("h8_blocker", ["hold"], gate=gate)
    orphaned = small_saga("h8_orphan", ["work"])
    await orchestrator(blocker, orphaned, concurrency=1, meter_provider=meters, census_interval=0.1)
    await blocker.start(Job())
    with anyio.fail_after(10):
        await gate.entered.wait()
    run = await orphaned.start(Job())  # not claimed: the only slot is busy
    # Its worker died in the middle of the step: leased to a worker gone, expired 3 s ago.
    await db.execute(
        "UPDATE saga.runs SET lease_owner = 'dead-worker', status = 'running', attempt = 1,"
        " lease_token = lease_token + 1, due_at = now() - interval '3 seconds' WHERE id = $1",
        run.id,
    )
    try:
        waited = {"saga.name": "h8_orphan"}
        assert await _until(lambda: total(points(reader), "saga.queue.wait", **waited) >= 2.5)
        assert total(points(reader), "saga.queue.depth", **waited) == 1

        def lag() -> float:  # (the census's queries may see the update a cycle apart)
            return max((v for _, v in points(reader).get("saga.scheduler.lag", [])), default=0)

        assert await _until(lambda: lag() >= 2.5), (
            f"saga.scheduler.lag = {lag()} while a runnable run (expired lease) has been "
            "due for 3 s (saga.queue.wait shows it)"
        )
    finally:
        gate.release.set()


@pytest.mark.timeout(60)
async def test_a_run_ended_by_skipping_its_last_compensation_is_counted(
    orchestrator: OrchestratorFactory,
) -> None:
    """README: `saga.runs.completed`, `.compensated`, `.failed`, `.cancelled`,
    `.stopped` count "how runs end"; `saga.run.duration` is "start to terminal state".
    A run whose only compensation gave up ends `failed` (counted); the operator's
    skip_compensation() then ends it `compensated` at once (nothing is left to undo,
    README: "ends compensated ... when none is left"), in the operator's process, which
    counts and logs that end ("counts and logs its end (`compensation_skipped`,
    `run_compensated`)"). Before, the end was counted nowhere, then logged nowhere."""
    reader, meters = _meters()
    s = small_saga(
        "h8_skip",
        ["a", "b"],
        compensate={"a"},
        fail={"b": permanent("declined")},
        fail_undo={"a": Fail(RuntimeError, "refund api down")},
        undo_retry=saga.Retry(max_attempts=1),
    )
    await orchestrator(s, meter_provider=meters)
    run = await s.start(Job())
    with pytest.raises(saga.RunFailedError):
        await run.result(timeout=20)
    assert await _until(lambda: total(points(reader), "saga.runs.failed") >= 1, 5)
    with capture_logs() as logs:
        await run.skip_compensation(note="refunded by hand")
    assert [e["event"] for e in logs if e.get("run_id") == str(run.id)] == [
        "compensation_skipped",
        "run_compensated",
    ], logs
    assert (await run.info()).status is saga.RunStatus.COMPENSATED
    await _until(lambda: total(points(reader), "saga.runs.compensated") >= 1, 3)
    found = points(reader)
    assert total(found, "saga.runs.failed", **{"saga.name": "h8_skip"}) == 1
    assert total(found, "saga.runs.compensated", **{"saga.name": "h8_skip"}) == 1, (
        "the run that ended compensated (skip_compensation) is not counted"
    )
    ended = {"saga.name": "h8_skip", "saga.run.status": "compensated"}
    assert total(found, "saga.run.duration", **ended) == 1


@pytest.mark.timeout(60)
async def test_resolved_failed_and_stopped_runs_leave_the_active_gauge(
    orchestrator: OrchestratorFactory,
) -> None:
    """README: `saga.runs.active` gauges "runs pending, running, sleeping, waiting,
    compensating, and failed or stopped (waiting for an operator)"; `resolve()` is for
    "an operator dealt with a failed or stopped run", after which it "leaves
    saga.needs_attention" (`saga attention`: "the runs waiting for an operator ...
    failed and stopped ones not resolved"). A resolved run waits for no operator: the
    gauge should drop it, as needs_attention does; it goes on counting it forever."""
    reader, meters = _meters()
    failing = small_saga(
        "h8_res_failed",
        ["a", "b"],
        compensate={"a"},
        fail={"b": permanent("declined")},
        fail_undo={"a": Fail(RuntimeError, "down")},
        undo_retry=saga.Retry(max_attempts=1),
    )
    stopping = small_saga(
        "h8_res_stopped",
        ["a"],
        fail={"a": permanent("declined")},
        retry=saga.Retry(max_attempts=1, on_give_up="stop"),
    )
    orch = await orchestrator(failing, stopping, meter_provider=meters, census_interval=0.1)
    failed = await failing.start(Job())
    stopped = await stopping.start(Job())
    with pytest.raises(saga.RunFailedError):
        await failed.result(timeout=20)
    with pytest.raises(saga.RunStoppedError):
        await stopped.result(timeout=20)

    def by_status(status: str) -> int:
        return total(points(reader), "saga.runs.active", **{"saga.run.status": status})

    assert await _until(lambda: by_status("failed") == 1 and by_status("stopped") == 1)
    await failed.resolve(note="handled by phone")
    await stopped.resolve(note="handled by phone")
    page = await saga.needs_attention(orch)
    assert not page.runs  # the library's own view: nobody waits for an operator
    await _until(lambda: by_status("failed") == 0 and by_status("stopped") == 0, 3)
    assert (by_status("failed"), by_status("stopped")) == (0, 0), (
        "resolved runs are still gauged as waiting for an operator"
    )


# -- what held (regression guards) -------------------------------------------------------

#: README table: name -> (kind, unit if documented, attributes documented).
DOCUMENTED: dict[str, tuple[str, str | None, set[str]]] = {
    "saga.runs.started": ("counter", None, {"saga.name"}),
    "saga.runs.completed": ("counter", None, {"saga.name"}),
    "saga.runs.compensated": ("counter", None, {"saga.name"}),
    "saga.step.attempts": ("counter", None, {"saga.name", "saga.step", "saga.outcome"}),
    "saga.compensation.attempts": (
        "counter",
        None,
        {"saga.name", "saga.step", "saga.outcome"},
    ),
    "saga.step.duration": ("histogram", "s", {"saga.name", "saga.step", "saga.outcome"}),
    "saga.compensation.duration": (
        "histogram",
        "s",
        {"saga.name", "saga.step", "saga.outcome"},
    ),
    "saga.run.duration": ("histogram", "s", {"saga.name"}),
    "saga.leases.expired": ("counter", None, set()),
    "saga.runs.active": ("gauge", None, {"saga.schema", "saga.run.status"}),
    "saga.runs.waiting": ("gauge", None, {"saga.schema", "saga.name", "saga.run.status"}),
    "saga.timers.lag": ("gauge", "s", {"saga.schema"}),
    "saga.runs.oldest_active_age": ("gauge", "s", {"saga.schema"}),
    "saga.scheduler.lag": ("gauge", "s", {"saga.schema"}),
    "saga.runs.unclaimable": (
        "gauge",
        None,
        {"saga.schema", "saga.name", "saga.version", "saga.fingerprint"},
    ),
    "saga.queue.depth": ("gauge", None, {"saga.schema", "saga.name", "saga.priority"}),
    "saga.queue.wait": ("gauge", "s", {"saga.schema", "saga.name", "saga.priority"}),
    "saga.runs.waiting_for_key": ("gauge", None, {"saga.schema", "saga.name"}),
    "saga.rate_limit.delay": ("histogram", "s", {"saga.rate_limit"}),
    "saga.schedules.late": ("gauge", "s", {"saga.schema", "saga.schedule"}),
}


class Note(BaseModel):
    note: str = ""


class Approval(BaseModel):
    approved: bool
    comment: str


def _kind(metric: Metric) -> str:
    data = metric.data
    if isinstance(data, Sum):
        assert data.aggregation_temporality is AggregationTemporality.CUMULATIVE
        return "counter" if data.is_monotonic else "updown"
    if isinstance(data, Histogram):
        return "histogram"
    if isinstance(data, Gauge):
        return "gauge"
    return type(data).__name__


def _payment(name: str, limit: saga.RateLimit | None = None) -> saga.Saga[Note]:
    """reserve (compensated; its compensation fails once) then pay, rate limited: a
    ConnectionError, a TimeoutError, then a PermanentError. Every message, result and
    the input carry the input's note."""
    s = saga.Saga(name, input=Note)

    @s.step(retry=FAST)
    async def reserve(ctx: saga.Context[Note]) -> str:
        return f"hold-{ctx.input.note}"

    @reserve.compensate(retry=FAST)
    async def release(ctx: saga.Context[Note], hold: str) -> None:
        if ctx.attempt == 1:
            raise RuntimeError(f"release of {hold} failed {ctx.input.note}")

    @s.step(retry=saga.Retry(max_attempts=3, initial_delay=0.01, max_delay=0.05), rate_limit=limit)
    async def pay(ctx: saga.Context[Note]) -> str:
        if ctx.attempt == 1:
            raise ConnectionError(f"flaky {ctx.input.note}")
        if ctx.attempt == 2:
            raise TimeoutError(f"slow {ctx.input.note}")
        raise saga.PermanentError(f"declined {ctx.input.note}")

    return s


@pytest.mark.timeout(90)
async def test_every_documented_instrument_has_its_kind_unit_and_attributes(
    orchestrator: OrchestratorFactory,
) -> None:
    """README "Tracing and metrics" table, literally: after runs that exercise every
    instrument (a compensated run with retries of two error types and a rate limit, a
    crash recovered by lease expiry, a sleeping run, runs queued behind their key, a run
    of a definition nobody executes, a schedule), each documented metric exists under
    its name, kind (counters as cumulative monotonic sums, histograms, gauges), unit
    (seconds where documented) and attributes; attempt durations carry no error.type."""
    reader, meters = _meters()
    bank = saga.RateLimit("h8_bank", per_second=100, burst=5)
    pay = _payment("h8_kinds", bank)
    crashy = small_saga("h8_crashy", ["c"])
    key_gate = Gate("k")
    keyed = small_saga(
        "h8_keyed", ["k"], gate=key_gate, traffic={"concurrency_key": lambda job: "acct"}
    )
    napping = saga.Saga("h8_nap", input=Job)

    @napping.step()
    async def first(ctx: saga.Context[Job]) -> str:
        return "a"

    napping.sleep(timedelta(hours=1))

    @napping.step()
    async def second(ctx: saga.Context[Job]) -> str:
        return "b"

    hourly = saga.Scheduled(
        "h8_hourly", small_saga("h8_sched", ["x"]), saga.Schedule.every(timedelta(hours=1)), Job()
    )
    faults = Faults()
    faults.crash_after("c")
    worker = await orchestrator(
        pay,
        crashy,
        keyed,
        napping,
        hourly.saga,
        schedules=[hourly],
        meter_provider=meters,
        census_interval=0.1,
        lease_seconds=0.6,
    )
    faults.attach(worker)
    ghost = parked_saga("h8_ghost", version=9)
    client = await orchestrator(ghost, concurrency=0, meter_provider=meters, census_interval=0.1)
    await client.start(ghost, Job())
    with pytest.raises(saga.RunCompensatedError):
        await (await pay.start(Note(note="n"))).result(timeout=20)
    crashed = await crashy.start(Job())
    first_keyed = await keyed.start(Job(n=1))
    second_keyed = await keyed.start(Job(n=2))
    await napping.start(Job())
    try:
        assert await crashed.result(timeout=20) == "c"
        wanted = set(DOCUMENTED) - {"saga.queue.wait"}  # (same rows as queue.depth)

        def complete() -> bool:
            found = points(reader)
            return (
                wanted <= set(found)
                and total(found, "saga.runs.waiting_for_key") >= 1
                and total(found, "saga.runs.waiting") >= 1
                and total(found, "saga.leases.expired") >= 1
            )

        assert await _until(complete, 15), sorted(wanted - set(points(reader)))
        metrics = _metrics(reader)  # (while the keyed run waits: its series is there)
    finally:
        key_gate.release.set()
    assert await first_keyed.result(timeout=20) == "k"
    assert await second_keyed.result(timeout=20) == "k"
    problems = []
    for name, (kind, unit, attributes) in DOCUMENTED.items():
        metric = metrics.get(name)
        if metric is None:
            problems.append(f"{name}: missing")
            continue
        if _kind(metric) != kind:
            problems.append(f"{name}: a {_kind(metric)}, documented a {kind}")
        if unit is not None and metric.unit != unit:
            problems.append(f"{name}: unit {metric.unit!r}, documented {unit!r}")
        for point in metric.data.data_points:
            present = set(point.attributes or {})
            if not attributes <= present:
                problems.append(f"{name}: {sorted(present)} lacks {sorted(attributes - present)}")
            if name.endswith(".duration") and "error.type" in present:
                problems.append(f"{name}: carries error.type")
    assert not problems, problems
    found = points(reader)
    attempts = {
        (a.get("saga.outcome"), a.get("error.type")): v
        for a, v in found["saga.step.attempts"]
        if a.get("saga.step") == "pay"
    }
    assert attempts == {
        ("retry", "ConnectionError"): 1,
        ("retry", "TimeoutError"): 1,
        ("failure", "saga.PermanentError"): 1,
    }, attempts
    undo = {
        (a.get("saga.outcome"), a.get("error.type")): v
        for a, v in found["saga.compensation.attempts"]
        if a.get("saga.name") == "h8_kinds"
    }
    assert undo == {("retry", "RuntimeError"): 1, ("success", None): 1}, undo
    assert total(found, "saga.rate_limit.delay", **{"saga.rate_limit": "h8_bank"}) == 3
    assert total(found, "saga.leases.expired", **{"saga.name": "h8_crashy"}) == 1
    assert total(found, "saga.runs.unclaimable", **{"saga.name": "h8_ghost"}) == 1
    assert total(found, "saga.queue.depth", **{"saga.name": "h8_ghost"}) == 1
    sched = [a for a, _ in found["saga.schedules.late"]]
    assert {"saga.schema": "saga", "saga.schedule": "h8_hourly"} in sched


@pytest.mark.timeout(90)
async def test_no_payload_in_spans_or_logs_and_log_lines_carry_run_saga_step_attempt(
    orchestrator: OrchestratorFactory,
) -> None:
    """DESIGN: "no input or result payload appears in logs or spans"; README: "Spans
    hold identifiers and types only: never inputs, results or exception messages" and
    "Logs carry error *types* only" with "`run_id`, `saga`, `step` and `attempt`
    bound". Inputs, results, step and compensation errors, a signal's payload and a
    stopped run's error all carry a secret marker: it appears in no span (name,
    attributes, events, status) nor log line; every step and compensation log line
    names its run, saga, step and attempt."""
    tracing = Tracing()
    pay = _payment("h8_secret_pay")
    waiting = saga.Saga("h8_secret_wait", input=Note)

    @waiting.step()
    async def ask(ctx: saga.Context[Note]) -> str:
        return f"asked {ctx.input.note}"

    approval = waiting.wait_for("approval", Approval)

    @waiting.step()
    async def act(ctx: saga.Context[Note]) -> str:
        answer = ctx.result(approval)
        if ctx.attempt == 1:
            raise ValueError(f"not yet {answer.comment}")
        return f"done {answer.comment}"

    stopping = small_saga(
        "h8_secret_stop",
        ["a"],
        input=Note,
        fail={"a": Fail(saga.PermanentError, lambda ctx: f"stop {ctx.input.note}")},
        retry=saga.Retry(max_attempts=1, on_give_up="stop"),
    )
    with capture_logs() as logs:
        await orchestrator(pay, waiting, stopping, tracer_provider=tracing.provider)
        with pytest.raises(saga.RunCompensatedError):
            await (await pay.start(Note(note=SECRET))).result(timeout=20)
        w = await waiting.start(Note(note=SECRET))
        with anyio.fail_after(15):
            while (await w.info()).status is not saga.RunStatus.WAITING:
                await anyio.sleep(0.05)
        await w.signal(approval, Approval(approved=True, comment=SECRET))
        assert await w.result(timeout=20) == f"done {SECRET}"
        with pytest.raises(saga.RunStoppedError):
            await (await stopping.start(Note(note=SECRET))).result(timeout=20)
        await anyio.sleep(0.3)  # the last spans end just after the results are visible
    spans = tracing.spans()
    texts = [span.name for span in spans]
    texts += [repr(_attrs(span)) for span in spans]
    texts += [f"{e.name} {dict(e.attributes or {})!r}" for span in spans for e in span.events]
    texts += [span.status.description or "" for span in spans]
    assert len(spans) >= 10
    leaked = [t for t in texts if SECRET in t]
    assert not leaked, leaked
    leaked_logs = [line for line in logs if SECRET in repr(line)]
    assert not leaked_logs, leaked_logs
    problems = []
    for line in logs:
        event = str(line["event"])
        if event.startswith(("step_", "compensation_")):
            missing = {"run_id", "saga", "step", "attempt"} - set(line)
            if missing:
                problems.append((event, sorted(missing)))
        elif event.startswith("run_"):
            missing = {"run_id", "saga"} - set(line)
            if missing:
                problems.append((event, sorted(missing)))
    assert not problems, problems
    assert {"step_failed", "compensation_failed", "run_compensated"} <= {
        line["event"] for line in logs
    }


@pytest.mark.timeout(90)
async def test_how_runs_end_is_counted_and_on_the_last_attempt_span(
    orchestrator: OrchestratorFactory,
) -> None:
    """README: the end counters count "how runs end", and "the attempt that ends the run
    carries `saga.run.status`"; failed attempts carry an `exception` event with the
    error type and an error status. A cancelled run (cancel while its step runs; its
    compensation ends it), a run failed at its compensation and a run stopped for an
    operator: each end counted once by saga.name, timed in saga.run.duration with its
    status, and its last attempt span says the status."""
    reader, meters = _meters()
    tracing = Tracing()
    gate = Gate("a")
    cancelling = small_saga("h8_end_cancel", ["a", "b"], compensate={"a"}, gate=gate)
    failing = small_saga(
        "h8_end_failed",
        ["a", "b"],
        compensate={"a"},
        fail={"b": permanent("no")},
        fail_undo={"a": Fail(RuntimeError, "down")},
        undo_retry=saga.Retry(max_attempts=2, initial_delay=0.01),
    )
    stopping = small_saga(
        "h8_end_stop",
        ["a"],
        fail={"a": Fail(KeyError, "k")},
        retry=saga.Retry(max_attempts=2, initial_delay=0.01, on_give_up="stop"),
    )
    await orchestrator(
        cancelling, failing, stopping, meter_provider=meters, tracer_provider=tracing.provider
    )
    c = await cancelling.start(Job())
    with anyio.fail_after(10):
        await gate.entered.wait()
    await c.cancel()
    gate.release.set()
    with pytest.raises(saga.RunCancelledError):
        await c.result(timeout=20)
    with pytest.raises(saga.RunFailedError):
        await (await failing.start(Job())).result(timeout=20)
    with pytest.raises(saga.RunStoppedError):
        await (await stopping.start(Job())).result(timeout=20)
    ends = {"h8_end_cancel": "cancelled", "h8_end_failed": "failed", "h8_end_stop": "stopped"}

    def counted() -> bool:
        found = points(reader)
        return all(total(found, f"saga.runs.{status}") >= 1 for status in ends.values())

    assert await _until(counted, 5)
    await anyio.sleep(0.2)
    found = points(reader)
    for name, status in ends.items():
        assert total(found, f"saga.runs.{status}", **{"saga.name": name}) == 1, name
        timed = {"saga.name": name, "saga.run.status": status}
        assert total(found, "saga.run.duration", **timed) == 1, name
    spans = tracing.spans()
    [undo_c] = [
        s
        for s in spans
        if s.name == "saga.compensate a" and _attrs(s)["saga.name"] == "h8_end_cancel"
    ]
    assert _attrs(undo_c)["saga.run.status"] == "cancelled"
    assert _attrs(undo_c)["saga.kind"] == "compensation"
    undo_f = sorted(
        (
            s
            for s in spans
            if s.name == "saga.compensate a" and _attrs(s)["saga.name"] == "h8_end_failed"
        ),
        key=lambda s: _attrs(s)["saga.attempt"],
    )
    assert [_attrs(s)["saga.outcome"] for s in undo_f] == ["retry", "failure"]
    assert _attrs(undo_f[-1])["saga.run.status"] == "failed"
    assert "saga.run.status" not in _attrs(undo_f[0])
    for s in undo_f:
        assert s.status.status_code is StatusCode.ERROR
        assert [(e.name, dict(e.attributes or {})) for e in s.events] == [
            ("exception", {"exception.type": "RuntimeError"})
        ]
    stop = sorted(
        (
            s
            for s in spans
            if _attrs(s).get("saga.name") == "h8_end_stop" and s.name == "saga.step a"
        ),
        key=lambda s: _attrs(s)["saga.attempt"],
    )
    assert [_attrs(s)["saga.outcome"] for s in stop] == ["retry", "failure"]
    assert _attrs(stop[-1])["saga.run.status"] == "stopped"
    assert _attrs(stop[-1])["error.type"] == "KeyError"
    for s in spans:
        if s.name.startswith(("saga.step", "saga.compensate")):
            assert s.kind is SpanKind.CONSUMER
            assert {
                "saga.run.id",
                "saga.name",
                "saga.version",
                "saga.step",
                "saga.attempt",
                "saga.kind",
                "saga.worker",
                "saga.outcome",
            } <= set(_attrs(s)), s.name


@pytest.mark.timeout(90)
async def test_waiting_and_sleeping_runs_are_gauged_but_not_runnable(
    orchestrator: OrchestratorFactory,
) -> None:
    """README gauges: `saga.runs.active` by state, `saga.runs.waiting` (sleeping and
    waiting runs, by saga), `saga.runs.oldest_active_age` (age of the oldest run not yet
    ended), `saga.scheduler.lag` (oldest *runnable* item) and `saga.timers.lag` (oldest
    overdue timer). A run sleeping an hour and one waiting for a signal without timeout
    are active and waiting but not runnable: lag 0 both; the oldest age grows with the
    oldest of them. Once signalled and cancelled they leave every gauge."""
    reader, meters = _meters()
    napping = saga.Saga("h8_g_nap", input=Job)

    @napping.step()
    async def one(ctx: saga.Context[Job]) -> str:
        return "a"

    napping.sleep(timedelta(hours=1))

    @napping.step()
    async def two(ctx: saga.Context[Job]) -> str:
        return "b"

    waiting = saga.Saga("h8_g_wait", input=Job)

    @waiting.step()
    async def ask(ctx: saga.Context[Job]) -> str:
        return "asked"

    approval = waiting.wait_for("approval", Approval)

    @waiting.step()
    async def act(ctx: saga.Context[Job]) -> str:
        return "done"

    await orchestrator(napping, waiting, meter_provider=meters, census_interval=0.1)
    w = await waiting.start(Job())
    n = await napping.start(Job())
    with anyio.fail_after(15):
        while (await w.info()).status is not saga.RunStatus.WAITING or (
            await n.info()
        ).status is not saga.RunStatus.SLEEPING:
            await anyio.sleep(0.05)
    await anyio.sleep(1.2)

    def parked() -> bool:
        found = points(reader)
        return (
            total(found, "saga.runs.active", **{"saga.run.status": "waiting"}) == 1
            and total(found, "saga.runs.active", **{"saga.run.status": "sleeping"}) == 1
            and _gauge(reader, "saga.runs.oldest_active_age") >= 1.0
        )

    assert await _until(parked, 5)
    found = points(reader)
    assert (
        total(
            found, "saga.runs.waiting", **{"saga.name": "h8_g_wait", "saga.run.status": "waiting"}
        )
        == 1
    )
    assert (
        total(
            found, "saga.runs.waiting", **{"saga.name": "h8_g_nap", "saga.run.status": "sleeping"}
        )
        == 1
    )
    for status in ("pending", "running", "compensating", "failed", "stopped"):
        assert total(found, "saga.runs.active", **{"saga.run.status": status}) == 0, status
    assert _gauge(reader, "saga.scheduler.lag") == 0.0
    assert _gauge(reader, "saga.timers.lag") == 0.0
    assert total(found, "saga.queue.depth") == 0
    await w.signal(approval, Approval(approved=True, comment="ok"))
    assert await w.result(timeout=15) == "done"
    await n.cancel()
    with pytest.raises(saga.RunCancelledError):
        await n.result(timeout=15)

    def drained() -> bool:
        found = points(reader)
        return (
            total(found, "saga.runs.waiting") == 0
            and all(v == 0 for a, v in found.get("saga.runs.active", []))
            and _gauge(reader, "saga.runs.oldest_active_age") == 0.0
        )

    assert await _until(drained, 5), points(reader)


@pytest.mark.timeout(90)
async def test_rate_limited_and_key_queued_runs_are_measured(
    orchestrator: OrchestratorFactory,
) -> None:
    """README: `saga.rate_limit.delay` is a histogram (s; `saga.rate_limit`) of how long
    attempts waited for a token; `saga.runs.waiting_for_key` gauges the runs queued
    behind their concurrency key. Three attempts at 4/s with a burst of 1 wait about 0,
    0.25 and 0.5 s; three runs on one key, the first held, leave two queued (pending, not
    counted as due in saga.queue.depth), then none."""
    reader, meters = _meters()
    slow = saga.RateLimit("h8_slow", per_second=4, burst=1)
    limited = saga.Saga("h8_limited", input=Job)

    @limited.step(rate_limit=slow)
    async def call(ctx: saga.Context[Job]) -> int:
        return ctx.input.n

    gate = Gate("k", times=1)
    keyed = small_saga("h8_k", ["k"], gate=gate, traffic={"concurrency_key": lambda job: "acct"})
    await orchestrator(limited, keyed, meter_provider=meters, census_interval=0.1)
    runs = [await limited.start(Job(n=i)) for i in range(3)]
    assert [await r.result(timeout=15) for r in runs] == [0, 1, 2]
    data = _metrics(reader)["saga.rate_limit.delay"].data
    [point] = [p for p in data.data_points if dict(p.attributes) == {"saga.rate_limit": "h8_slow"}]
    assert point.count == 3
    assert 0.5 <= point.sum <= 1.2, point.sum
    held = [await keyed.start(Job(n=i)) for i in range(3)]
    with anyio.fail_after(10):
        await gate.entered.wait()
    try:
        assert await _until(
            lambda: total(points(reader), "saga.runs.waiting_for_key", **{"saga.name": "h8_k"}) == 2
        )
        found = points(reader)
        assert total(found, "saga.queue.depth", **{"saga.name": "h8_k"}) == 0
        assert total(found, "saga.runs.active", **{"saga.run.status": "pending"}) == 2
    finally:
        gate.release.set()
    assert [await r.result(timeout=15) for r in held] == ["k"] * 3
    assert await _until(lambda: total(points(reader), "saga.runs.waiting_for_key") == 0, 5)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("opened_in_span", [False, True])
async def test_scheduled_runs_are_counted_and_each_is_one_trace(
    orchestrator: OrchestratorFactory, opened_in_span: bool
) -> None:
    """DESIGN: "one trace per run"; README: start() records a `saga.start <saga>` span
    and every attempt is its child. A run started by a schedule (no caller span) gets a
    root start span of its own, with saga.run.id and saga.run.created, its attempts
    under it; each run its own trace; saga.runs.started counts them. Also when the
    orchestrator was opened while a span was current (a worker's traced startup):
    before, every scheduled run's start span was a child of that span, all of them in
    one trace for the life of the process."""
    reader, meters = _meters()
    tracing = Tracing()
    s = small_saga("h8_tick", ["t"])
    ticks = saga.Scheduled("h8_ticks", s, saga.Schedule.every(timedelta(seconds=1)), Job())
    startup = tracing.provider.get_tracer("app").start_as_current_span("worker startup")
    with startup if opened_in_span else contextlib.nullcontext():
        await orchestrator(
            s,
            schedules=[ticks],
            meter_provider=meters,
            tracer_provider=tracing.provider,
            poll_interval=0.2,
        )
    assert await _until(lambda: len(_by_name(tracing.spans(), "saga.step t")) >= 2, 10)
    spans = tracing.spans()
    starts = {s_.context.span_id: s_ for s_ in _by_name(spans, "saga.start h8_tick") if s_.context}
    steps = _by_name(spans, "saga.step t")
    assert len({sp.context.trace_id for sp in steps if sp.context}) == len(steps)
    for step in steps:
        assert step.parent is not None and step.parent.span_id in starts
        start = starts[step.parent.span_id]
        assert start.parent is None
        assert start.kind is SpanKind.PRODUCER
        assert _attrs(start)["saga.run.id"] == _attrs(step)["saga.run.id"]
        assert _attrs(start)["saga.run.created"] is True
        assert step.context is not None and start.context is not None
        assert step.context.trace_id == start.context.trace_id
    assert total(points(reader), "saga.runs.started", **{"saga.name": "h8_tick"}) >= len(steps)


@pytest.mark.timeout(90)
async def test_one_trace_across_a_worker_shutdown_and_another_worker(
    orchestrator: OrchestratorFactory,
) -> None:
    """README: "Every attempt of every step and compensation, in whichever process it
    runs, after any restart, is a child of that span". A client starts the run; worker A
    (its own provider) is shut down while the step runs (its span: `interrupted`), and
    worker B (another provider) runs it again: every attempt span of both workers is a
    child of the client's start span, in its trace, and the retry is not an error."""
    client_tracing, a_tracing, b_tracing = Tracing(), Tracing(), Tracing()
    calls: list[int] = []

    def build() -> saga.Saga[Job]:
        s = saga.Saga("h8_restart", input=Job)

        @s.step()
        async def long(ctx: saga.Context[Job]) -> int:
            calls.append(ctx.attempt)
            if len(calls) == 1:
                await anyio.sleep(30)
            return len(calls)

        return s

    definition = build()
    client = await orchestrator(definition, concurrency=0, tracer_provider=client_tracing.provider)
    a = await orchestrator(build(), tracer_provider=a_tracing.provider, shutdown_timeout=0.3)
    with client_tracing.provider.get_tracer("app").start_as_current_span("POST /x") as request:
        run = await client.start(definition, Job())
    with anyio.fail_after(10):
        while not calls:
            await anyio.sleep(0.02)
    await a.aclose()
    await orchestrator(build(), tracer_provider=b_tracing.provider)
    assert await run.result(timeout=20) == 2
    await _until(lambda: b_tracing.spans(), 5)
    [start] = _by_name(client_tracing.spans(), "saga.start h8_restart")
    assert start.parent is not None
    assert start.parent.span_id == request.get_span_context().span_id
    attempts = a_tracing.spans() + b_tracing.spans()
    assert [_attrs(s)["saga.outcome"] for s in a_tracing.spans()] == ["interrupted"]
    assert [_attrs(s)["saga.outcome"] for s in b_tracing.spans()] == ["success"]
    assert _attrs(b_tracing.spans()[0])["saga.run.status"] == "completed"
    for span in attempts:
        assert span.context is not None and start.context is not None
        assert span.context.trace_id == start.context.trace_id
        assert span.parent is not None and span.parent.span_id == start.context.span_id
        assert span.status.status_code is not StatusCode.ERROR


@pytest.mark.timeout(60)
async def test_a_wait_that_times_out_stops_counted_and_resumes_in_the_same_trace(
    orchestrator: OrchestratorFactory,
) -> None:
    """README: `saga.runs.stopped` counts runs that end stopped and `saga.run.duration`
    times them; "Every attempt ... after any restart, is a child of that span". A wait
    with on_timeout="stop" times out (saga.testing.advance): the run is counted stopped
    (no attempt span there: a wait is not a step); an operator's retry() makes it wait
    again, the signal comes, and its next step's span is still a child of the start
    span, in its trace, carrying the run's completed status; completed is counted."""
    from saga.testing import advance

    reader, meters = _meters()
    tracing = Tracing()
    s = saga.Saga("h8_wait_stop", input=Job)

    @s.step()
    async def ask(ctx: saga.Context[Job]) -> str:
        return "asked"

    ok = s.wait_for("ok", Approval, timeout=timedelta(hours=1), on_timeout="stop")

    @s.step()
    async def act(ctx: saga.Context[Job]) -> str:
        return "acted"

    orch = await orchestrator(s, meter_provider=meters, tracer_provider=tracing.provider)
    with tracing.provider.get_tracer("app").start_as_current_span("POST /w"):
        run = await s.start(Job())
    with anyio.fail_after(15):
        while (await run.info()).status is not saga.RunStatus.WAITING:
            await anyio.sleep(0.05)
    await advance(orch, run, timedelta(hours=1, seconds=1))
    with pytest.raises(saga.RunStoppedError):
        await run.result(timeout=15)
    assert await _until(lambda: total(points(reader), "saga.runs.stopped") >= 1, 5)
    await run.retry(note="try again")
    await run.signal(ok, Approval(approved=True, comment="fine"))
    assert await run.result(timeout=15) == "acted"
    assert await _until(lambda: total(points(reader), "saga.runs.completed") >= 1, 5)
    assert await _until(lambda: _by_name(tracing.spans(), "saga.step act"), 5)
    found = points(reader)
    assert total(found, "saga.runs.stopped", **{"saga.name": "h8_wait_stop"}) == 1
    assert total(found, "saga.runs.completed", **{"saga.name": "h8_wait_stop"}) == 1
    stopped = {"saga.name": "h8_wait_stop", "saga.run.status": "stopped"}
    assert total(found, "saga.run.duration", **stopped) == 1
    [start] = _by_name(tracing.spans(), "saga.start h8_wait_stop")
    [act_span] = _by_name(tracing.spans(), "saga.step act")
    assert start.context is not None and act_span.context is not None
    assert act_span.context.trace_id == start.context.trace_id
    assert act_span.parent is not None and act_span.parent.span_id == start.context.span_id
    assert _attrs(act_span)["saga.run.status"] == "completed"


@pytest.mark.timeout(60)
async def test_gauges_by_saga_read_zero_once_their_runs_are_gone(
    orchestrator: OrchestratorFactory,
) -> None:
    """README: `saga.runs.waiting` gauges "sleeping and waiting runs, by saga" and
    `saga.runs.waiting_for_key` "runs queued behind their concurrency key". When a
    saga's last sleeping run wakes, or its key queue drains, the gauge should read 0
    for that saga (as saga.runs.active reads 0 per state); instead its series stops
    being reported, so an exporter that keeps the last value (OTLP backends do for
    gauges) still shows 1 sleeping run and 2 queued ones."""
    from saga.testing import advance

    reader, meters = _meters()
    napping = saga.Saga("h8_z_nap", input=Job)

    @napping.step()
    async def one(ctx: saga.Context[Job]) -> str:
        return "a"

    napping.sleep(timedelta(hours=1))

    @napping.step()
    async def two(ctx: saga.Context[Job]) -> str:
        return "b"

    gate = Gate("k", times=1)
    keyed = small_saga("h8_z_k", ["k"], gate=gate, traffic={"concurrency_key": lambda job: "a"})
    orch = await orchestrator(napping, keyed, meter_provider=meters, census_interval=0.1)
    n = await napping.start(Job())
    held = [await keyed.start(Job(n=i)) for i in range(3)]
    with anyio.fail_after(10):
        await gate.entered.wait()

    def attrs(name: str) -> set[tuple[str, ...]]:
        return {tuple(sorted(a.items())) for a, _ in points(reader).get(name, [])}

    assert await _until(
        lambda: (
            total(points(reader), "saga.runs.waiting", **{"saga.name": "h8_z_nap"}) == 1
            and total(points(reader), "saga.runs.waiting_for_key", **{"saga.name": "h8_z_k"}) == 2
        )
    )
    gate.release.set()
    await advance(orch, n, timedelta(hours=1, seconds=1))
    assert await n.result(timeout=15) == "b"
    assert [await r.result(timeout=15) for r in held] == ["k"] * 3
    await anyio.sleep(0.5)  # several censuses
    found = points(reader)
    waiting = [v for a, v in found.get("saga.runs.waiting", []) if a["saga.name"] == "h8_z_nap"]
    queued = [
        v for a, v in found.get("saga.runs.waiting_for_key", []) if a["saga.name"] == "h8_z_k"
    ]
    assert (waiting, queued) == ([0], [0]), (
        f"saga.runs.waiting reports {waiting}, saga.runs.waiting_for_key {queued}: the "
        "series vanish instead of reading 0"
    )


@pytest.mark.timeout(60)
async def test_internal_error_is_logged_with_its_step_and_attempt(
    orchestrator: OrchestratorFactory,
) -> None:
    """README, Logging: event names "with `run_id`, `saga`, `step` and `attempt`
    bound". A step that schedules a cancel of its own task which lands after it returned
    (saga/_runner.py: not a shutdown) makes the runner log `internal_error`: the line
    names the run and saga but not the step or attempt it happened in, though the
    claimed item it logs from has both (every other lease and commit line says them)."""
    import asyncio

    s = saga.Saga("h8_sneaky", input=Job)

    @s.step(retry=FAST)
    async def sneaky(ctx: saga.Context[Job]) -> str:
        if ctx.attempt == 1:
            task = asyncio.current_task()
            assert task is not None
            asyncio.get_running_loop().call_soon(task.cancel)
        return "x"

    with capture_logs() as logs:
        await orchestrator(s, lease_seconds=1)
        run = await s.start(Job())
        assert await _until(lambda: any(line["event"] == "internal_error" for line in logs))
        await run.result(timeout=20)
    line = next(line for line in logs if line["event"] == "internal_error")
    assert (line["run_id"], line["saga"]) == (str(run.id), "h8_sneaky")
    missing = {"step", "attempt"} - set(line)
    assert not missing, f"internal_error lacks {sorted(missing)}: {line}"


def _of(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [line for line in logs if line.get("event") == event]


@pytest.mark.timeout(60)
async def test_compensation_giving_up_is_traced_logged_and_counted(
    orchestrator: OrchestratorFactory,
) -> None:
    """README: "Failed attempts carry an `exception` event with the error *type* and an
    error status; the attempt that ends the run carries `saga.run.status`"; metrics
    `saga.compensation.attempts` (with `saga.step`, `saga.outcome`, `error.type`) and
    `saga.runs.failed`; Logging: "A run that waits for an operator logs an error,
    `run_failed` ..., naming the step (or wait), attempt and error type that stopped it"."""
    tracing = Tracing()
    reader, meters = _meters()
    s = small_saga(
        "undo_gives_up",
        ["a", "b"],
        compensate={"a"},
        fail={"b": permanent(f"declined {SECRET}")},
        fail_undo={"a": Fail(RuntimeError, f"refund down {SECRET}")},
        undo_retry=saga.Retry(max_attempts=2, initial_delay=0.01, max_delay=0.02),
    )
    with capture_logs() as logs:
        await orchestrator(s, tracer_provider=tracing.provider, meter_provider=meters)
        run = await s.start(Job())
        with pytest.raises(saga.RunFailedError):
            await run.result(timeout=20)
        await _until(lambda: len(_by_name(tracing.spans(), "saga.compensate a")) >= 2, 5)
    undo = _by_name(tracing.spans(), "saga.compensate a")
    assert len(undo) == 2
    first, last = undo
    assert _attrs(first)["saga.outcome"] == "retry"
    assert _attrs(first)["error.type"] == "RuntimeError"
    assert first.status.status_code is StatusCode.ERROR
    assert _attrs(last)["saga.outcome"] == "failure"
    assert _attrs(last)["saga.kind"] == "compensation"
    assert _attrs(last)["saga.attempt"] == 2
    assert _attrs(last)["saga.run.status"] == "failed"
    assert last.status.status_code is StatusCode.ERROR
    assert [e.name for e in last.events] == ["exception"]
    for span in tracing.spans():
        assert SECRET not in str(span.attributes) + str(span.status.description)
        for ev in span.events:
            assert SECRET not in str(ev.attributes)
    failed = _of(logs, "run_failed")
    assert len(failed) == 1, [line["event"] for line in logs]
    line = failed[0]
    assert line["log_level"] == "error"
    assert line["run_id"] == str(run.id) and line["saga"] == "undo_gives_up"
    assert line["step"] == "a" and line["attempt"] == 2
    assert line["error_type"] == "RuntimeError"
    assert SECRET not in str(logs)
    found = points(reader)
    assert total(found, "saga.runs.failed", **{"saga.name": "undo_gives_up"}) == 1
    assert (
        total(
            found,
            "saga.compensation.attempts",
            **{"saga.step": "a", "saga.outcome": "failure", "error.type": "RuntimeError"},
        )
        == 1
    )

"""Tracing, metrics and logs at their edges: child runs in their parent's trace, the
outcomes spans and counters carry, lag of parallel steps, durations of runs whose last
reply was lost, and the step and attempt on every lease and commit log line."""

from __future__ import annotations

from typing import Any

import anyio
import asyncpg
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from pydantic import BaseModel
from structlog.testing import capture_logs

import saga
from saga.testing import Faults
from tests._sagas import Gate, Job, small_saga
from tests.conftest import OrchestratorFactory
from tests.test_telemetry import Tracing, points, total

#: README, "Tracing and metrics": the values saga.outcome takes.
DOCUMENTED_OUTCOMES = {
    "success",
    "retry",
    "failure",
    "lease_lost",
    "refused",
    "interrupted",
    "parked",
}


class Rows(BaseModel):
    n: int = 2


def _family(name: str) -> tuple[saga.Saga[Any], saga.Saga[Any]]:
    """A parent whose step ``loads`` starts ``n`` child runs of ``<name>_chunk``."""
    chunk = small_saga(f"{name}_chunk", ["load"], result=lambda ctx: ctx.input.n)
    parent = saga.Saga(f"{name}_parent", input=Rows)

    @parent.step()
    async def split(ctx: saga.Context[Rows]) -> int:
        return ctx.input.n

    parent.children(
        "loads", chunk, lambda ctx: [Job(n=i) for i in range(ctx.result(split))], after=[split]
    )
    return parent, chunk


async def _spans_settled(tracing: Tracing, count: int) -> None:
    with anyio.fail_after(5):
        while len(tracing.spans()) < count:  # noqa: ASYNC110
            await anyio.sleep(0.02)
    await anyio.sleep(0.2)  # the last span ends just after the result is visible


@pytest.mark.timeout(60)
async def test_child_runs_are_in_the_trace_of_the_step_that_started_them(
    orchestrator: OrchestratorFactory,
) -> None:
    """DESIGN: "one trace per run, parented to the span that called start()". A children
    step starts its child runs from inside its attempt, whose span is current: each
    child run's saga.start span is a child of that attempt span, in the parent's trace."""
    tracing = Tracing()
    parent, chunk = _family("fam")
    await orchestrator(parent, chunk, tracer_provider=tracing.provider)
    with tracing.provider.get_tracer("app").start_as_current_span("POST /imports") as request:
        run = await parent.start(Rows(n=2))
    assert await run.result(timeout=20) == [0, 1]
    await _spans_settled(tracing, 9)
    starts = [s for s in tracing.spans() if s.name == "saga.start fam_chunk"]
    assert len(starts) == 2
    loads = {
        s.context.span_id for s in tracing.spans() if s.name == "saga.step loads" and s.context
    }
    trace_id = request.get_span_context().trace_id
    for start in starts:
        assert start.context is not None
        assert start.parent is not None, "a child run's start span is a root"
        assert start.parent.span_id in loads
        assert start.context.trace_id == trace_id


@pytest.mark.timeout(60)
async def test_children_step_attempts_report_only_documented_outcomes(
    orchestrator: OrchestratorFactory,
) -> None:
    """Spans and the saga.step.attempts counter carry only the outcomes the README lists
    (`success`, `retry`, `failure`, `lease_lost`, `refused`, `interrupted`, and `parked`:
    a children step that found its children running and gave its slot back)."""
    tracing = Tracing()
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    parent, chunk = _family("park")
    await orchestrator(parent, chunk, tracer_provider=tracing.provider, meter_provider=meters)
    run = await parent.start(Rows(n=2))
    assert await run.result(timeout=20) == [0, 1]
    await _spans_settled(tracing, 8)
    span_outcomes = {str((s.attributes or {}).get("saga.outcome")) for s in tracing.spans()}
    span_outcomes.discard("None")  # saga.start spans have no outcome
    counted = {attrs["saga.outcome"] for attrs, _ in points(reader).get("saga.step.attempts", [])}
    assert span_outcomes <= DOCUMENTED_OUTCOMES, span_outcomes - DOCUMENTED_OUTCOMES
    assert counted <= DOCUMENTED_OUTCOMES, counted - DOCUMENTED_OUTCOMES


@pytest.mark.timeout(60)
async def test_scheduler_lag_counts_runnable_items_of_parallel_steps(
    orchestrator: OrchestratorFactory,
) -> None:
    """`saga.scheduler.lag` is "now minus the due time of the oldest runnable item", the
    items of runs whose steps run in parallel included: a graph run's first item left
    untaken (the worker's only slot busy) shows as lag, as it does in the queue gauges."""
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    gate = Gate("hold")
    blocker = small_saga("blocker", ["hold"], gate=gate)
    fan = small_saga("fan", ["a", "b", "c"], after={"b": ["a"], "c": ["a"]})
    await orchestrator(blocker, fan, concurrency=1, meter_provider=meters, census_interval=0.1)
    await blocker.start(Job())
    with anyio.fail_after(10):
        await gate.entered.wait()
    await fan.start(Job())
    try:
        with anyio.fail_after(10):  # the census shows the fan run waiting over a second
            while total(points(reader), "saga.queue.wait", **{"saga.name": "fan"}) < 1.5:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        found = points(reader)
        assert total(found, "saga.queue.depth", **{"saga.name": "fan"}) == 1
        lag = max(v for _, v in found["saga.scheduler.lag"])
        assert lag >= 1.0, f"saga.scheduler.lag = {lag} with a runnable item due 1.5 s ago"
    finally:
        gate.release.set()


@pytest.mark.timeout(30)
async def test_an_attempt_cancelled_for_a_lost_lease_logs_its_step_and_attempt(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """README, Logging: events carry `run_id`, `saga`, `step` and `attempt`: the
    `step_cancelled_lease_lost` warning (the heartbeat found the lease gone and
    cancelled the attempt) says which step and attempt."""
    gate = Gate("a")
    s = small_saga("cut", ["a"], gate=gate)
    with capture_logs() as logs:
        await orchestrator(s, lease_seconds=0.6)  # a heartbeat every 0.2 s
        run = await s.start(Job())
        with anyio.fail_after(5):
            await gate.entered.wait()
        await db.execute(
            "UPDATE saga.runs SET lease_owner = 'another-worker' WHERE id = $1", run.id
        )
        with anyio.fail_after(5):
            while not any(line["event"].endswith("_cancelled_lease_lost") for line in logs):  # noqa: ASYNC110
                await anyio.sleep(0.05)
        gate.release.set()
    line = next(line for line in logs if line["event"].endswith("_cancelled_lease_lost"))
    assert line["run_id"] == str(run.id)
    assert line["saga"] == "cut"
    missing = {"step", "attempt"} - set(line)
    assert not missing, f"{line['event']} lacks {sorted(missing)}: {line}"


@pytest.mark.timeout(60)
async def test_a_run_whose_final_commit_reply_was_lost_still_records_its_duration(
    orchestrator: OrchestratorFactory,
) -> None:
    """`saga.run.duration` records every run that ends, also one whose last write
    committed but whose reply was lost (resolved from the history): it is counted in
    saga.runs.completed and in the duration histogram alike."""
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    s = small_saga("dropped_reply", ["a"])
    faults = Faults()
    faults.drop_connection_at_commit("a")
    with capture_logs():
        faults.attach(await orchestrator(s, meter_provider=meters))
        run = await s.start(Job())
        assert await run.result(timeout=20) == "a"
        with anyio.fail_after(5):  # counted just after the commit that woke result()
            while total(points(reader), "saga.runs.completed") < 1:  # noqa: ASYNC110
                await anyio.sleep(0.02)
    found = points(reader)
    assert total(found, "saga.runs.completed", **{"saga.name": "dropped_reply"}) == 1
    durations = total(found, "saga.run.duration", **{"saga.name": "dropped_reply"})
    assert durations == 1, "the completed run is missing from saga.run.duration"


@pytest.mark.timeout(60)
async def test_an_ambiguous_commit_is_logged_with_its_step_and_attempt(
    orchestrator: OrchestratorFactory,
) -> None:
    """README, Logging: events carry `run_id`, `saga`, `step` and `attempt`: the
    `ambiguous_commit_resolved` line (the connection broke at a step's commit) says
    which step's and attempt's outcome was in doubt."""
    s = small_saga("doubt", ["a", "b"])
    faults = Faults()
    faults.drop_connection_at_commit("a")
    with capture_logs() as logs:
        faults.attach(await orchestrator(s))
        run = await s.start(Job())
        assert await run.result(timeout=20) == "b"
    lines = [line for line in logs if line["event"] == "ambiguous_commit_resolved"]
    assert lines, [line["event"] for line in logs]
    line = lines[0]
    assert (line["run_id"], line["saga"]) == (str(run.id), "doubt")
    missing = {"step", "attempt"} - set(line)
    assert not missing, f"ambiguous_commit_resolved lacks {sorted(missing)}: {line}"

"""User code that saga calls besides a step's function is in the run's trace.

DESIGN: "Every run is one trace in the user's OpenTelemetry backend". A sleep's
``until()`` runs as part of the step before it (its failure "fails the step's attempt"),
so a span it opens is a child of that attempt's span; a wait's ``on_timeout`` function
runs for the run, so a span it opens is in the run's trace, under ``saga.start``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from pydantic import BaseModel

import saga
from saga.testing import advance
from tests._sagas import Job, until_status
from tests.conftest import OrchestratorFactory
from tests.test_telemetry import Tracing

pytestmark = pytest.mark.timeout(60)


class Approval(BaseModel):
    ok: bool


async def _span(tracing: Tracing, name: str) -> ReadableSpan:
    with anyio.fail_after(10):
        while not [s for s in tracing.spans() if s.name == name]:  # noqa: ASYNC110
            await anyio.sleep(0.02)
    [span] = [s for s in tracing.spans() if s.name == name]
    return span


def _trace_of(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.trace_id


async def test_a_span_opened_in_a_sleeps_until_is_a_child_of_the_steps_attempt(
    orchestrator: OrchestratorFactory,
) -> None:
    """A span the sleep's ``until()`` opens (an instrumented call that asks when to wake)
    is in the run's trace, a child of the attempt span of the step before the sleep,
    like a span opened in the step itself."""
    tracing = Tracing()
    tracer = tracing.provider.get_tracer("app")
    s = saga.Saga("until_span", input=Job)

    @s.step()
    async def ask(ctx: saga.Context[Job]) -> str:
        with tracer.start_as_current_span("app.in_step"):
            return "asked"

    async def wake_at(ctx: saga.Context[Job]) -> datetime:
        with tracer.start_as_current_span("app.in_until"):
            return datetime.now(UTC)

    s.sleep(until=wake_at)

    @s.step()
    async def act(ctx: saga.Context[Job]) -> str:
        return "acted"

    await orchestrator(s, tracer_provider=tracing.provider)
    with tracer.start_as_current_span("POST /signup"):
        run = await s.start(Job())
    assert await run.result(timeout=20) == "acted"
    start = await _span(tracing, "saga.start until_span")
    attempt = await _span(tracing, "saga.step ask")
    in_step = await _span(tracing, "app.in_step")
    in_until = await _span(tracing, "app.in_until")
    assert _trace_of(in_step) == _trace_of(start)
    assert _trace_of(in_until) == _trace_of(start), "until()'s span began a trace of its own"
    assert in_until.parent is not None
    assert attempt.context is not None
    assert in_until.parent.span_id == attempt.context.span_id


async def test_a_span_opened_in_a_waits_on_timeout_is_in_the_runs_trace(
    orchestrator: OrchestratorFactory,
) -> None:
    """A span a wait's ``on_timeout`` function opens (the instrumented call that looks up
    a default decision) is in the run's trace, a child of its ``saga.start`` span."""
    tracing = Tracing()
    tracer = tracing.provider.get_tracer("app")
    s = saga.Saga("timeout_span", input=Job)

    @s.step()
    async def ask(ctx: saga.Context[Job]) -> str:
        return "asked"

    async def default_decision(ctx: saga.Context[Job]) -> Approval:
        with tracer.start_as_current_span("app.in_on_timeout"):
            return Approval(ok=True)

    s.wait_for("decision", Approval, timeout=timedelta(hours=1), on_timeout=default_decision)

    @s.step()
    async def act(ctx: saga.Context[Job]) -> str:
        return "acted"

    orch = await orchestrator(s, tracer_provider=tracing.provider)
    with tracer.start_as_current_span("POST /refunds"):
        run = await s.start(Job())
    await until_status(run, saga.RunStatus.WAITING)
    await advance(orch, run, timedelta(hours=2))
    assert await run.result(timeout=20) == "acted"
    start = await _span(tracing, "saga.start timeout_span")
    in_on_timeout = await _span(tracing, "app.in_on_timeout")
    assert _trace_of(in_on_timeout) == _trace_of(start), "on_timeout's span began its own trace"
    assert in_on_timeout.parent is not None
    assert start.context is not None
    assert in_on_timeout.parent.span_id == start.context.span_id

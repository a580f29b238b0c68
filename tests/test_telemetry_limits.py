"""The observability contract (README "Tracing and metrics", "Logging";
DESIGN "Observability") on the paths added today: callbacks hitting their time limit,
attempts given up for ignoring their timeout, starts whose caller was cancelled."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import anyio
import asyncpg
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from structlog.testing import capture_logs

import saga
from tests._sagas import Job, Ledger, ignore_cancellation_for, small_saga
from tests.conftest import ClientFactory, OrchestratorFactory
from tests.test_cancelled_callers import _slow_insert_of_key
from tests.test_telemetry import Tracing, points, total
from tests.test_waits import Decision, approval_saga, sleep_saga


async def test_an_until_past_its_limit_fails_the_attempt_in_its_span_and_counter_too(
    orchestrator: OrchestratorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README (Waits): "A sleep's `until()` and an `on_timeout` function have 60 s to
    return: past that they fail with `TimeoutError`, as if they had raised"; (Pivot
    steps) "a sleep's `until()` that raises stops it at the step before the sleep";
    (Tracing and metrics) "Failed attempts carry an `exception` event with the error
    *type* and an error status", `saga.step.attempts` counts "attempts by outcome and
    error type".

    until() past its (shortened) limit: the history and the log record attempt 1 of
    `first` as failed (step_failed, TimeoutError). Its span and saga.step.attempts
    say so too, not `success` with no error."""
    monkeypatch.setattr("saga._parked.CALLBACK_SECONDS", 0.3)
    tracing = Tracing()
    reader = InMemoryMetricReader()

    async def until(ctx: saga.Context[Job]) -> datetime:
        await anyio.sleep(30)
        return datetime.now(UTC)

    s = sleep_saga(Ledger(), until=until)
    with capture_logs() as logs:
        await orchestrator(
            s,
            tracer_provider=tracing.provider,
            meter_provider=MeterProvider(metric_readers=[reader]),
        )
        run = await s.start(Job(n=1))
        with anyio.fail_after(10), pytest.raises(saga.RunCompensatedError):
            await run.result()
        await anyio.sleep(0.3)  # the last span ends just after the result is visible
    failed = [(e.step, e.attempt) for e in await run.history() if e.kind == "step_failed"]
    assert failed == [("first", 1)], "premise: the history records the attempt failed"
    logged = [e for e in logs if e["event"] == "step_failed"]
    assert [(e["step"], e["error_type"]) for e in logged] == [("first", "TimeoutError")]
    spans = [dict(sp.attributes or {}) for sp in tracing.spans() if sp.name == "saga.step first"]
    outcomes = [(a.get("saga.attempt"), a.get("saga.outcome"), a.get("error.type")) for a in spans]
    assert outcomes == [(1, "failure", "TimeoutError")], (
        f"history and log: attempt 1 of first failed (TimeoutError); its span says {outcomes}"
    )
    found = points(reader)
    assert total(found, "saga.step.attempts", **{"error.type": "TimeoutError"}) == 1, found.get(
        "saga.step.attempts"
    )


async def test_a_start_whose_caller_was_cancelled_names_its_run_on_its_span(
    open_client: ClientFactory, db: asyncpg.Connection
) -> None:
    """README (Tracing and metrics): "`start()` records a `saga.start <saga>` span ...
    and stores its W3C context with the run" (every attempt of the run is its child);
    span attributes include `saga.run.id` and "`saga.run.created` (on `saga.start`)";
    (Durable start) a caller cancelled once the insert was sent "neither cancels nor
    loses the run: the insert completes, then the caller's cancellation proceeds".

    A start cancelled (asyncio.timeout) while its INSERT runs commits the run, whose
    attempts will all be children of that saga.start span: the span names the run
    (saga.run.id, saga.run.created=True) as any start's does."""
    tracing = Tracing()
    s = small_saga("cancelled_start", 1)
    client = await open_client(s, tracer_provider=tracing.provider)
    await _slow_insert_of_key(db, "k", 0.5)
    with anyio.fail_after(10), pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await client.start(s, Job(n=2), key="k")
    run_id = await db.fetchval("SELECT id FROM saga.runs WHERE idempotency_key = 'k'")
    assert run_id is not None, "premise: the run was committed"
    starts = [sp for sp in tracing.spans() if sp.name == "saga.start cancelled_start"]
    assert len(starts) == 1
    attrs = dict(starts[0].attributes or {})
    assert attrs.get("saga.run.id") == str(run_id), attrs
    assert attrs.get("saga.run.created") is True, attrs


async def test_an_unresponsive_on_timeout_is_logged_at_its_wait_not_a_step_never_run(
    orchestrator: OrchestratorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README (Logging): event names "with `run_id`, `saga`, `step` and `attempt`
    bound"; (Waits) an `on_timeout` function "that ignores the cancellation is given up
    as a step ignoring its timeout is" (Retries: "`step_unresponsive` is logged").

    The wait `decision`'s on_timeout ignores its (shortened) limit's cancellation and is
    given up: the step_unresponsive line names what was given up, the wait (as the
    run's own wait_timed_out line and history do), not `finish`, the step after it, which
    never started."""
    monkeypatch.setattr("saga._parked.CALLBACK_SECONDS", 0.3)

    async def default(ctx: saga.Context[Job]) -> Decision:
        await ignore_cancellation_for(3)
        return Decision(approved=True, by="late")

    s, _ = approval_saga(Ledger(), timeout=0.5, on_timeout=default, name="ignored_on_timeout")
    with capture_logs() as logs:
        await orchestrator(s, lease_seconds=0.5)
        run = await s.start(Job(n=1))
        with anyio.fail_after(10), pytest.raises(saga.RunError):
            await run.result()
        await anyio.sleep(3)  # the given-up functions end
    history = await run.history()
    assert "finish" not in {e.step for e in history}, "premise: finish never ran"
    unresponsive = [e for e in logs if e["event"] == "step_unresponsive"]
    assert unresponsive, "premise: the on_timeout function was given up"
    named = {(e.get("step"), e.get("attempt")) for e in unresponsive}
    assert {step for step, _ in named} == {"decision"}, (
        f"step_unresponsive names {sorted(named)}; the history names the wait: "
        f"{[(e.kind, e.step, e.attempt) for e in history]}"
    )

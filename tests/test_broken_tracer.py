"""A tracer provider of the application's that raises (a broken span processor or
exporter pipeline) costs runs their spans, never their steps, attempts or starts: the
failure is logged once (`tracing_failed`) and the work goes on untraced."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from structlog.testing import capture_logs

import saga
from tests._sagas import ONCE, Job, Ledger, small_saga
from tests.conftest import OrchestratorFactory


class _BrokenProcessor(SpanProcessor):
    """A span processor of the application's that raises (a bug in its exporter
    pipeline), either when a span starts or when it ends."""

    def __init__(self, when: str) -> None:
        self.when = when

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        if self.when == "start":
            raise RuntimeError("broken span processor")

    def on_end(self, span: Any) -> None:
        if self.when == "end":
            raise RuntimeError("broken span processor")


def _broken_provider(when: str) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(_BrokenProcessor(when))
    return provider


@pytest.mark.timeout(90)
async def test_a_tracer_provider_failing_at_span_start_does_not_make_a_run_retry_forever(
    orchestrator: OrchestratorFactory,
) -> None:
    """DESIGN "What users rely on" (Deploys are safe): "Nothing a step raises or returns,
    and no setting a user can pass, can stop an orchestrator or make a run retry
    forever." README "What you can rely on": "Retries follow the step's policy and the
    attempt limit always ends them." README "Tracing and metrics": "pass
    `tracer_provider=` ... to the `Orchestrator` to use others".

    With a `tracer_provider=` whose span processor raises in `on_start`, the run
    completes (untraced). Before, every claim of the run died in `attempt_span()` (an
    `internal_error` line), the lease expired and the next claim counted one more
    attempt, past the limit of 2, for ever: the run was still `running`, attempt ~25,
    25 s later."""
    s = small_saga("h31_span_start", ["a"], retry=saga.Retry(max_attempts=2, initial_delay=0.01))
    with capture_logs() as logs:
        await orchestrator(s, tracer_provider=_broken_provider("start"), lease_seconds=1.0)
        client = await orchestrator(s, concurrency=0)
        run = await client.start(s, Job())
        with anyio.move_on_after(25):
            while not (await run.info()).status.is_terminal:  # noqa: ASYNC110
                await anyio.sleep(0.2)
        info = await run.info()
    errors = [line["event"] for line in logs if line["event"] == "internal_error"]
    assert info.status.is_terminal, (
        f"run still {info.status} at attempt {info.attempt} (limit 2) after 25 s; "
        f"{len(errors)} internal_error lines"
    )
    assert info.attempt <= 3, info


@pytest.mark.timeout(90)
async def test_a_tracer_provider_failing_at_span_end_does_not_fail_steps_that_never_ran(
    orchestrator: OrchestratorFactory,
) -> None:
    """README "What you can rely on": "Steps run at least once; outcomes are recorded
    exactly once" and "A process that really dies (killed, `os._exit`, out of memory)
    loses its lease; the next claim counts that attempt"; DESIGN: "no setting a user
    can pass, can stop an orchestrator or make a run retry forever" (the
    `tracer_provider=` of "Tracing and metrics" is such a setting).

    With a `tracer_provider=` whose span processor raises in `on_end`, the run
    completes. Before, the worker recorded step `a`, then died on the attempt span's
    `end()`, abandoning step `b` that the same transition leased to it: `b`'s lease
    expired and counted as a lost attempt (`saga.AttemptLost`, `max_attempts=1`)
    without its function ever being called, and the run ended `compensated`."""
    ledger = Ledger()
    s = small_saga("h31_span_end", ["a", "b"], ledger=ledger, compensate=True, retry=ONCE)
    with capture_logs():
        await orchestrator(s, tracer_provider=_broken_provider("end"), lease_seconds=1.0)
        client = await orchestrator(s, concurrency=0)  # (its own start span ends fine)
        run = await client.start(s, Job())
        try:
            outcome: Any = await run.result(timeout=30)
        except saga.RunError as exc:
            outcome = exc
    assert outcome == "b", f"{outcome!r}; step calls: {ledger.trace(run.id)}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("when", ["start", "end"])
async def test_a_start_with_a_failing_tracer_returns_its_run_once(
    orchestrator: OrchestratorFactory, when: str
) -> None:
    """README ("What you can rely on"): "When `start()` returns, the run is committed";
    a start with no key that raised would be started again by its caller: the run would
    run twice. With a client whose tracer raises when the start's span starts (or ends,
    after the run committed), `start()` returns the run, which completes; the failure is
    logged once as `tracing_failed`, not raised. Before, a failure at the span's end
    raised RuntimeError from `start()` once the run was committed."""
    s = small_saga(f"h31_start_{when}", ["a"])
    await orchestrator(s)
    client = await orchestrator(s, concurrency=0, tracer_provider=_broken_provider(when))
    with capture_logs() as logs:
        runs = [await client.start(s, Job(n=n)) for n in range(2)]
    for run in runs:
        assert await run.result(timeout=10) == "a"
    failed = [line for line in logs if line["event"] == "tracing_failed"]
    assert [line["error_type"] for line in failed] == ["RuntimeError"], failed

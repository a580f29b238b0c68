"""What the history says of runs whose app restarted (a deploy: graceful shutdown with
runs in flight), and when a sleep whose end a slow ``until()`` computed wakes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio
import pytest
from pydantic import BaseModel

import saga
import saga.testing
from tests.conftest import OrchestratorFactory

pytestmark = pytest.mark.timeout(60)


class Slow(BaseModel):
    n: int = 1


async def _wait_for_starts(orch: saga.Orchestrator, run: saga.RunHandle, count: int) -> None:
    with anyio.fail_after(15):
        while True:
            history = await orch.get_run(run.id).history()
            if (
                sum(1 for e in history if e.kind == "step_started" and e.step == "long_step")
                >= count
            ):
                return
            await anyio.sleep(0.05)


@pytest.mark.parametrize("shape", ["linear", "graph"])
async def test_restarts_during_a_long_step_never_show_an_attempt_beyond_max_attempts(
    orchestrator: OrchestratorFactory, shape: str
) -> None:
    """README ("Retries"): "A worker shutting down gives its leases back without counting
    the interrupted attempts, once: an attempt given back a second time before any
    outcome (a step that ... never ends within `shutdown_timeout`) counts, so the attempt
    limit ends that too." ("Explicit states"): "Every transition is appended to the run's
    history with time ..., step, attempt". ("Operator API"): `timeline()` lists "each step
    and compensation attempt".

    An app (the FastAPI example's lifespan) restarted twice while a step longer than its
    shutdown_timeout runs: with max_attempts=1 the step runs as attempt 1 twice (the
    first give-back free, the second counted), and the next orchestrator ends the run
    with saga.AttemptLost, logging no start of an attempt 2 that never ran (the ended
    run's timeline would show it "running" for ever). Linear, and with steps in
    parallel."""
    s: saga.Saga[Slow] = saga.Saga(f"restarted_long_step_{shape}", input=Slow)

    @s.step(retry=saga.Retry(max_attempts=1), after=[] if shape == "graph" else None)
    async def long_step(ctx: saga.Context[Slow]) -> str:
        await anyio.sleep(60)  # longer than any shutdown_timeout here (cancellable)
        return "done"

    if shape == "graph":

        @s.step(after=[])
        async def beside(ctx: saga.Context[Slow]) -> str:
            return "beside"

    first = await orchestrator(s, shutdown_timeout=0.2)
    run = await first.start(s, Slow())
    await _wait_for_starts(first, run, 1)
    await first.aclose()  # deploy 1: the attempt is given back, not counted

    second = await orchestrator(s, shutdown_timeout=0.2)
    await _wait_for_starts(second, run, 2)
    await second.aclose()  # deploy 2: given back again before any outcome: it counts

    third = await orchestrator(s, shutdown_timeout=0.2)
    with pytest.raises(saga.RunCompensatedError) as raised:
        await third.get_run(run.id).result(timeout=20)
    assert raised.value.error is not None
    assert raised.value.error.type == "saga.AttemptLost"

    history = await third.get_run(run.id).history()
    started = [e.attempt for e in history if e.kind == "step_started" and e.step == "long_step"]
    assert all(a is not None and a <= 1 for a in started), (
        f"history logs step_started for attempts {started}; max_attempts is 1 and only "
        "attempt 1 ever ran"
    )
    attempts = saga.timeline(history)
    running = [(a.step, a.attempt) for a in attempts if a.outcome == "running"]
    assert not running, f"the ended run's timeline shows attempts still running: {running}"


async def test_a_restart_during_a_waits_timeout_function_is_not_recorded_as_the_next_step(
    orchestrator: OrchestratorFactory,
) -> None:
    """README ("Explicit states"): "Every transition is appended to the run's history with
    time ..., step, attempt, worker and error"; ("Operator API") `saga.timeline`: "each
    step and compensation attempt from the history"; (`saga show`) "every step and
    compensation attempt with worker, start, duration, outcome and error".

    An app restarted (graceful shutdown, as in a deploy) while a wait's `on_timeout`
    function runs: the next orchestrator runs the function again and the run goes on.
    The history names the wait as the lease given back, not the step after it (`pay`,
    which had not started), and the timeline shows `pay` with its one attempt."""
    s: saga.Saga[Slow] = saga.Saga("restart_in_on_timeout", input=Slow)
    running = anyio.Event()

    class Decision(BaseModel):
        ok: bool

    @s.step()
    async def hold(ctx: saga.Context[Slow]) -> str:
        return "held"

    async def fallback(ctx: saga.Context[Slow]) -> Decision:
        running.set()
        await anyio.sleep(2)  # longer than the shutdown_timeout below
        return Decision(ok=True)

    decision = s.wait_for("decision", Decision, timeout=timedelta(hours=1), on_timeout=fallback)

    @s.step()
    async def pay(ctx: saga.Context[Slow]) -> bool:
        return ctx.result(decision).ok

    first = await orchestrator(s, shutdown_timeout=0.2)
    run = await first.start(s, Slow())
    with anyio.fail_after(15):
        while (await first.get_run(run.id).info()).status is not saga.RunStatus.WAITING:  # noqa: ASYNC110 - polling the database
            await anyio.sleep(0.05)
    await saga.testing.advance(first, run, timedelta(hours=1))
    with anyio.fail_after(15):
        await running.wait()
    await first.aclose()  # a deploy while the timeout function runs

    second = await orchestrator(s, shutdown_timeout=0.2)
    assert await second.get_run(run.id).result(timeout=20) is True
    history = await second.get_run(run.id).history()
    first_start = next(
        i for i, e in enumerate(history) if e.kind == "step_started" and e.step == "pay"
    )
    before = [(e.kind, e.attempt) for e in history[:first_start] if e.step == "pay"]
    assert not before, f"history names step 'pay' before it started: {before}"
    pay_attempts = [(a.attempt, a.outcome) for a in saga.timeline(history) if a.step == "pay"]
    assert pay_attempts == [(1, "completed")], (
        f"the timeline shows attempts of 'pay' that never ran: {pay_attempts}"
    )


async def test_a_sleep_until_a_time_already_past_wakes_at_once(
    orchestrator: OrchestratorFactory,
) -> None:
    """README ("Waits"): "`saga.sleep(until=fn)` (a function, sync or async, of the
    context returning a timezone-aware `datetime`; a time already past wakes at once)",
    as in the README's `trial.sleep(until=lambda ctx: ctx.input.ends_at)`.

    An async `until()` that takes 1.5 s (it asks a billing API, say) and returns a time
    already 0.5 s past when it returns: the run wakes at once, not the time `until()`
    took after the time it returned."""
    s: saga.Saga[Slow] = saga.Saga("sleep_until_past", input=Slow)
    returned: list[datetime] = []

    @s.step()
    async def first(ctx: saga.Context[Slow]) -> str:
        return "first"

    async def ends_at(ctx: saga.Context[Slow]) -> datetime:
        called = datetime.now(UTC)
        await anyio.sleep(1.5)  # the function's own latency, well under its 60 s
        returned.append(called + timedelta(seconds=1))  # already 0.5 s past now
        return returned[-1]

    s.sleep(until=ends_at)

    @s.step()
    async def second(ctx: saga.Context[Slow]) -> str:
        return "second"

    orch = await orchestrator(s, poll_interval=0.1)
    run = await orch.start(s, Slow())
    assert await run.result(timeout=20) == "second"
    history = await run.history()
    woke = next(e for e in history if e.kind == "woke")
    late = (woke.at - returned[-1]).total_seconds()
    assert late < 0.75, (
        f"until() returned a time already past, yet the run woke {late:.2f} s after it "
        "(the time until() took was added to the sleep)"
    )

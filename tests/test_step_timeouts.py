"""A step's ``timeout`` holds against a function that swallows its cancellation.

README ("What you can rely on", Retries): past its timeout an attempt fails with
``TimeoutError``, even if the function swallowed its cancellation and returned (the late
result is not recorded); one still running ``lease_seconds`` after its timeout is given
up: ``step_unresponsive`` is logged, its heartbeats stop, and another attempt takes over
when its lease expires.
"""

from __future__ import annotations

import anyio
import pytest
from structlog.testing import capture_logs

import saga
from tests._sagas import Job, fast, ignore_cancellation_for
from tests.conftest import OrchestratorFactory


async def _swallow_then_return(seconds: float) -> str:
    """Sleeps; a cancellation is swallowed and the function returns at once."""
    try:
        await anyio.sleep(seconds)
    except BaseException:  # the hostile code under test
        return "late"
    return "slept"


def _saga(shape: str, calls: list[tuple[str, int]]) -> saga.Saga[Job]:
    s = saga.Saga(f"swallows_{shape}", input=Job)

    @s.step(retry=fast(3))
    async def first(ctx: saga.Context[Job]) -> str:
        return "first"

    @s.step(retry=fast(3), timeout=0.2, after=[first] if shape == "graph" else None)
    async def stubborn(ctx: saga.Context[Job]) -> str:
        calls.append(("stubborn", ctx.attempt))
        if ctx.attempt == 1 and ctx.input.fail == "":
            return await _swallow_then_return(5)
        return f"attempt {ctx.attempt}"

    @stubborn.compensate(retry=fast(3), timeout=0.2)
    async def undo(ctx: saga.Context[Job], result: str) -> None:
        calls.append(("undo", ctx.attempt))
        if ctx.attempt == 1:
            await _swallow_then_return(5)

    @s.step(retry=fast(1), after=[stubborn] if shape == "graph" else None)
    async def last(ctx: saga.Context[Job]) -> str:
        if ctx.input.fail:
            raise saga.PermanentError("declined")
        return ctx.result(stubborn)

    return s


@pytest.mark.parametrize("shape", ["linear", "graph"])
async def test_a_step_returning_after_swallowing_its_timeout_fails_that_attempt(
    orchestrator: OrchestratorFactory, shape: str
) -> None:
    """A step that catches its timeout's cancellation and returns a value: the attempt
    is a TimeoutError failure (in the history), its late value is not the step's result,
    and the retry's value is."""
    calls: list[tuple[str, int]] = []
    s = _saga(shape, calls)
    await orchestrator(s)
    run = await s.start(Job(n=1))
    with anyio.fail_after(10):
        assert await run.result() == "attempt 2"
    assert [c for c in calls if c[0] == "stubborn"] == [("stubborn", 1), ("stubborn", 2)]
    failed = [e for e in await run.history() if e.kind == "step_failed"]
    assert [(e.step, e.attempt, e.error and e.error.type) for e in failed] == [
        ("stubborn", 1, "TimeoutError")
    ]


@pytest.mark.parametrize("shape", ["linear", "graph"])
async def test_a_compensation_returning_after_swallowing_its_timeout_is_retried(
    orchestrator: OrchestratorFactory, shape: str
) -> None:
    """The same for a compensation: the swallowed timeout is a failed compensation
    attempt, retried by its own policy, not a compensation that succeeded."""
    calls: list[tuple[str, int]] = []
    s = _saga(shape, calls)
    await orchestrator(s)
    run = await s.start(Job(n=1, fail="yes"))
    with anyio.fail_after(10), pytest.raises(saga.RunCompensatedError):
        await run.result()
    assert [c for c in calls if c[0] == "undo"] == [("undo", 1), ("undo", 2)]


async def test_a_step_ignoring_its_timeout_is_given_up_and_taken_over(
    orchestrator: OrchestratorFactory,
) -> None:
    """A step that keeps running through its timeout's cancellation (6 s here, with a
    0.2 s timeout and a 1 s lease) does not hold its run: it is given up
    (step_unresponsive), another attempt takes over once its lease expires, and the run
    completes with that attempt's result while the first still runs."""
    attempts: list[int] = []
    s = saga.Saga("ignores_timeout", input=Job)

    @s.step(retry=fast(3), timeout=0.2, lease_seconds=1)
    async def stubborn(ctx: saga.Context[Job]) -> str:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            return await ignore_cancellation_for(6)
        return f"attempt {ctx.attempt}"

    with capture_logs() as logs:
        await orchestrator(s, concurrency=4)
        run = await s.start(Job(n=1))
        with anyio.fail_after(5):
            assert await run.result() == "attempt 2"
    assert attempts == [1, 2]
    unresponsive = [e for e in logs if e["event"] == "step_unresponsive"]
    assert [(e["step"], e["attempt"], e["log_level"]) for e in unresponsive] == [
        ("stubborn", 1, "error")
    ]


async def test_a_step_ignoring_its_timeout_gives_its_slot_back(
    orchestrator: OrchestratorFactory,
) -> None:
    """The attempt given up frees its worker slot: in an orchestrator of concurrency 1,
    the run is taken over by that same orchestrator while the first attempt still runs
    (for 6 s), instead of waiting for it."""
    attempts: list[int] = []
    s = saga.Saga("ignores_timeout_one_slot", input=Job)

    @s.step(retry=fast(3), timeout=0.2, lease_seconds=1)
    async def stubborn(ctx: saga.Context[Job]) -> str:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            return await ignore_cancellation_for(6)
        return f"attempt {ctx.attempt}"

    with capture_logs():
        await orchestrator(s, concurrency=1)
        run = await s.start(Job(n=1))
        with anyio.fail_after(5):
            assert await run.result() == "attempt 2"
    assert attempts == [1, 2]

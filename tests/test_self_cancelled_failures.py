"""User code that cancels its own task and then raises at once (the cancellation still
pending): its error is the attempt's failure, recorded at once, in a step, a
compensation or a sleep's until()."""

from __future__ import annotations

import asyncio
from typing import NoReturn

import anyio
import asyncpg
import pytest

import saga
from tests._sagas import Job, fast, small_saga
from tests.conftest import OrchestratorFactory

TWICE = fast(2)


async def _cancel_own_task_then_raise(exc: BaseException) -> NoReturn:
    """Cancel the step's own task (``asyncio.current_task().cancel()``), then raise at
    once: the cancellation is still pending when the exception escapes."""
    task = asyncio.current_task()
    assert task is not None
    task.cancel()
    raise exc


def _self_cancelling_saga(name: str, phase: str, exc: BaseException) -> saga.Saga[Job]:
    """reserve (compensated), then charge. ``phase`` says which cancels its own task and
    raises: charge (a step), or reserve's compensation (charge then fails for good)."""
    s = saga.Saga(name, input=Job)

    @s.step(retry=TWICE)
    async def reserve(ctx: saga.Context[Job]) -> str:
        return "held"

    @reserve.compensate(retry=TWICE)
    async def release(ctx: saga.Context[Job], held: str) -> None:
        if phase == "compensation":
            await _cancel_own_task_then_raise(exc)

    @s.step(retry=TWICE)
    async def charge(ctx: saga.Context[Job]) -> str:
        if phase == "step":
            await _cancel_own_task_then_raise(exc)
        raise saga.PermanentError("declined")

    return s


@pytest.mark.timeout(60)
@pytest.mark.parametrize("phase", ["step", "compensation"])
@pytest.mark.parametrize(
    "exc",
    [ValueError("after cancelling itself"), KeyboardInterrupt()],
    ids=["ValueError", "KeyboardInterrupt"],
)
async def test_a_step_that_cancels_its_own_task_and_raises_is_recorded_at_once(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection, phase: str, exc: BaseException
) -> None:
    """README "What you can rely on", "Nothing a step raises or returns stops an
    orchestrator": "Whatever escapes a step or compensation is that attempt's failure,
    recorded at once with its type and message: any `Exception`, ..., `KeyboardInterrupt`,
    ... or the step cancelling its own task (`asyncio.current_task().cancel()`)... Retries
    follow the step's policy".

    A step (or compensation) that calls ``asyncio.current_task().cancel()`` and then
    raises without awaiting (a home-made "abort": cancel, then raise the reason) leaves
    the cancellation pending: its error is recorded at once, retried by the policy, and
    the orchestrator goes on. Before, saga's own write of the outcome received that
    CancelledError: the worker logged `internal_error`, wrote nothing, and the run
    waited out its 30 s lease (the attempt then counted as lost)."""
    s = _self_cancelling_saga(f"self_cancel_{phase}", phase, exc)
    plain = small_saga("plain", ["double"], result=lambda ctx: ctx.input.n * 2, retry=None)
    orch = await orchestrator(s, plain, lease_seconds=30)
    run = await orch.start(s, Job(n=1))
    expected = saga.RunCompensatedError if phase == "step" else saga.RunFailedError
    try:
        with anyio.fail_after(15):
            with pytest.raises(expected) as raised:
                await run.result()
    except TimeoutError:
        kinds = [(e.kind, e.step, e.attempt) for e in await run.history()]
        pytest.fail(f"the attempt's failure was not recorded within 15 s; history: {kinds}")
    error = raised.value.error if phase == "step" else raised.value.compensation_error
    assert error is not None
    assert error.type == exception_name(exc)
    kind = "step_failed" if phase == "step" else "compensation_failed"
    failed = [e.attempt for e in await run.history() if e.kind == kind]
    assert failed == [1, 2]
    assert await db.fetchval("SELECT count(*) FROM saga.events WHERE kind = 'lease_expired'") == 0
    assert orch.is_open
    with anyio.fail_after(5):
        assert await (await orch.start(plain, Job(n=21))).result() == 42


def exception_name(exc: BaseException) -> str:
    return type(exc).__qualname__


@pytest.mark.timeout(60)
async def test_an_until_that_cancels_its_own_task_and_raises_rolls_the_run_back_at_once(
    orchestrator: OrchestratorFactory,
) -> None:
    """README (Waits): a sleep's `until()` that raises rolls the run back, step included
    (the failure of a function saga calls, recorded as the step's); "What you can rely
    on": the step cancelling its own task is a failure like any.

    until() cancels its own task and raises ValueError at once: the run ends compensated
    with that ValueError within seconds, not after its lease (the pending cancellation
    would land in saga's write, as in a step before its fix)."""
    s = saga.Saga("self_cancel_until", input=Job)

    @s.step()
    async def hold(ctx: saga.Context[Job]) -> int:
        return 1

    @hold.compensate
    async def release(ctx: saga.Context[Job], n: int) -> None:
        return None

    async def until(ctx: saga.Context[Job]) -> NoReturn:
        await _cancel_own_task_then_raise(ValueError("no date"))

    s.sleep(until=until)

    @s.step()
    async def after(ctx: saga.Context[Job]) -> int:
        return 2

    orch = await orchestrator(s, lease_seconds=30)
    run = await orch.start(s, Job())
    with anyio.fail_after(15), pytest.raises(saga.RunCompensatedError) as raised:
        await run.result()
    assert raised.value.error is not None
    assert raised.value.error.type == "ValueError"
    assert orch.is_open

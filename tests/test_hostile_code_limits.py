"""Hostile user code against saga's time limits and self-cancels (DESIGN: nothing a step
raises or returns, and no setting a user can pass, can stop an orchestrator or make a
run retry forever)."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import asyncpg
import pytest
from pydantic import BaseModel, field_validator
from structlog.testing import capture_logs

import saga
from tests._sagas import Job, fast, small_saga
from tests.conftest import OrchestratorFactory
from tests.test_waits import Decision

TWICE = fast(2)


def _plain() -> saga.Saga[Job]:
    return small_saga("plain", ["double"], result=lambda ctx: ctx.input.n * 2, retry=None)


async def _still_works(orch: saga.Orchestrator, plain: saga.Saga[Job]) -> None:
    assert orch.is_open, "the orchestrator stopped"
    with anyio.fail_after(5):
        assert await (await orch.start(plain, Job(n=21))).result() == 42


# -- schedules: BaseExceptions from the saga's own functions; late inputs ---------------


class _Custom(BaseException):
    pass


def _key_raising(job: Job) -> str:
    raise _Custom("key")


def _priority_raising(job: Job) -> int:
    raise _Custom("priority")


class _TouchyJob(BaseModel):
    n: int = 0

    @field_validator("n")
    @classmethod
    def _check(cls, value: int) -> int:
        raise _Custom("validator")


@pytest.mark.parametrize("where", ["concurrency_key", "priority", "input validator"])
async def test_a_scheduled_saga_whose_own_function_raises_a_base_exception(
    orchestrator: OrchestratorFactory, where: str
) -> None:
    """DESIGN ("Deploys are safe"): no setting a user can pass can stop an orchestrator;
    README (Schedules): a slot whose start is refused is logged (schedule_start_refused)
    and tried again. Here the scheduled saga's concurrency_key (or priority) function,
    or its input model's validator (the input function returns a mapping, "validated
    against the saga's input"), lets a BaseException escape at the slot's start()
    (saga/_traffic.py _call and saga/_scheduler.py _start_slot catch only Exception):
    the orchestrator stays open and keeps running other runs."""
    options: dict[str, Any] = {}
    model: type[BaseModel] = Job
    source: Any = Job(n=1)
    if where == "concurrency_key":
        options["concurrency_key"] = _key_raising
    elif where == "priority":
        options["priority"] = _priority_raising
    else:
        model, source = _TouchyJob, (lambda slot: {"n": 1})
    s = saga.Saga(f"traffic_{where.replace(' ', '_')}", input=model, **options)

    @s.step()
    async def only(ctx: saga.Context[Any]) -> int:
        return 1

    plain = _plain()
    sched = saga.Scheduled("t", s, saga.Schedule.every(timedelta(seconds=1)), source)
    with capture_logs() as logs:
        orch = await orchestrator(s, plain, schedules=[sched], poll_interval=0.2)
        await anyio.sleep(2.5)
        await _still_works(orch, plain)
    assert any(e["event"] == "schedule_start_refused" for e in logs)


@pytest.mark.timeout(60)
async def test_a_schedule_input_swallowing_its_10_s_limit_is_not_used(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """README (Schedules): a slot whose input function (async) takes more than 10 s is
    logged (schedule_input_failed) and tried again. One that swallows the cancellation
    of its limit and returns its value late took more than 10 s too: no run starts with
    that late value (steps, until() and on_timeout get TimeoutError in that case)."""

    async def late(slot: Any) -> Job:
        try:
            await anyio.sleep(30)
        except BaseException:  # the hostile code under test
            return Job(n=7)
        return Job(n=8)

    s = small_saga("sched_swallow10", 1)
    sched = saga.Scheduled("swallows10", s, saga.Schedule.every(timedelta(seconds=1)), late)
    with capture_logs() as logs:
        await orchestrator(s, schedules=[sched], poll_interval=0.2)
        await anyio.sleep(12)
    started = await db.fetchval(
        "SELECT count(*) FROM saga.runs WHERE idempotency_key LIKE 'schedule:swallows10:%'"
    )
    assert started == 0, f"{started} runs started with inputs computed past the 10 s limit"
    assert any(e["event"] == "schedule_input_failed" for e in logs)


# -- user code cancelling its own task ----------------------------------------------------


async def _self_cancel_return() -> None:
    """Cancel the own task and return at once: the cancel is still pending on return."""
    task = asyncio.current_task()
    assert task is not None
    task.cancel()


PLACES = [
    "step",
    "graph step",
    "compensation",
    "graph compensation",
    "until",
    "on_timeout",
    "inputs",
]


def _place_saga(place: str, bad: Any, plain: saga.Saga[Job]) -> saga.Saga[Job]:
    name = "p_" + place.replace(" ", "_")
    s = saga.Saga(name, input=Job)
    graph = place.startswith("graph") or place == "inputs"

    @s.step(retry=TWICE)
    async def first(ctx: saga.Context[Job]) -> int:
        return 1

    @first.compensate(retry=TWICE)
    async def undo_first(ctx: saga.Context[Job], n: int) -> None:
        if place.endswith("compensation"):
            await bad()

    if place == "until":

        async def until(ctx: saga.Context[Job]) -> datetime:
            await bad()
            return datetime.now(UTC)

        s.sleep(until=until)
    elif place == "on_timeout":

        async def default(ctx: saga.Context[Job]) -> Decision:
            await bad()
            return Decision(approved=True, by="x")

        s.wait_for("decision", Decision, timeout=0.2, on_timeout=default)
    elif place == "inputs":

        async def inputs(ctx: saga.Context[Job]) -> list[Job]:
            await bad()
            return []

        kids = s.children("kids", plain, inputs, after=[first])

    @s.step(retry=TWICE, after=([kids] if place == "inputs" else [first]) if graph else None)
    async def second(ctx: saga.Context[Job]) -> int:
        if place in ("step", "graph step"):
            await bad()
        if place.endswith("compensation"):
            raise saga.PermanentError("roll back")
        return 2

    return s


@pytest.mark.parametrize("place", PLACES)
async def test_user_code_cancelling_its_own_task_then_returning_is_recorded_at_once(
    orchestrator: OrchestratorFactory, place: str
) -> None:
    """README ("Nothing a step raises or returns stops an orchestrator"): "Whatever
    escapes a step or compensation is that attempt's failure, recorded at once: ...
    the step cancelling its own task (`asyncio.current_task().cancel()`)"; until() and
    on_timeout failing roll the run back. Here the user's function (a step, a graph
    step, a compensation, until(), on_timeout, a children step's inputs) calls
    current_task().cancel() and returns at once, so the cancel is still pending when
    saga's code goes on: it lands in saga's own checkpoint write (logged as
    `internal_error` by saga/_runner.py guard), the outcome is dropped and the run waits
    out its 30 s lease (`lease_expired`), attempt after attempt, ending with AttemptLost
    instead of the value returned. call_user (saga/_call.py) never looks at whether the
    call left a cancel pending on its task. Expected: the run ends within 5 s, no lease
    waited out, the orchestrator keeps running other runs."""
    plain = _plain()
    s = _place_saga(place, _self_cancel_return, plain)
    with capture_logs() as logs:
        orch = await orchestrator(s, plain, lease_seconds=30)
        run = await orch.start(s, Job(n=1))
        with anyio.fail_after(5):
            with contextlib.suppress(saga.RunError):
                await run.result()
        await _still_works(orch, plain)
    assert not [e for e in logs if e["event"] in ("internal_error", "lease_expired")]


async def test_a_step_past_its_timeout_after_swallowing_a_self_cancel_fails_with_timeout_error(
    orchestrator: OrchestratorFactory,
) -> None:
    """README (Retries): "a per-attempt timeout: past it the attempt fails with
    TimeoutError". A step that once cancelled its own task and swallowed that
    cancellation, then runs past its 0.3 s timeout: the attempt is recorded as
    asyncio.CancelledError ("Cancelled via cancel scope ...; reason: deadline exceeded")
    instead of TimeoutError (so `non_retryable=(TimeoutError,)` or an error-type alert
    would not apply). The task's cancel count, left raised by the swallowed
    cancellation, keeps anyio's scope from taking its own cancellation back, and
    saga/_aio.py time_limit only turns a scope exit without exception into TimeoutError."""
    s = saga.Saga("self_swallow_timeout", input=Job)

    @s.step(retry=fast(3), timeout=0.3)
    async def first(ctx: saga.Context[Job]) -> int:
        if ctx.attempt == 1:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):  # the hostile code under test
                await asyncio.sleep(0.01)
            await asyncio.sleep(5)
        return ctx.attempt

    with capture_logs():
        await orchestrator(s)
        run = await s.start(Job(n=1))
        with anyio.fail_after(5):
            assert await run.result() == 2
    failed = [e for e in await run.history() if e.kind == "step_failed"]
    assert [(e.attempt, e.error and e.error.type) for e in failed] == [(1, "TimeoutError")]


async def test_an_until_past_its_limit_after_swallowing_a_self_cancel_fails_with_timeout_error(
    orchestrator: OrchestratorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README (Waits): "A sleep's `until()` and an `on_timeout` function have 60 s to
    return: past that they fail with `TimeoutError`". The same root cause as the step's
    timeout above (saga/_aio.py time_limit): an until() that swallowed a cancel of its
    own task, then runs past its limit (shortened to 0.3 s, as the project's own tests
    do), rolls the run back with asyncio.CancelledError instead of TimeoutError."""
    monkeypatch.setattr("saga._parked.CALLBACK_SECONDS", 0.3)
    s = saga.Saga("self_swallow_until", input=Job)

    @s.step(retry=TWICE)
    async def first(ctx: saga.Context[Job]) -> int:
        return 1

    @first.compensate
    async def undo_first(ctx: saga.Context[Job], n: int) -> None:
        return None

    async def until(ctx: saga.Context[Job]) -> datetime:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):  # the hostile code under test
            await asyncio.sleep(0.01)
        await asyncio.sleep(5)
        return datetime.now(UTC)

    s.sleep(until=until)

    @s.step(retry=TWICE)
    async def second(ctx: saga.Context[Job]) -> int:
        return 2

    with capture_logs():
        await orchestrator(s)
        run = await s.start(Job(n=1))
        with anyio.fail_after(5), pytest.raises(saga.RunCompensatedError) as raised:
            await run.result()
    assert raised.value.error is not None
    assert raised.value.error.type == "TimeoutError", raised.value.error

"""User code saga calls outside a step's own function (a children step's inputs, a
schedule's input, a saga's concurrency key) that cancels its own task then raises is a
failure like any, never a stopped orchestrator; code that blocks past its time limit
without an await is late all the same."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any, NoReturn

import anyio
import asyncpg
import pytest
from structlog.testing import capture_logs

import saga
from tests._sagas import Job, fast, small_saga
from tests.conftest import OrchestratorFactory

Ctx = saga.Context[Any]
TWICE = fast(2)
EVERY_SECOND = saga.Schedule.every(timedelta(seconds=1))


def _cancel_own_task_then_raise(exc: BaseException) -> NoReturn:
    """``asyncio.current_task().cancel()``, then raise at once: the cancellation is still
    pending when the exception escapes (as in tests/test_self_cancelled_failures.py)."""
    task = asyncio.current_task()
    assert task is not None
    task.cancel()
    raise exc


def _plain() -> saga.Saga[Job]:
    return small_saga("plain", ["double"], result=lambda ctx: ctx.input.n * 2, retry=None)


@pytest.mark.timeout(60)
async def test_children_inputs_that_cancel_their_own_task_then_raise_are_recorded_at_once(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """README "What you can rely on", "Nothing a step raises or returns stops an
    orchestrator": "Whatever escapes a step or compensation is that attempt's failure,
    recorded at once with its type and message: ... or the step cancelling its own task
    (`asyncio.current_task().cancel()`)"; README "Child sagas" (Started once): a children
    step's `inputs(ctx)` is the step's code ("a step (or compensation, or a children
    step's `inputs`) whose code ...").

    A children step's ``inputs`` that cancels its own task then raises: the failure is
    recorded at once. Before, the cancellation stayed pending (settled only when inputs
    returned) and landed in saga's write: nothing was recorded within 15 s (lease 30 s)."""
    child = small_saga("kid", ["load"])
    parent = saga.Saga("selfcancel_parent", input=Job)

    def inputs(ctx: Ctx) -> list[Job]:
        _cancel_own_task_then_raise(ValueError("after cancelling itself"))

    parent.children("kids", child, inputs, max_children=5)
    plain = _plain()
    orch = await orchestrator(parent, child, plain, lease_seconds=30)
    run = await orch.start(parent, Job(n=1))
    try:
        with anyio.fail_after(15):
            with pytest.raises((saga.RunCompensatedError, saga.RunFailedError)) as raised:
                await run.result()
    except TimeoutError:
        kinds = [(e.kind, e.step, e.attempt) for e in await run.history()]
        pytest.fail(f"the inputs' failure was not recorded within 15 s; history: {kinds}")
    error = raised.value.error
    assert error is not None
    assert error.type == "ValueError"
    assert await db.fetchval("SELECT count(*) FROM saga.events WHERE kind = 'lease_expired'") == 0
    assert orch.is_open
    with anyio.fail_after(5):
        assert await (await orch.start(plain, Job(n=21))).result() == 42


@pytest.mark.timeout(60)
async def test_a_schedule_input_that_cancels_its_own_task_then_raises_is_logged(
    orchestrator: OrchestratorFactory,
) -> None:
    """README "Schedules": "A slot whose input function raises (or, async, takes more
    than 10 s) ... is logged (`schedule_input_failed`, `schedule_start_refused`) and
    tried again every second while it is within `grace`".

    An input function that cancels its own task then raises is logged
    (`schedule_input_failed`) and tried again, and the orchestrator goes on. Before, the
    cancellation stayed pending, landed in the firing transaction, nothing was logged,
    and the orchestrator stopped (``is_open`` false)."""
    s = small_saga("sched_selfcancel", 1)
    plain = _plain()
    calls = 0

    async def build(slot: Any) -> Job:  # (a sync one runs in a thread: it has no task)
        nonlocal calls
        calls += 1
        _cancel_own_task_then_raise(ValueError("after cancelling itself"))

    bad = saga.Scheduled("selfcancel", s, EVERY_SECOND, build)
    with capture_logs() as logs:
        orch = await orchestrator(s, plain, schedules=[bad], poll_interval=0.2)
        await anyio.sleep(3.5)
        errors = [
            {k: v for k, v in e.items() if k != "exc_info"}
            for e in logs
            if e.get("log_level") in ("error", "critical")
        ]
        assert orch.is_open, f"the orchestrator stopped; input called {calls} times; {errors}"
        with anyio.fail_after(5):
            assert await (await orch.start(plain, Job(n=21))).result() == 42
    failed = [e for e in logs if e.get("event") == "schedule_input_failed"]
    assert failed, (
        f"no schedule_input_failed in {len(logs)} log lines "
        f"({sorted({str(e.get('event')) for e in logs})}); input called {calls} times"
    )
    assert failed[0].get("error_type") == "ValueError"


@pytest.mark.timeout(60)
async def test_a_concurrency_key_that_cancels_its_own_task_then_raises_on_a_scheduled_start(
    orchestrator: OrchestratorFactory,
) -> None:
    """README "Schedules": "A slot whose input function raises ..., or whose start is
    refused ..., is logged (`schedule_input_failed`, `schedule_start_refused`) and tried
    again every second while it is within `grace`"; saga/_scheduler.py _start_slot: "the
    saga's key, priority or validators raising included, whatever they raise: they
    cannot stop the orchestrator"; DESIGN: no setting a user can pass stops an
    orchestrator.

    A saga's ``concurrency_key`` function that cancels its own task then raises, on a
    scheduled start: ``schedule_start_refused`` is logged and the orchestrator goes on.
    Before, the cancellation stayed pending inside the firing transaction and the
    orchestrator stopped (``is_open`` false, ``orchestrator_crashed``)."""
    calls = 0

    def key(job: Job) -> str:
        nonlocal calls
        calls += 1
        _cancel_own_task_then_raise(ValueError("after cancelling itself"))

    s = saga.Saga("sched_keyed", input=Job, concurrency_key=key)

    @s.step()
    async def only(ctx: Ctx) -> int:
        return 1

    plain = _plain()
    bad = saga.Scheduled("keyed", s, EVERY_SECOND, Job(n=1))
    with capture_logs() as logs:
        orch = await orchestrator(s, plain, schedules=[bad], poll_interval=0.2)
        await anyio.sleep(3.5)
        errors = [
            {k: v for k, v in e.items() if k != "exc_info"}
            for e in logs
            if e.get("log_level") in ("error", "critical")
        ]
        assert orch.is_open, f"the orchestrator stopped; key called {calls} times; {errors}"
        with anyio.fail_after(5):
            assert await (await orch.start(plain, Job(n=21))).result() == 42
    assert any(e.get("event") == "schedule_start_refused" for e in logs)


@pytest.mark.timeout(60)
async def test_a_step_that_blocks_past_its_timeout_then_returns_fails_with_timeout(
    orchestrator: OrchestratorFactory,
) -> None:
    """README "What you can rely on", "Retries": "a per-attempt `timeout`: past it the
    attempt fails with `TimeoutError`, even if the function swallowed its cancellation
    and returned (the late result is not recorded)".

    An async step whose code blocks the loop past its timeout (a sync library call)
    and then returns fails with TimeoutError; its late result is not recorded. Before,
    the limit was a cancel scope that a blocked loop never delivered: the late result
    was recorded and the run completed."""

    s = saga.Saga("blocking_step", input=Job)

    @s.step(timeout=0.5, retry=saga.Retry(max_attempts=1))
    async def slow(ctx: Ctx) -> str:
        time.sleep(1.5)  # noqa: ASYNC251 - a sync call inside an async step: nothing can cancel it
        return "late"

    orch = await orchestrator(s)
    run = await orch.start(s, Job(n=1))
    failure: saga.RunError | None = None
    with anyio.fail_after(20):
        try:
            result = await run.result()
        except saga.RunError as exc:
            failure = exc
    kinds = [(e.kind, e.step) for e in await run.history()]
    assert failure is not None, f"the late result {result!r} was recorded; history: {kinds}"
    error = getattr(failure, "error", None)
    assert error is not None, repr(failure)
    assert error.type == "TimeoutError", repr(failure)

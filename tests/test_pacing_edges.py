"""Pacing and bookkeeping edges: a failing schedule input is tried again after a second
(not at once), a slow input does not make the scheduler loop spin, a reclaimed
compensation after an operator's retry logs its start, and a children step whose outputs
are too large fails with PayloadTooLargeError (not ChildFailed) once its children are
undone."""

from __future__ import annotations

import itertools
import time
from datetime import timedelta
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

import saga
from tests._sagas import Job, small_saga
from tests.conftest import OrchestratorFactory

EVERY_SECOND = saga.Schedule.every(timedelta(seconds=1))


# -- scheduler ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_a_failing_schedule_input_is_tried_again_after_a_second_not_at_once(
    orchestrator: OrchestratorFactory,
) -> None:
    """README: an on-time slot whose input function raises is logged with
    ``retry_in=1.0`` and tried again every second while within grace. Every call is for
    the same slot (a failing slot holds back the later ones), so no two calls come less
    than about a second apart, however the scheduler's loop and its per-schedule tasks
    interleave."""
    calls: list[float] = []

    def failing(slot: Any) -> Job:  # (in a thread of its own: no event loop there)
        calls.append(time.monotonic())
        raise ValueError("no input for this slot")

    s = small_saga("sched_retry", 1)
    bad = saga.Scheduled("bad", s, EVERY_SECOND, failing)
    with capture_logs() as logs:
        orch = await orchestrator(s, schedules=[bad], poll_interval=0.2)
        await anyio.sleep(3.0)
        await orch.aclose()
    failed = [e for e in logs if e["event"] == "schedule_input_failed"]
    assert failed
    assert {e["retry_in"] for e in failed} == {1.0}
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(calls)]
    assert len(calls) >= 2
    assert min(gaps) >= 0.5, f"the failing slot was tried again after {gaps} s"


@pytest.mark.timeout(60)
async def test_a_slow_schedule_input_does_not_make_the_scheduler_loop_spin(
    orchestrator: OrchestratorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An every-second schedule whose async input function takes 2.5 s: while its task
    runs, the scheduler's loop leaves that schedule alone and waits for the poll interval
    (0.2 s) or the task's end, rather than polling the still-due row every 10 ms; over
    3.5 s the ``schedules_due`` queries stay in the tens, not the hundreds."""
    from saga._store_sched import ScheduleQueries

    calls = 0
    original = ScheduleQueries.schedules_due

    async def counting(self: Any, conn: Any, names: Any) -> Any:
        nonlocal calls
        calls += 1
        return await original(self, conn, names)

    monkeypatch.setattr(ScheduleQueries, "schedules_due", counting)

    async def slow(slot: Any) -> Job:
        await anyio.sleep(2.5)
        return Job()

    s = small_saga("sched_slow", 1)
    sched = saga.Scheduled("slow", s, EVERY_SECOND, slow)
    orch = await orchestrator(s, schedules=[sched], poll_interval=0.2)
    await anyio.sleep(3.5)
    await orch.aclose()
    assert calls <= 50, f"{calls} schedules_due transactions in 3.5 s"


# -- lost attempts -----------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_a_reclaimed_compensation_after_an_operator_retry_logs_its_start(
    orchestrator: OrchestratorFactory,
) -> None:
    """DESIGN: the history records "what ran, when, on which worker, which attempt".
    An operator's ``retry()`` of a run failed at its compensation resumes it with fresh
    attempt numbers, so the history already holds a ``compensation_started`` of attempt
    2 from before. After the retry, attempt 1's worker dies and attempt 2 takes over and
    completes: the history after the retry shows that attempt 2 starting (logged by the
    worker that took over), before its ``compensation_completed``."""
    from saga.testing import Faults
    from tests._sagas import Ledger, fast, permanent

    effects = Ledger()
    s = small_saga(
        "redo",
        ["a", "b"],
        compensate={"a"},
        ledger=effects,
        fail={"b": permanent("declined")},
        retry=fast(1),
        undo_retry=fast(2),
    )
    faults = Faults()
    faults.fail_compensation("a", times=2)
    orch = await orchestrator(s, lease_seconds=0.5)
    faults.attach(orch)
    run = await s.start(Job(n=1))
    with pytest.raises(saga.RunFailedError):
        await run.result(timeout=20)
    before = len(await run.history())
    faults.crash_after("a", compensation=True)
    await run.retry()
    with pytest.raises(saga.RunCompensatedError):
        await run.result(timeout=20)
    assert effects.attempts("a", "compensation")[-2:] == [1, 2]  # both ran after the retry
    after = (await run.history())[before:]
    undo = [(e.kind, e.attempt) for e in after if e.kind.startswith("compensation_")]
    assert undo == [
        ("compensation_started", 1),
        ("compensation_started", 2),
        ("compensation_completed", 2),
    ], f"history after the retry: {[(e.kind, e.step, e.attempt) for e in after]}"


# -- children ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_a_children_step_whose_outputs_are_too_large_fails_with_payload_too_large(
    orchestrator: OrchestratorFactory,
) -> None:
    """A children step whose children's outputs together are above
    ``max_payload_bytes`` (8 of 900 bytes, a limit of 4,000) fails for good with a
    PayloadTooLargeError once its children are undone (each compensates: the step waits
    for them), not with the ChildFailed their undoing looks like; the run is
    compensated."""
    chunk = saga.Saga("chunk", input=Job)

    @chunk.step()
    async def load(ctx: saga.Context[Job]) -> str:
        return "x" * 900

    @load.compensate
    async def unload(ctx: saga.Context[Job], result: str) -> None:
        return None

    parent = saga.Saga("fan", input=Job)

    @parent.step()
    async def split(ctx: saga.Context[Job]) -> int:
        return 8

    parent.children(
        "loads", chunk, lambda ctx: [Job(n=i) for i in range(ctx.result(split))], after=[split]
    )
    orch = await orchestrator(parent, chunk, max_payload_bytes=4000)
    run = await orch.start(parent, Job(n=1))
    with pytest.raises(saga.RunCompensatedError) as raised:
        await run.result(timeout=30)
    error = raised.value.error
    assert error is not None
    assert (error.type, error.step) == ("saga.PayloadTooLargeError", "loads"), (
        f"the run failed with {error.type} at {error.step}: {error.message}"
    )

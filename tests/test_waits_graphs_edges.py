"""Waits and parallel steps in combination: a cancel while parked before the pivot, a
sleep until a time past, a graph cancelled while a branch fails retryably, a graph run's
due time in a backoff, and a children step after the pivot."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio
import pytest
from pydantic import BaseModel

import saga
from saga.testing import advance
from tests._sagas import FAST, Gate, Job, Ledger, small_saga, transient, until_status
from tests.conftest import ClientFactory, OrchestratorFactory

pytestmark = pytest.mark.timeout(60)


class Go(BaseModel):
    ok: bool = True


def _before_pivot(ledger: Ledger, parked: str) -> saga.Saga[Job]:
    """reserve (compensated) -> a sleep or wait -> capture (the pivot) -> ship."""
    s = saga.Saga(f"pv_{parked}", input=Job)

    @s.step(retry=FAST)
    async def reserve(ctx: saga.Context[Job]) -> int:
        ledger.record(ctx)
        return 1

    @reserve.compensate
    async def release(ctx: saga.Context[Job], n: int) -> None:
        ledger.record(ctx, n)

    if parked == "sleeping":
        s.sleep(timedelta(days=1))
    else:
        # Before the pivot a compensating timeout is allowed; "stop" for the stopped case.
        s.wait_for(
            "go", Go, timeout=3600, on_timeout="stop" if parked == "stopped" else "compensate"
        )

    @s.step(retry=FAST, pivot=True)
    async def capture(ctx: saga.Context[Job]) -> int:
        ledger.record(ctx)
        return 2

    @s.step(retry=FAST)
    async def ship(ctx: saga.Context[Job]) -> int:
        ledger.record(ctx)
        return 3

    return s


@pytest.mark.parametrize("parked", ["sleeping", "waiting", "stopped"])
async def test_a_run_parked_before_its_pivot_can_still_be_cancelled(
    orchestrator: OrchestratorFactory, parked: str
) -> None:
    """README, Pivot steps: "A cancel is refused (`InvalidRunStateError`) from the moment
    the run reaches its pivot", and Waits: "Cancelling a sleeping, waiting or stopped run
    compensates what completed at once" (for "stop": the operator "sends the awaited
    signal ..., or retries it ..., or cancels it"). A run sleeping or waiting (or stopped
    at a timed-out wait) *before* its pivot step has not reached it (a compensating
    timeout there is even allowed): its cancel must compensate `reserve`. Instead the
    cancel is refused: sleeping or waiting, "reached its pivot step 'capture'" (the
    parked run's current step is the step after the sleep or wait: the pivot); stopped
    at the wait, "already ended stopped" (a stopped run is cancellable everywhere else).
    The run can then only go on through its pivot or time out."""
    ledger = Ledger()
    s = _before_pivot(ledger, parked)
    orch = await orchestrator(s)
    run = await orch.start(s, Job())
    await until_status(run, saga.RunStatus.SLEEPING, saga.RunStatus.WAITING)
    if parked == "stopped":
        await advance(orch, run, 3600)
        await until_status(run, saga.RunStatus.STOPPED)
    assert "capture" not in (await run.info()).completed_steps
    await run.cancel()  # raises InvalidRunStateError: "reached its pivot step 'capture'"
    with pytest.raises(saga.RunCancelledError):
        await run.result(timeout=10)
    assert ledger.steps("compensation") == ["reserve"]
    assert "capture" not in ledger.steps()


async def test_a_sleep_until_a_time_already_past_wakes_at_once(
    open_client: ClientFactory, dsn: str
) -> None:
    """README, Declaring: `saga.sleep(until=fn)` (...) "a time already past wakes at
    once". With a poll interval of 30 s, a sleep until the year 2000 must not wait for
    the next poll: the run completes in well under 10 s. (A 10 ms sleep does, in the same
    setting: the worker that parks a run with a positive due time sets its own timer.)
    Instead the run stays `sleeping`, due, until the claim loop polls again."""
    ledger = Ledger()
    past = saga.Saga("past_sleep", input=Job)

    @past.step(retry=FAST)
    async def first(ctx: saga.Context[Job]) -> int:
        ledger.record(ctx)
        return 1

    past.sleep(until=lambda ctx: datetime(2000, 1, 1, tzinfo=UTC))

    @past.step(retry=FAST)
    async def second(ctx: saga.Context[Job]) -> int:
        ledger.record(ctx)
        return ctx.result(first) + 1

    short = saga.Saga("short_sleep", input=Job)

    @short.step(retry=FAST)
    async def one(ctx: saga.Context[Job]) -> int:
        return 1

    short.sleep(0.01)

    @short.step(retry=FAST)
    async def two(ctx: saga.Context[Job]) -> int:
        return 2

    client = await open_client(past, short)
    # Each run is started before an orchestrator opens, whose first claim takes it: no
    # notification is in flight that could wake its claim loop by chance.
    control = await client.start(short, Job())
    async with saga.Orchestrator(dsn, sagas=[past, short], poll_interval=30.0):
        assert await control.result(timeout=10) == 2  # a positive sleep: its own timer
    run = await client.start(past, Job())
    async with saga.Orchestrator(dsn, sagas=[past, short], poll_interval=30.0):
        assert await run.result(timeout=10) == 2  # RunTimeoutError: still sleeping


async def test_a_children_step_after_the_pivot_is_refused_naming_why(
    orchestrator: OrchestratorFactory,
) -> None:
    """README, Pivot steps: a step running child sagas after the pivot is refused at
    registration (a failing child would undo its siblings, and after the pivot a run
    only goes forward), with an error naming the children step, not a compensation the
    user never wrote."""
    ledger = Ledger()
    kid = small_saga("parcel", ["ship"], ledger=ledger)
    parent = small_saga("paid", ["pay"], ledger=ledger)
    parent.get_step("pay").pivot = True
    parent.children("ship_all", kid, lambda ctx: [Job(n=1), Job(n=2)], after=["pay"])
    with pytest.raises(saga.DefinitionError, match="'ship_all' runs child sagas after it"):
        await orchestrator(parent, kid)


async def test_a_graph_cancelled_while_a_branch_fails_retryably_ends_cancelled(
    orchestrator: OrchestratorFactory,
) -> None:
    """README, RunHandle `cancel()`: "the step running now finishes its attempt, then
    every completed step is compensated ... and the run ends `cancelled` (or `failed` if
    a compensation gives up). A cancel accepted before the run ended always wins over its
    completion"; Steps in parallel: "When a step fails for good (or the run is
    cancelled), no new step starts; branches already running finish their attempt". A
    linear run whose running attempt fails *retryably* after the cancel is not retried
    and ends `cancelled` (the cancel is why it stopped: saga/_plan.py). A graph run in
    the same moment (branch `a` fails with a transient error its policy would retry,
    after the cancel was accepted) ends `compensated` instead, with the transient
    ConnectionError as its error, as if `a` had failed for good."""
    ledger = Ledger()
    gate = Gate("a")
    s = small_saga(
        "branches",
        ["a", "b", "c"],
        after={"a": [], "b": [], "c": ["a", "b"]},
        compensate={"b"},
        ledger=ledger,
        gate=gate,
        fail={"a": transient(1)},
    )
    orch = await orchestrator(s)
    run = await orch.start(s, Job())
    with anyio.fail_after(10):
        await gate.entered.wait()
        while "b" not in (await run.info()).completed_steps:  # noqa: ASYNC110
            await anyio.sleep(0.02)
    await run.cancel()
    gate.release.set()  # a's attempt ends: a transient failure, retryable
    with pytest.raises(saga.RunCancelledError):
        await run.result(timeout=10)
    assert ledger.steps("compensation") == ["b"]
    assert ledger.steps().count("a") == 1  # not retried


async def test_a_graph_run_in_a_backoff_shows_when_it_is_next_due(
    orchestrator: OrchestratorFactory,
) -> None:
    """README, RunInfo: "`due_at` (when it is next due: a sleep's end, a wait's timeout,
    a backoff or a lease's end; None for a wait without timeout and for ended runs)".
    A graph run whose only branch left is in an hour's backoff after a transient failure
    is next due in about an hour (saga.testing.advance even returns that time); RunInfo
    says None, as for a run that will never be due."""
    hour = saga.Retry(max_attempts=3, initial_delay=3600, max_delay=3600, jitter=0)
    s = small_saga(
        "backoff",
        ["a", "b", "c"],
        after={"a": [], "b": [], "c": ["a", "b"]},
        fail={"a": transient(1)},
        retry={"a": hour},
    )
    orch = await orchestrator(s)
    run = await orch.start(s, Job())
    with anyio.fail_after(10):
        while True:
            info = await run.info()
            kinds = [e.kind for e in await run.history()]
            if "b" in info.completed_steps and "step_failed" in kinds:
                break
            await anyio.sleep(0.02)
    moved = await advance(orch, run, 0)  # moves nothing; returns the run's next due time
    assert moved is not None
    assert moved > datetime.now(UTC) + timedelta(minutes=50)
    info = await run.info()
    assert info.due_at is not None  # None
    assert info.due_at > datetime.now(UTC) + timedelta(minutes=50)

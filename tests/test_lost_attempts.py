"""Attempts whose worker died or whose lease was lost: the history names only attempts
that ran, a lease this same worker claimed again cancels the old attempt, and a wait's
timeout function that kills its worker cannot loop for ever (DESIGN "Leasing",
"Retries": a crash mid-step counts as an attempt, and nothing loops for ever)."""

from __future__ import annotations

import anyio
import asyncpg
import pytest

import saga
from saga.testing import Faults
from tests._crashing_wait_saga import Item
from tests._crashing_wait_saga import doomed as doomed_saga
from tests._harness import Children
from tests._sagas import Job, Ledger, fast, permanent, small_saga
from tests.conftest import ClientFactory, OrchestratorFactory

pytestmark = pytest.mark.timeout(60)


@pytest.mark.timeout(40)
async def test_history_never_shows_an_attempt_beyond_max_attempts_that_never_ran(
    orchestrator: OrchestratorFactory,
) -> None:
    """DESIGN: "Every transition is appended to a per-run history ...: what ran, when, on
    which worker, which attempt, with what error", and "A crash mid-step counts as an
    attempt". A step with max_attempts=1 whose worker dies mid-step ran exactly once:
    the history must not claim that an attempt 2 started (the user's function never ran
    again) nor put the crashed attempt's error on an attempt 2 that never existed."""
    effects = Ledger()
    s = small_saga("lost_step", ["a", "b"], compensate={"a"}, ledger=effects, retry=fast(1))
    faults = Faults()
    faults.crash_after("b")
    orch = await orchestrator(s, lease_seconds=0.5)
    faults.attach(orch)
    run = await s.start(Job(n=1))
    with pytest.raises(saga.RunCompensatedError) as raised:
        await run.result(timeout=20)
    assert raised.value.error is not None
    assert raised.value.error.type == "saga.AttemptLost"
    assert effects.attempts("b") == [1]  # the user's step ran once
    history = await run.history()
    started_b = [e.attempt for e in history if e.kind == "step_started" and e.step == "b"]
    failed_b = [e.attempt for e in history if e.kind == "step_failed" and e.step == "b"]
    assert started_b == [1], f"history says attempts {started_b} of b started; 1 ran"
    assert all(a is not None and a <= 1 for a in failed_b), (
        f"history records step b failing at attempt(s) {failed_b}, max_attempts is 1"
    )


@pytest.mark.timeout(40)
async def test_history_never_shows_a_compensation_attempt_beyond_max_attempts(
    orchestrator: OrchestratorFactory,
) -> None:
    """The same promise for a compensation ("Compensations are durable work like steps:
    ... retried with their own policy"; the history says "which attempt, with what
    error"): a compensation with max_attempts=1 whose worker dies mid-compensation ran
    once; the history must not show a compensation attempt 2 starting and failing."""
    effects = Ledger()
    s = small_saga(
        "lost_undo",
        ["a", "b"],
        compensate={"a"},
        ledger=effects,
        fail={"b": permanent("declined")},
        retry=fast(1),
        undo_retry=fast(1),
    )
    faults = Faults()
    faults.crash_after("a", compensation=True)
    orch = await orchestrator(s, lease_seconds=0.5)
    faults.attach(orch)
    run = await s.start(Job(n=1))
    with pytest.raises(saga.RunFailedError) as raised:
        await run.result(timeout=20)
    assert raised.value.compensation_error is not None
    assert effects.attempts("a", "compensation") == [1]  # the compensation ran once
    history = await run.history()
    undo = [(e.kind, e.attempt) for e in history if e.kind.startswith("compensation_")]
    assert all(attempt == 1 for _, attempt in undo), (
        f"history shows compensation attempts {undo}; max_attempts is 1 and one ran"
    )


@pytest.mark.timeout(40)
async def test_a_step_whose_lease_this_same_worker_reclaimed_is_cancelled(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """DESIGN "Leasing": a worker that lost its lease can never commit, and "a worker
    whose heartbeat is refused cancels the step". Here the lease of attempt 1 expires
    by the database clock (as when its heartbeats did not get through) and the same
    orchestrator, having free slots, claims the run again (attempt 2, a new fencing
    token). Attempt 1 lost its lease: it must be cancelled within a couple of heartbeats
    (lease 3 s: every 1 s), not run on beside attempt 2 to its end."""
    s = saga.Saga("same_worker", input=Job)
    started = anyio.Event()
    second = anyio.Event()
    seen: list[str] = []

    @s.step()
    async def slow(ctx: saga.Context[Job]) -> int:
        seen.append(f"start {ctx.attempt}")
        if ctx.attempt == 1:
            started.set()
            try:
                await anyio.sleep(15)
            except BaseException:
                seen.append("attempt 1 cancelled")
                raise
            seen.append("attempt 1 ran to its end")
        else:
            second.set()
        return ctx.attempt

    await orchestrator(s, lease_seconds=3, poll_interval=0.05)
    run = await s.start(Job(n=1))
    with anyio.fail_after(5):
        await started.wait()
    # The lease expires (database clock): as if no heartbeat got through for 3 s.
    # (and the workers are woken, so the claim comes before the next heartbeat)
    async with db.transaction():
        await db.execute(
            "UPDATE saga.runs SET due_at = now() - interval '1 second' WHERE id = $1", run.id
        )
        await db.execute("SELECT pg_notify('saga_work', $1)", s.name)
    with anyio.fail_after(5):
        await second.wait()
    assert await run.result(timeout=10) == 2
    with anyio.move_on_after(4):  # four heartbeat periods
        while "attempt 1 cancelled" not in seen:  # noqa: ASYNC110
            await anyio.sleep(0.05)
    assert "attempt 1 cancelled" in seen, (
        f"attempt 1 lost its lease to attempt 2 but was never cancelled: {seen}"
    )


@pytest.mark.timeout(60)
async def test_a_wait_timeout_function_that_kills_its_worker_cannot_loop_forever(
    dsn: str, open_client: ClientFactory, children: Children
) -> None:
    """DESIGN: "A crash mid-step counts as an attempt, so a step that kills its worker
    cannot loop forever" and "Nothing a step raises or returns, and no setting a user
    can pass, can stop an orchestrator or make a run retry forever". A wait's
    ``on_timeout`` function is user code run by a worker like a step; one that kills
    its worker process every time must end the run (rolled back, failed or stopped)
    after a bounded number of crashes, not kill every worker that claims it forever.
    Six worker processes in turn are given the run here."""
    client = await open_client(doomed_saga)
    run = await client.start(doomed_saga, Item(n=1))
    deaths = 0
    for i in range(6):
        info = await run.info()
        if info.status.is_terminal:
            break
        worker = children.saga_worker(
            dsn,
            "tests._crashing_wait_saga:SAGAS",
            "--lease-seconds",
            "0.5",
            "--poll-interval",
            "0.1",
            name=f"worker{i}",
        )
        # It dies (exit 3) once it computes the timeout's value; else the run ended.
        with anyio.move_on_after(8):
            while worker.alive and not (await run.info()).status.is_terminal:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        if not worker.alive:
            assert worker.returncode == 3, worker.output  # died in the timeout's function
            deaths += 1
        else:
            worker.kill()
            break
    info = await run.info()
    assert info.status.is_terminal, (
        f"after {deaths} worker deaths the run is still {info.status} at attempt "
        f"{info.attempt}: every worker that claims it dies, without end"
    )


@pytest.mark.timeout(40)
async def test_a_graph_step_lost_on_its_last_attempt_shows_no_attempt_that_never_ran(
    orchestrator: OrchestratorFactory,
) -> None:
    """The same promise for a step of a saga with parallel steps (each leased on its
    own): its worker dies on the step's only attempt; the history shows that attempt
    starting and failing (saga.AttemptLost), no attempt 2, and the completed branch is
    compensated."""
    s = saga.Saga("lost_branch", input=Job)
    undone: list[str] = []

    @s.step(after=[], retry=fast(1))
    async def left(ctx: saga.Context[Job]) -> int:
        return 1

    @left.compensate
    async def undo_left(ctx: saga.Context[Job], value: int) -> None:
        undone.append("left")

    @s.step(after=[], retry=fast(1))
    async def right(ctx: saga.Context[Job]) -> int:
        return 2

    @s.step(after=[left, right])
    async def join(ctx: saga.Context[Job]) -> int:
        return 3

    faults = Faults()
    faults.crash_after(right)
    orch = await orchestrator(s, lease_seconds=0.5)
    faults.attach(orch)
    run = await s.start(Job(n=1))
    with pytest.raises(saga.RunCompensatedError) as raised:
        await run.result(timeout=20)
    assert raised.value.error is not None
    assert raised.value.error.type == "saga.AttemptLost"
    assert undone == ["left"]
    history = await run.history()
    right_events = [(e.kind, e.attempt) for e in history if e.step == "right"]
    assert ("step_started", 1) in right_events
    assert ("step_failed", 1) in right_events
    assert all(attempt == 1 for _, attempt in right_events if attempt is not None), right_events


@pytest.mark.parametrize("phase", ["step", "compensation"])
async def test_the_timeline_shows_a_lost_last_attempt_once_with_its_failure(
    orchestrator: OrchestratorFactory, phase: str
) -> None:
    """README (Operator API): timeline() lists each step and compensation attempt once.
    A last attempt whose worker died (crash_after, one attempt) ends lease_expired and
    then fails with saga.AttemptLost, recorded at that attempt: the timeline shows that
    attempt once, failed with saga.AttemptLost."""
    s: saga.Saga[Job] = saga.Saga(f"crash_once_{phase}", input=Job)

    @s.step(retry=saga.Retry(max_attempts=1))
    async def only(ctx: saga.Context[Job]) -> str:
        return "x"

    @only.compensate(retry=saga.Retry(max_attempts=1))
    async def undo(ctx: saga.Context[Job], result: str) -> None:
        return None

    @s.step(retry=saga.Retry(max_attempts=1))
    async def last(ctx: saga.Context[Job]) -> str:
        raise saga.PermanentError("declined")

    faults = Faults()
    faults.crash_after(only, compensation=phase == "compensation")
    orch = await orchestrator(s, lease_seconds=0.3)
    faults.attach(orch)
    run = await orch.start(s, Job())
    with pytest.raises(saga.RunError):
        await run.result(timeout=15)
    lost = [
        a
        for a in saga.timeline(await run.history())
        if a.step == "only" and a.compensation == (phase == "compensation")
    ]
    assert [(a.attempt, a.outcome) for a in lost] == [(1, "failed")]
    assert lost[0].error is not None
    assert lost[0].error.type == "saga.AttemptLost"
    assert lost[0].started_at is not None

"""The core engine at its edges: cancels meeting retries and backoffs, equal inputs,
compensations reading stored results, exception groups, and user code doing odd things
(late self-cancels, swallowed cancellations, values whose methods raise)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Iterator, Mapping
from typing import Any

import anyio
import asyncpg
import pytest
from pydantic import BaseModel
from structlog.testing import capture_logs

import saga
from tests._sagas import Fail, Gate, Job, Ledger, fast, permanent, small_saga
from tests.conftest import OrchestratorFactory

pytestmark = pytest.mark.timeout(60)


# -- cancel while a compensation backs off ------------------------------------------------


async def test_cancel_while_a_compensation_backs_off_keeps_its_backoff(
    orchestrator: OrchestratorFactory,
) -> None:
    """README, RunHandle.cancel(): "Cancelling a run that is already `compensating` after a
    failure is recorded (`cancel_requested`) and changes nothing else: the rollback goes
    on"; and "Retries": "The wait between attempts is stored in the database (a restart
    neither loses nor shortens it)". A compensation waiting out a 1-hour backoff must
    still wait after a cancel: its due time must not move, and no second attempt runs."""
    ledger = Ledger()
    s = small_saga(
        "undo_backoff",
        ["reserve", "charge"],
        compensate={"reserve"},
        ledger=ledger,
        fail={"charge": permanent("declined")},
        fail_undo={"reserve": Fail(ConnectionError, "try later", attempts=1)},
        retry=None,
        # 1 h between compensation attempts, no jitter: the second attempt is an hour away.
        undo_retry=saga.Retry(max_attempts=3, initial_delay=3600, max_delay=3600, jitter=0),
    )
    orch = await orchestrator(s, poll_interval=0.05)
    run = await orch.start(s, Job(n=1))
    with anyio.fail_after(10):
        while not [e for e in await run.history() if e.kind == "compensation_failed"]:  # noqa: ASYNC110
            await anyio.sleep(0.02)
    before = await run.info()
    assert before.status == "compensating"
    assert before.due_at is not None
    await run.cancel()
    await anyio.sleep(1.0)  # ample time for a worker to claim a run made due now
    after = await run.info()
    assert [c.attempt for c in ledger.of("compensation")] == [1]  # no early retry
    assert after.status == "compensating"
    assert after.due_at == before.due_at  # the stored backoff is not shortened


# -- idempotent starts -------------------------------------------------------------------


class Tagged(BaseModel):
    order_id: str
    tags: set[int]


async def test_an_equal_set_input_is_not_an_idempotency_conflict(
    orchestrator: OrchestratorFactory,
) -> None:
    """README, "Durable start": a start with an existing key "returns the existing run
    (`handle.created` is False) if it was started with an equal input; a different input
    raises `IdempotencyConflictError`". A set has no order: {1, 9} and {9, 1} are equal,
    and so are the two inputs; the second start must return the first run."""
    s = small_saga("tagged", ["one"], input=Tagged)
    client = await orchestrator(s, concurrency=0)
    first_input = Tagged(order_id="o-1", tags={1, 9})
    second_input = Tagged(order_id="o-1", tags={9, 1})
    assert first_input == second_input
    assert list(first_input.tags) != list(second_input.tags)  # equal sets, another order
    first = await client.start(s, first_input, key="o-1")
    second = await client.start(s, second_input, key="o-1")
    assert second.created is False
    assert second.id == first.id


# -- what a compensation receives --------------------------------------------------------


async def test_a_compensation_receives_the_stored_result_not_a_later_steps_mutation(
    orchestrator: OrchestratorFactory,
) -> None:
    """README, "Compensation": the compensations run "each receiving its step's typed
    result"; DESIGN: "each receives the result of the step it undoes", and "Every step
    result is checkpointed in Postgres before the next step starts". A later step that
    mutates the object ctx.result() gave it must not change what the compensation gets:
    the checkpointed result is ["a"]."""
    received: list[Any] = []
    s = saga.Saga("mutating", input=Job)

    @s.step(retry=fast(1))
    async def reserve(ctx: saga.Context[Job]) -> list[str]:
        return ["a"]

    @reserve.compensate
    async def release(ctx: saga.Context[Job], items: list[str]) -> None:
        received.append(list(items))

    @s.step(retry=fast(1))
    async def charge(ctx: saga.Context[Job]) -> str:
        ctx.result(reserve).append("added by charge")  # odd, but user code may do it
        raise saga.PermanentError("declined")

    orch = await orchestrator(s)
    run = await orch.start(s, Job(n=1))
    with anyio.fail_after(10), pytest.raises(saga.RunCompensatedError):
        await run.result()
    assert received == [["a"]]


# -- retries -------------------------------------------------------------------------------


async def test_a_permanent_error_raised_in_a_steps_task_group_is_not_retried(
    orchestrator: OrchestratorFactory,
) -> None:
    """README, "Retries": "`saga.PermanentError` and the `non_retryable` types fail at
    once". A step that spawns tasks (asyncio.TaskGroup) and whose task raises
    PermanentError lets it escape wrapped in an ExceptionGroup: the step still raised a
    PermanentError and nothing else, so the attempt must be its only one."""
    ledger = Ledger()
    s = saga.Saga("spawning", input=Job)

    @s.step(retry=saga.Retry(max_attempts=3, initial_delay=0.01, max_delay=0.01))
    async def fan_out(ctx: saga.Context[Job]) -> str:
        ledger.record(ctx)

        async def part() -> None:
            raise saga.PermanentError("card declined")

        async with asyncio.TaskGroup() as tg:
            tg.create_task(part())
        return "done"

    orch = await orchestrator(s)
    run = await orch.start(s, Job(n=1))
    with anyio.fail_after(10), pytest.raises(saga.RunCompensatedError):
        await run.result()
    assert ledger.attempts("fan_out") == [1]


# -- user code doing odd things ----------------------------------------------------------


async def test_a_step_whose_task_cancel_lands_after_it_returned_does_not_stop_the_orchestrator(
    orchestrator: OrchestratorFactory,
) -> None:
    """README, "Nothing a step raises or returns stops an orchestrator": "the step
    cancelling its own task (`asyncio.current_task().cancel()`)" is that attempt's
    failure. A step that schedules the cancel of its own task (a home-made watchdog,
    ``loop.call_soon(task.cancel)`` / ``call_later``) and returns before it fires cancels
    the task saga runs it in while saga records the checkpoint: the orchestrator keeps
    running (the cancel is taken back and logged as `internal_error`), and the run ends
    once its lease ran out (completed, or failed by its policy), other sagas meanwhile
    unaffected."""
    s = saga.Saga("late_cancel", input=Job)

    @s.step(retry=fast(3))
    async def arm(ctx: saga.Context[Job]) -> str:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().call_soon(task.cancel)  # fires once the step returned
        return "armed"

    @s.step(retry=fast(3))
    async def after(ctx: saga.Context[Job]) -> str:
        return "after"

    plain = small_saga("plain", ["double"], result=lambda ctx: ctx.input.n * 2, retry=None)
    orch = await orchestrator(s, plain, lease_seconds=1)
    run = await orch.start(s, Job(n=1))
    with anyio.fail_after(15):
        with contextlib.suppress(saga.RunError):  # a recorded failure is fine
            await run.result()
    assert orch.is_open
    with anyio.fail_after(5):
        assert await (await orch.start(plain, Job(n=21))).result() == 42


async def test_aclose_returns_when_a_step_swallows_its_cancellation(
    dsn: str, db: asyncpg.Connection
) -> None:
    """README, Orchestrator: "Leaving stops claiming, lets running steps finish for up to
    `shutdown_timeout`, then cancels the rest and releases their leases so another
    process takes them at once". A step that catches CancelledError and keeps going must
    not make aclose() wait forever (aclose is shielded: the caller cannot time it out
    either): it returns 15 s past shutdown_timeout, its lease given back."""
    s = saga.Saga("stubborn", input=Job)
    entered = anyio.Event()
    stop = anyio.Event()

    @s.step(retry=fast(3))
    async def stubborn(ctx: saga.Context[Job]) -> str:
        entered.set()
        while not stop.is_set():
            with contextlib.suppress(asyncio.CancelledError):  # swallowed: will not be cancelled
                await asyncio.sleep(0.05)
        return "done"

    orch = saga.Orchestrator(dsn, sagas=[s], shutdown_timeout=0.5, poll_interval=0.1)
    await orch.__aenter__()
    closed = anyio.Event()

    async def close() -> None:
        await orch.aclose()
        closed.set()

    try:
        await orch.start(s, Job(n=1))
        with anyio.fail_after(10):
            await entered.wait()
        async with anyio.create_task_group() as tg:
            tg.start_soon(close)
            with anyio.move_on_after(20):
                await closed.wait()
            finished = closed.is_set()
            owner = await db.fetchval("SELECT lease_owner FROM saga.runs")
            stop.set()  # let the step end, so the close (and this test) can finish
        assert finished, "aclose() was still waiting for the step 19.5 s past shutdown_timeout"
        assert owner is None  # its lease was given back: another worker takes the run
    finally:
        stop.set()
        await orch.aclose()


class _Boom(BaseException):
    """A BaseException that is neither Exception nor a cancellation."""


class _MappingRaisingBase(Mapping[str, int]):
    """A mapping whose iteration raises a BaseException (not an Exception)."""

    def __getitem__(self, key: str) -> int:
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        raise _Boom("iteration is broken")

    def __len__(self) -> int:
        return 1


async def test_a_returned_value_whose_methods_raise_a_base_exception_fails_at_once(
    orchestrator: OrchestratorFactory,
) -> None:
    """A returned value whose own methods raise a BaseException subclass (not only an
    Exception) fails the attempt for good with a SerializationError, recorded at once,
    as README's "Nothing a step raises or returns stops an orchestrator" promises."""
    s = saga.Saga("odd_mapping", input=Job)

    @s.step(retry=fast(2))
    async def reserve(ctx: saga.Context[Job]) -> str:
        return "held"

    @reserve.compensate
    async def release(ctx: saga.Context[Job], held: str) -> None:
        return None

    @s.step(retry=fast(2))
    async def odd(ctx: saga.Context[Job]) -> Any:
        return _MappingRaisingBase()

    orch = await orchestrator(s, lease_seconds=30)
    run = await orch.start(s, Job(n=1))
    with anyio.fail_after(5), pytest.raises(saga.RunCompensatedError) as raised:
        await run.result()
    assert raised.value.error is not None
    assert raised.value.error.type == "saga.SerializationError"
    assert [e.attempt for e in await run.history() if e.kind == "step_failed"] == [1]


# -- cancel while a step's attempt fails -------------------------------------------------


@pytest.mark.parametrize("lease_seconds", [0.6, 30.0], ids=["heartbeat sees it", "write sees it"])
async def test_a_cancel_accepted_while_a_failing_attempt_runs_does_not_wait_for_its_backoff(
    orchestrator: OrchestratorFactory, lease_seconds: float
) -> None:
    """README, RunHandle.cancel(): "the step running now finishes its attempt, then every
    completed step is compensated ... and the run ends `cancelled`". When that attempt
    fails with a retryable error, no retry will ever run (the run is cancelled), so the
    rollback must start at once, not after the step's 1-hour backoff."""
    ledger, gate = Ledger(), Gate("charge")
    s = small_saga(
        "cancel_in_retry",
        ["reserve", "charge"],
        compensate={"reserve"},
        ledger=ledger,
        gate=gate,
        fail={"charge": Fail(ConnectionError, "bank unreachable")},
        retry={
            "reserve": None,
            "charge": saga.Retry(max_attempts=5, initial_delay=3600, max_delay=3600, jitter=0),
        },
        undo_retry=None,
    )
    orch = await orchestrator(s, lease_seconds=lease_seconds)
    run = await orch.start(s, Job(n=1))
    with anyio.fail_after(10):
        await gate.entered.wait()
        await run.cancel()
        if lease_seconds < 1:
            await anyio.sleep(lease_seconds)  # at least one heartbeat reads the cancel
        gate.release.set()
    with anyio.fail_after(5), pytest.raises(saga.RunCancelledError):
        await run.result()
    assert ledger.attempts("charge") == [1]
    assert [c.value for c in ledger.of("compensation")] == ["reserve"]


# -- definitions ---------------------------------------------------------------------------


def test_a_partial_of_an_async_function_without_a_name_is_a_definition_error() -> None:
    """README, Definitions: "Broken definitions fail at once with `DefinitionError`": a
    functools.partial of an async function (no __name__) declared as a step without
    name= is one, naming what to pass; with name= it is accepted."""
    s = saga.Saga("partial_step", input=Job)

    async def charge(ctx: saga.Context[Job], currency: str) -> str:
        return currency

    with pytest.raises(saga.DefinitionError):
        s.step()(functools.partial(charge, currency="EUR"))


@pytest.mark.timeout(60)
async def test_close_not_abandoned_when_no_step_swallows_its_cancellation(
    dsn: str, db: asyncpg.Connection
) -> None:
    """A close is abandoned only for a step that swallows its cancellation: when no step
    does, but giving the lease back is slow (another transaction holds the run's row for
    6.5 s, as an operator's or a long report's may), aclose() waits for it, logs no
    `orchestrator_close_abandoned`, and releases once."""
    s = saga.Saga("held_row", input=Job)
    running = anyio.Event()

    @s.step()
    async def forever(ctx: saga.Context[Job]) -> int:
        running.set()
        await anyio.sleep(3600)  # cancellable: nothing swallowed
        return 1

    orch = saga.Orchestrator(dsn, sagas=[s], poll_interval=0.2, shutdown_timeout=0)
    await orch.__aenter__()
    try:
        run = await orch.start(s, Job())
        with anyio.fail_after(10):
            await running.wait()
        tx = db.transaction()
        await tx.start()
        await db.execute("SELECT 1 FROM saga.runs WHERE id = $1 FOR UPDATE", run.id)

        async def let_go() -> None:
            await anyio.sleep(6.5)  # a long transaction ends
            await tx.rollback()

        with capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                tg.start_soon(let_go)
                started = time.monotonic()
                await orch.aclose()
                took = time.monotonic() - started
    finally:
        await orch.aclose()
    abandoned = [e for e in logs if e["event"] == "orchestrator_close_abandoned"]
    assert abandoned == [], f"close abandoned after {took:.1f}s though no step swallowed"
    assert took < 7.5

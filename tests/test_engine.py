"""Behaviour of runs on a real PostgreSQL: steps, retries, compensation, operators."""

from __future__ import annotations

from typing import Any

import anyio
import asyncpg
import pytest
from pydantic import BaseModel

import saga
from tests._sagas import FAST, Fail, Gate, Ledger, fast, permanent, small_saga, transient
from tests.conftest import OrchestratorFactory


class Order(BaseModel):
    order_id: str
    amount_cents: int


class Receipt(BaseModel):
    charge_id: str
    amount_cents: int


def three_step_saga(
    ledger: Ledger,
    *,
    fail_at: str | None = None,
    name: str = "checkout",
    comp_retry: saga.Retry = FAST,
) -> saga.Saga[Order]:
    """The checkout written out: typed results (a Receipt model) flow from step to step
    and to the compensations, which is what the tests using it check. Each call is in
    ``ledger``, with the earlier result it read (a compensation: the one it undoes)."""
    checkout = saga.Saga(name, input=Order)

    @checkout.step(retry=FAST)
    async def reserve(ctx: saga.Context[Order]) -> str:
        ledger.record(ctx)
        if fail_at == "reserve":
            raise saga.PermanentError("out of stock")
        return f"res-{ctx.input.order_id}"

    @reserve.compensate(retry=comp_retry)
    async def release(ctx: saga.Context[Order], reservation: str) -> None:
        ledger.record(ctx, reservation)

    @checkout.step(retry=FAST)
    async def notify(ctx: saga.Context[Order]) -> None:
        ledger.record(ctx)  # no compensation: nothing to undo

    @checkout.step(retry=FAST)
    async def charge(ctx: saga.Context[Order]) -> Receipt:
        ledger.record(ctx, ctx.result(reserve))
        if fail_at == "charge":
            raise saga.PermanentError("card declined")
        return Receipt(charge_id=f"ch-{ctx.input.order_id}", amount_cents=ctx.input.amount_cents)

    @charge.compensate(retry=comp_retry)
    async def refund(ctx: saga.Context[Order], receipt: Receipt) -> None:
        ledger.record(ctx, receipt)

    @checkout.step(retry=FAST)
    async def ship(ctx: saga.Context[Order]) -> str:
        ledger.record(ctx, ctx.result(charge).charge_id)
        if fail_at == "ship":
            raise ValueError("no courier")
        return "shipped"

    return checkout


async def kinds(run: saga.RunHandle) -> list[tuple[str, str | None]]:
    return [(e.kind, e.step) for e in await run.history()]


async def test_happy_path_returns_typed_output_and_records_history(
    orchestrator: OrchestratorFactory,
) -> None:
    """A run executes every step once in order, later steps read earlier typed results,
    result() returns the last step's output, and the history records each transition."""
    ledger = Ledger()
    checkout = three_step_saga(ledger)
    await orchestrator(checkout)
    run = await checkout.start(Order(order_id="o-1", amount_cents=500))
    assert await run.result(timeout=10) == "shipped"
    assert ledger.trace() == ["reserve", "notify", "charge", "ship"]
    assert (ledger.calls[2].step, ledger.calls[2].value) == ("charge", "res-o-1")
    assert (ledger.calls[3].step, ledger.calls[3].value) == ("ship", "ch-o-1")
    assert await run.status() is saga.RunStatus.COMPLETED
    assert await kinds(run) == [
        ("run_started", None),
        ("step_started", "reserve"),
        ("step_completed", "reserve"),
        ("step_started", "notify"),
        ("step_completed", "notify"),
        ("step_started", "charge"),
        ("step_completed", "charge"),
        ("step_started", "ship"),
        ("step_completed", "ship"),
        ("run_completed", None),
    ]
    info = await run.info()
    assert info.completed_steps == ("reserve", "notify", "charge", "ship")
    assert info.finished_at is not None


async def test_transient_failures_are_retried_with_a_stable_idempotency_key(
    orchestrator: OrchestratorFactory,
) -> None:
    """A step failing twice then succeeding completes the run; each attempt is in the
    history with its error, and every attempt sees the same idempotency key."""
    ledger = Ledger()
    flaky = small_saga(
        "flaky",
        ["call"],
        input=Order,
        ledger=ledger,
        fail={"call": transient(2, message=lambda ctx: f"attempt {ctx.attempt} failed")},
        retry=FAST,
        result=lambda ctx: ctx.attempt,
    )
    await orchestrator(flaky)
    run = await flaky.start(Order(order_id="o-2", amount_cents=1))
    assert await run.result(timeout=10) == 3
    keys = [c.key for c in ledger.calls]
    assert len(keys) == 3
    assert len(set(keys)) == 1
    assert keys[0] == f"{run.id}:step:call"
    failures = [e for e in await run.history() if e.kind == "step_failed"]
    assert [e.attempt for e in failures] == [1, 2]
    assert failures[0].error == saga.ErrorInfo("ConnectionError", "attempt 1 failed", "call")
    assert all(e.data["retry_in"] >= 0 for e in failures)


async def test_permanent_failure_compensates_completed_steps_in_reverse(
    orchestrator: OrchestratorFactory,
) -> None:
    """When a step fails for good, compensations of the completed steps run newest first,
    each with its own step's typed result and a key distinct from the step's; the failed
    step and steps without a compensation are not compensated."""
    ledger = Ledger()
    checkout = three_step_saga(ledger, fail_at="ship")
    await orchestrator(checkout)
    run = await checkout.start(Order(order_id="o-3", amount_cents=700))
    with pytest.raises(saga.RunCompensatedError) as raised:
        await run.result(timeout=10)
    assert raised.value.error == saga.ErrorInfo("ValueError", "no courier", "ship")
    assert raised.value.compensation_error is None
    assert ledger.trace() == [
        "reserve",
        "notify",
        "charge",
        "ship",
        "ship",
        "ship",
        "undo charge",
        "undo reserve",
    ]
    assert ledger.calls[6].value == Receipt(charge_id="ch-o-3", amount_cents=700)
    assert ledger.calls[7].value == "res-o-3"
    assert ledger.calls[7].key == f"{run.id}:compensation:reserve"
    assert ledger.calls[0].key == f"{run.id}:step:reserve"
    history = await run.history()
    compensating = next(e for e in history if e.kind == "run_compensating")
    assert compensating.data["plan"] == ["charge", "reserve"]
    assert [e.kind for e in history][-1] == "run_compensated"
    assert await run.status() is saga.RunStatus.COMPENSATED


async def test_failure_of_first_step_ends_compensated_with_nothing_to_undo(
    orchestrator: OrchestratorFactory,
) -> None:
    """A PermanentError in the first step fails at once (one attempt) and the run ends
    compensated without calling any compensation."""
    ledger = Ledger()
    checkout = three_step_saga(ledger, fail_at="reserve")
    await orchestrator(checkout)
    run = await checkout.start(Order(order_id="o-4", amount_cents=1))
    with pytest.raises(saga.RunCompensatedError):
        await run.result(timeout=10)
    assert ledger.trace() == ["reserve"]


async def test_compensation_failing_then_succeeding(orchestrator: OrchestratorFactory) -> None:
    """A compensation that fails transiently is retried until it succeeds; the run ends
    compensated and the failed compensation attempts are in the history."""
    ledger = Ledger()
    wobbly = small_saga(
        "wobbly",
        ["book", "fail"],
        input=Order,
        compensate={"book"},
        ledger=ledger,
        fail={"fail": permanent("no")},
        fail_undo={"book": transient(2, TimeoutError, "provider slow")},
        retry=None,
        undo_retry=fast(5),
    )
    await orchestrator(wobbly)
    run = await wobbly.start(Order(order_id="o-5", amount_cents=1))
    with pytest.raises(saga.RunCompensatedError):
        await run.result(timeout=10)
    assert ledger.attempts("book", "compensation") == [1, 2, 3]
    failed = [e.attempt for e in await run.history() if e.kind == "compensation_failed"]
    assert failed == [1, 2]


async def test_exhausted_compensation_fails_the_run_and_retry_resumes_it(
    orchestrator: OrchestratorFactory,
) -> None:
    """A compensation that exhausts its retries leaves the run failed with the error kept;
    retry() resumes at that compensation with fresh attempts and the run then ends
    compensated, without re-running compensations that had succeeded."""
    ledger = Ledger()
    broken = {"refund": True}
    checkout = small_saga(
        "fragile",
        ["reserve", "charge", "ship"],
        input=Order,
        compensate={"reserve", "charge"},
        ledger=ledger,
        fail={"ship": permanent("cannot ship")},
        fail_undo={
            "charge": Fail(RuntimeError, "refund API down", when=lambda _: broken["refund"])
        },
        retry=None,
        undo_retry={"charge": fast(2)},
    )

    def undone() -> list[tuple[str, int, Any]]:
        return [(c.step, c.attempt, c.value) for c in ledger.of("compensation")]

    orch = await orchestrator(checkout)
    run = await checkout.start(Order(order_id="o-6", amount_cents=1))
    with pytest.raises(saga.RunFailedError) as raised:
        await run.result(timeout=10)
    assert raised.value.compensation_error == saga.ErrorInfo(
        "RuntimeError", "refund API down", "charge"
    )
    assert raised.value.error == saga.ErrorInfo("saga.PermanentError", "cannot ship", "ship")
    assert undone() == [("charge", 1, "charge"), ("charge", 2, "charge")]
    info = await run.info()
    assert info.status is saga.RunStatus.FAILED
    assert info.step == "charge"

    with pytest.raises(saga.InvalidRunStateError):
        await run.cancel()

    broken["refund"] = False
    await orch.get_run(run.id).retry()
    with pytest.raises(saga.RunCompensatedError):
        await run.result(timeout=10)
    assert undone() == [
        ("charge", 1, "charge"),
        ("charge", 2, "charge"),
        ("charge", 1, "charge"),
        ("reserve", 1, "reserve"),
    ]
    assert "run_retried" in [e.kind for e in await run.history()]
    with pytest.raises(saga.InvalidRunStateError):
        await run.retry()


async def test_idempotent_start_returns_the_existing_run(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """Starting twice with the same key returns the same run and writes nothing new;
    another key, or the same key on another saga, starts a new run."""
    ledger = Ledger()
    checkout = three_step_saga(ledger)
    other = three_step_saga(ledger, name="other")
    await orchestrator(checkout, other, concurrency=0)
    first = await checkout.start(Order(order_id="o-7", amount_cents=1), key="order-7")
    again = await checkout.start(Order(order_id="o-7", amount_cents=1), key="order-7")
    assert again.id == first.id
    assert first.created
    assert not again.created
    assert (await checkout.start(Order(order_id="o-7", amount_cents=1), key="x")).id != first.id
    assert (await other.start(Order(order_id="o-7", amount_cents=1), key="order-7")).id != first.id
    assert await db.fetchval("SELECT count(*) FROM saga.runs") == 3
    assert await db.fetchval("SELECT count(*) FROM saga.events") == 3


async def test_concurrent_starts_with_one_key_create_one_run(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """Twenty concurrent starts with the same key all return the one run created."""
    checkout = three_step_saga(Ledger())
    await orchestrator(checkout, concurrency=0)
    ids: list[Any] = []

    async def start() -> None:
        run = await checkout.start(Order(order_id="o", amount_cents=1), key="same")
        ids.append(run.id)

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(start)
    assert len(set(ids)) == 1
    assert await db.fetchval("SELECT count(*) FROM saga.runs") == 1


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ({"order_id": "o", "amount_cents": "lots"}, saga.InvalidInputError),
        ({"order_id": "o"}, saga.InvalidInputError),
        ("not an order", saga.InvalidInputError),
        ({"order_id": "a\x00b", "amount_cents": 1}, saga.SerializationError),
        ({"order_id": "x" * 2_000_000, "amount_cents": 1}, saga.PayloadTooLargeError),
    ],
)
async def test_invalid_input_raises_before_anything_is_written(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection, payload: Any, error: type
) -> None:
    """start() with input that fails validation, cannot be stored as JSON, or is above
    the payload cap raises a clear error and writes no row."""
    checkout = three_step_saga(Ledger())
    await orchestrator(checkout, concurrency=0)
    with pytest.raises(error):
        await checkout.start(payload)
    assert await db.fetchval("SELECT count(*) FROM saga.runs") == 0


async def test_nan_in_input_model_is_refused(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """A float NaN in the input would be silently stored as null by pydantic; it is
    refused with an error naming the field."""

    class Measure(BaseModel):
        value: float

    gauge = saga.Saga("gauge", input=Measure)

    @gauge.step()
    async def read(ctx: saga.Context[Measure]) -> float:
        return ctx.input.value

    await orchestrator(gauge, concurrency=0)
    with pytest.raises(saga.SerializationError, match=r"input\.value"):
        await gauge.start(Measure(value=float("nan")))
    assert await db.fetchval("SELECT count(*) FROM saga.runs") == 0


@pytest.mark.parametrize(
    "bad",
    [float("nan"), float("inf"), b"raw", {1, 2}, object(), "a\x00b", "\ud800", {"k": [1.5, b""]}],
    ids=["nan", "inf", "bytes", "set", "object", "nul", "surrogate", "nested-bytes"],
)
async def test_unserializable_step_result_fails_the_run_clearly(
    orchestrator: OrchestratorFactory, bad: Any
) -> None:
    """A step returning a value that cannot be stored as JSON fails permanently with a
    SerializationError in the history, and the completed steps are compensated."""
    ledger = Ledger()
    weird = small_saga(
        "weird",
        ["first", "produce"],
        input=Order,
        compensate={"first"},
        ledger=ledger,
        result={"produce": lambda _: bad},
        retry=None,
        undo_retry=None,
    )
    await orchestrator(weird)
    run = await weird.start(Order(order_id="o", amount_cents=1))
    with pytest.raises(saga.RunCompensatedError) as raised:
        await run.result(timeout=10)
    assert raised.value.error is not None
    assert raised.value.error.type == "saga.SerializationError"
    assert raised.value.error.step == "produce"
    assert [(c.step, c.value) for c in ledger.of("compensation")] == [("first", "first")]


async def test_step_timeout_counts_as_a_failed_attempt(orchestrator: OrchestratorFactory) -> None:
    """An attempt running past its timeout is cancelled and retried; when every attempt
    times out the run is compensated with a TimeoutError."""
    slow = small_saga("slow", ["hang"], input=Order, delay=10, timeout=0.05, retry=fast(2))
    await orchestrator(slow)
    run = await slow.start(Order(order_id="o", amount_cents=1))
    with pytest.raises(saga.RunCompensatedError) as raised:
        await run.result(timeout=10)
    assert raised.value.error is not None
    assert raised.value.error.type == "TimeoutError"
    assert [e.attempt for e in await run.history() if e.kind == "step_failed"] == [1, 2]


async def test_non_retryable_error_types_fail_at_once(orchestrator: OrchestratorFactory) -> None:
    """An error listed in Retry.non_retryable is not retried."""
    ledger = Ledger()
    strict = small_saga(
        "strict",
        ["lookup"],
        input=Order,
        ledger=ledger,
        fail={"lookup": Fail(KeyError, "missing")},
        retry=saga.Retry(max_attempts=5, non_retryable=(KeyError,)),
    )
    await orchestrator(strict)
    run = await strict.start(Order(order_id="o", amount_cents=1))
    with pytest.raises(saga.RunCompensatedError):
        await run.result(timeout=10)
    assert ledger.attempts("lookup") == [1]


async def test_cancel_compensates_what_completed(orchestrator: OrchestratorFactory) -> None:
    """Cancelling a running run lets the current step finish, then compensates every
    completed step (the current one included), ends cancelled and raises
    RunCancelledError; later steps never run."""
    ledger = Ledger()
    gate = Gate("hotel")
    trip = small_saga(
        "trip",
        ["flight", "hotel", "car"],
        input=Order,
        compensate=True,
        ledger=ledger,
        gate=gate,
        retry=None,
        undo_retry=None,
    )
    await orchestrator(trip)
    run = await trip.start(Order(order_id="o", amount_cents=1))
    with anyio.fail_after(5):
        await gate.entered.wait()
    await run.cancel()
    await run.cancel()  # asking twice is harmless
    gate.release.set()
    with pytest.raises(saga.RunCancelledError) as raised:
        await run.result(timeout=10)
    assert raised.value.error is None
    assert ledger.steps() == ["flight", "hotel"]
    assert [c.value for c in ledger.of("compensation")] == ["hotel", "flight"]
    events = [(e.kind, e.step) for e in await run.history()]
    history = [kind for kind, _ in events]
    assert "cancel_requested" in history
    assert history[-1] == "run_cancelled"
    assert ("step_started", "car") not in events  # it never ran, so it never started
    assert events[events.index(("step_completed", "hotel")) + 1][0] == "run_compensating"
    with pytest.raises(saga.InvalidRunStateError):
        await run.cancel()


async def test_cancel_before_any_step_runs(orchestrator: OrchestratorFactory) -> None:
    """A run cancelled before any worker picked it up ends cancelled with no step run."""
    ledger = Ledger()
    checkout = three_step_saga(ledger)
    client = await orchestrator(checkout, concurrency=0)
    run = await client.start(checkout, Order(order_id="o", amount_cents=1))
    await run.cancel()
    await orchestrator(three_step_saga(ledger))  # a worker
    with pytest.raises(saga.RunCancelledError):
        await run.result(timeout=10)
    assert ledger.calls == []


async def test_cancelled_rollback_records_every_compensation_attempt(
    orchestrator: OrchestratorFactory,
) -> None:
    """In a cancelled run's rollback, every compensation attempt, retries included, has
    its compensation_started event before its outcome."""
    gate = Gate("b")
    s = small_saga(
        "cancel_retry",
        ["a", "b", "c"],  # c: cancelled before it runs
        input=Order,
        compensate={"a"},
        gate=gate,
        fail_undo={"a": transient(2, ConnectionError, "try again")},
        retry=None,
        undo_retry=fast(5),
    )
    await orchestrator(s)
    run = await s.start(Order(order_id="o", amount_cents=1))
    with anyio.fail_after(5):
        await gate.entered.wait()
    await run.cancel()
    gate.release.set()
    with pytest.raises(saga.RunCancelledError):
        await run.result(timeout=10)
    history = [(e.kind, e.attempt) for e in await run.history() if e.step == "a"]
    comp = [(k, n) for k, n in history if k.startswith("compensation")]
    assert comp == [
        ("compensation_started", 1),
        ("compensation_failed", 1),
        ("compensation_started", 2),
        ("compensation_failed", 2),
        ("compensation_started", 3),
        ("compensation_completed", 3),
    ]

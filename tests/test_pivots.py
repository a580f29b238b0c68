"""Pivot steps: the point of no return. Before it, a failure compensates as always; once
it completed, nothing before it is undone: later steps go forward, and one that gives up
stops the run for an operator, who retries it."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import saga
from tests._sagas import Fail, Gate, Job, Ledger, permanent, small_saga, until_status
from tests.conftest import OrchestratorFactory

Ctx = saga.Context[Any]


def pivoted(
    steps: list[str],
    pivot: str,
    *,
    after: dict[str, list[str]] | None = None,
    compensate: set[str] | None = None,
    **options: Any,
) -> saga.Saga[Job]:
    """A built saga whose step ``pivot`` is the pivot."""
    s = small_saga("pivoted", steps, after=after, compensate=compensate or set(), **options)
    s.get_step(pivot).pivot = True
    return s


async def register(orchestrator: OrchestratorFactory, s: saga.Saga[Any]) -> None:
    await orchestrator(s)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: pivoted(["a", "p"], "p", compensate={"p"}), "has a compensation"),
        (lambda: pivoted(["p", "b"], "p", compensate={"b"}), "could never run"),
        (
            lambda: pivoted(["a", "p", "x"], "p", after={"p": ["a"], "x": ["a"]}),
            "runs neither before nor after it",
        ),
    ],
    ids=["pivot undone", "undo after pivot", "beside the pivot"],
)
async def test_contradictions_are_refused_at_registration(
    orchestrator: OrchestratorFactory, build: Any, message: str
) -> None:
    """A pivot with a compensation, a compensation after the pivot (it could never run),
    and (a graph) a step neither before nor after the pivot are refused when the saga is
    registered, naming the step."""
    with pytest.raises(saga.DefinitionError, match=message):
        await register(orchestrator, build())


async def test_two_pivots_and_a_compensating_timeout_after_one_are_refused(
    orchestrator: OrchestratorFactory,
) -> None:
    """A second pivot, and a wait after the pivot that would compensate on timeout, are
    refused at registration."""
    two = small_saga("two", ["a", "b"])
    two.get_step("a").pivot = two.get_step("b").pivot = True
    with pytest.raises(saga.DefinitionError, match="more than one pivot"):
        await register(orchestrator, two)
    waits: saga.Saga[Job] = saga.Saga("waits", input=Job)

    @waits.step(pivot=True)
    async def pay(ctx: Ctx) -> str:
        return "paid"

    waits.wait_for("ack", Job, timeout=60)

    @waits.step()
    async def ship(ctx: Ctx) -> str:
        return "shipped"

    with pytest.raises(saga.DefinitionError, match="would compensate on timeout"):
        await register(orchestrator, waits)


async def test_a_failure_before_the_pivot_compensates_as_always(
    orchestrator: OrchestratorFactory,
) -> None:
    """The step before the pivot fails for good: the pivot never ran, the completed steps
    are compensated, and the run ends compensated."""
    ledger = Ledger()
    s = pivoted(
        ["reserve", "check", "pay", "ship"],
        "pay",
        compensate={"reserve"},
        ledger=ledger,
        fail={"check": permanent("fraud")},
    )
    orch = await orchestrator(s)
    run = await orch.start(s, Job())
    with pytest.raises(saga.RunCompensatedError, match="fraud"):
        await run.result(timeout=10)
    assert "pay" not in ledger.steps()
    assert ledger.steps("compensation") == ["reserve"]


async def test_a_failure_after_the_pivot_stops_for_an_operator_and_a_retry_goes_on(
    orchestrator: OrchestratorFactory,
) -> None:
    """ship fails for good after the pivot pay: nothing is compensated, the run stops at
    ship with its error (result() raises RunStoppedError); an operator's retry runs ship
    again with fresh attempts and the run completes."""
    ledger = Ledger()
    once = Fail(saga.PermanentError, "carrier down", when=lambda ctx: ctx.step == "ship")
    broken = {"ship": once}
    s = pivoted(
        ["reserve", "pay", "ship"], "pay", compensate={"reserve"}, ledger=ledger, fail=broken
    )
    orch = await orchestrator(s)
    run = await orch.start(s, Job())
    with pytest.raises(saga.RunStoppedError, match="carrier down"):
        await run.result(timeout=10)
    info = await run.info()
    assert info.status is saga.RunStatus.STOPPED
    assert info.step == "ship"
    assert ledger.steps("compensation") == []
    assert [e.kind for e in await run.history()][-1] == "run_stopped"
    broken.clear()  # the carrier is back
    await run.retry()
    assert await run.result(timeout=10) == "ship"
    assert ledger.steps() == ["reserve", "pay", "ship", "ship"]
    assert ledger.steps("compensation") == []


async def test_a_cancel_is_refused_once_the_run_reached_its_pivot(
    orchestrator: OrchestratorFactory,
) -> None:
    """While the pivot runs (and after), cancel() raises InvalidRunStateError naming the
    pivot, and the run goes on to complete; before the pivot a cancel still compensates."""
    gate = Gate("pay")
    s = pivoted(["reserve", "pay", "ship"], "pay", compensate={"reserve"}, gate=gate)
    orch = await orchestrator(s)
    run = await orch.start(s, Job())
    with anyio.fail_after(10):
        await gate.entered.wait()
    with pytest.raises(saga.InvalidRunStateError, match="pivot step 'pay'"):
        await run.cancel()
    gate.release.set()
    assert await run.result(timeout=10) == "ship"
    held = Gate("reserve")
    before = pivoted(["reserve", "pay", "ship"], "pay", compensate={"reserve"}, gate=held)
    before.name = "before_pivot"
    orch = await orchestrator(before)
    early = await orch.start(before, Job())
    with anyio.fail_after(10):
        await held.entered.wait()
    await early.cancel()  # reserve runs: the pivot is not reached
    held.release.set()
    with pytest.raises(saga.RunCancelledError):
        await early.result(timeout=10)


async def test_a_graph_after_its_pivot_finishes_running_branches_then_stops(
    orchestrator: OrchestratorFactory,
) -> None:
    """a, then the pivot p, then b and c in parallel: c fails for good, b (slower) still
    finishes; nothing is compensated and the run stops at c; a retry runs c again and the
    run completes."""
    ledger = Ledger()
    broken = {"c": permanent("c down")}
    s = pivoted(
        ["a", "p", "b", "c"],
        "p",
        after={"b": ["p"], "c": ["p"]},
        compensate={"a"},
        ledger=ledger,
        fail=broken,
        delay={"b": 0.3},
    )
    orch = await orchestrator(s)
    run = await orch.start(s, Job())
    with pytest.raises(saga.RunStoppedError, match="c down"):
        await run.result(timeout=10)
    info = await until_status(run, saga.RunStatus.STOPPED)
    assert set(info.completed_steps) == {"a", "p", "b"}
    assert ledger.steps("compensation") == []
    broken.clear()
    await run.retry()
    out = await run.result(timeout=10)
    assert out == {"b": "b", "c": "c"}
    assert ledger.steps().count("b") == 1


async def test_a_cancel_racing_the_write_that_reaches_the_pivot_is_refused(
    orchestrator: OrchestratorFactory, db: Any
) -> None:
    """a and b at once, then the pivot p after both. The write that completes b and
    creates p's item is held for 1.5 s inside its transaction (a trigger sleeps), holding
    the run's lock; a cancel arrives meanwhile and waits for that lock. Once the write
    committed, the run has reached its pivot: the cancel is refused, p runs, and nothing
    before it is compensated. The cancel used to decide from a snapshot taken before its
    wait: it did not see p's item, was accepted, and a and b were undone after p
    completed."""
    ledger = Ledger()
    gate = Gate("b")
    s = pivoted(
        ["a", "b", "p", "after_p"],
        "p",
        after={"a": [], "b": [], "p": ["a", "b"], "after_p": ["p"]},
        compensate={"a", "b"},
        ledger=ledger,
        gate=gate,
    )
    await db.execute(
        """
        CREATE FUNCTION saga.slow_pivot() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.step = 'p' THEN PERFORM pg_sleep(1.5); END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER slow_pivot AFTER INSERT ON saga.items
            FOR EACH ROW EXECUTE FUNCTION saga.slow_pivot();
        """
    )
    orch = await orchestrator(s)
    run = await orch.start(s, Job())
    with anyio.fail_after(30):
        await gate.entered.wait()
        while "a" not in (await run.info()).completed_steps:  # noqa: ASYNC110
            await anyio.sleep(0.02)
        gate.release.set()  # b completes: its write creates p's item, slowly
        while not await db.fetchval(  # noqa: ASYNC110 - polling the database
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'"
        ):
            await anyio.sleep(0.01)
        with pytest.raises(saga.InvalidRunStateError):
            await run.cancel()
        await run.result()
    assert ledger.steps("compensation") == []
    assert (await run.info()).completed_steps[-2:] == ("p", "after_p")


@pytest.mark.parametrize("graph", [False, True], ids=["linear", "graph"])
async def test_a_run_stopped_at_its_pivot_is_cancelled_and_compensates(
    orchestrator: OrchestratorFactory, graph: bool
) -> None:
    """README ("Pivot steps"): a cancel is refused from the moment the run reaches its
    pivot, "except when the pivot itself gave up and stopped the run
    (`on_give_up="stop"` on the pivot): it never completed, and `cancel()` undoes the
    steps before it"; ("Stopping for an operator"): the operator "lets the run compensate
    (`cancel()`: the completed steps are undone and the run ends `compensated` with the
    step's error)".

    The pivot (capturing a payment) gives up and stops the run. cancel() undoes
    `reserve` and the run ends compensated with the pivot's error (linear and graph).
    Before, cancel() raised InvalidRunStateError "already ended stopped" and nothing
    could be undone. (A run stopped at its pivot because the sleep after it failed to
    start is still refused: the pivot ran; tests/test_waits.py.)"""
    calls: list[str] = []
    s = saga.Saga("stopped_pivot", input=Job)

    @s.step(after=[] if graph else None)
    async def reserve(ctx: saga.Context[Job]) -> str:
        calls.append("reserve")
        return "r-1"

    @reserve.compensate
    async def release(ctx: saga.Context[Job], reservation: str) -> None:
        calls.append(f"release {reservation}")

    @s.step(
        after=[reserve] if graph else None,
        pivot=True,
        retry=saga.Retry(max_attempts=1, on_give_up="stop"),
    )
    async def capture(ctx: saga.Context[Job]) -> str:
        calls.append("capture")
        raise RuntimeError("card declined")

    @s.step(after=[capture] if graph else None)
    async def ship(ctx: saga.Context[Job]) -> str:
        return "shipped"

    await orchestrator(s)
    run = await s.start(Job(n=1))
    with pytest.raises(saga.RunStoppedError):
        await run.result(timeout=10)
    await run.cancel(by="ana", note="card declined: undo the reservation")
    with pytest.raises(saga.RunCompensatedError) as ended:
        await run.result(timeout=10)
    assert ended.value.error is not None
    assert ended.value.error.step == "capture"
    assert calls == ["reserve", "capture", "release r-1"]

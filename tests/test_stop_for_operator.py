"""A step whose retry policy stops the run for an operator when it gives up (people who
move money want a human to look first): the operator retries the step, or lets the run
compensate."""

from __future__ import annotations

import anyio
import pytest

import saga
from tests._sagas import Gate, Job, Ledger, permanent, small_saga
from tests.conftest import OrchestratorFactory

LOOK_FIRST = saga.Retry(max_attempts=2, initial_delay=0.01, on_give_up="stop")


def test_the_policy_is_checked() -> None:
    """on_give_up takes "compensate" or "stop", nothing else."""
    with pytest.raises(saga.DefinitionError, match="on_give_up"):
        saga.Retry(on_give_up="pause")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "after", [None, {"pay": ["reserve"], "notify": []}], ids=["linear", "graph"]
)
async def test_giving_up_stops_and_a_retry_goes_on(
    orchestrator: OrchestratorFactory, after: dict[str, list[str]] | None
) -> None:
    """pay fails on both attempts: nothing is compensated, the run is stopped at pay with
    its error; once fixed, retry() runs pay again and the run completes."""
    ledger, broken = Ledger(), {"pay": permanent("bank down")}
    steps = ["reserve", "pay"] if after is None else ["reserve", "pay", "notify"]
    s = small_saga(
        "payout", steps, compensate={"reserve"}, ledger=ledger, fail=broken,
        retry={"pay": LOOK_FIRST}, after=after,
    )  # fmt: skip
    orch = await orchestrator(s)
    run = await orch.start(s, Job())
    with pytest.raises(saga.RunStoppedError, match="bank down"):
        await run.result(timeout=10)
    assert ledger.steps("compensation") == []
    history = await run.history()
    assert history[-1].kind == "run_stopped"
    assert history[-1].data["on_give_up"] == "stop"
    if after is not None:  # a graph's stop names what its retry() starts again
        assert history[-1].data["held"] == [{"step": "pay", "after": ["reserve"]}]
    broken.clear()
    await run.retry()
    await run.result(timeout=10)
    assert ledger.steps().count("pay") == 2  # once stopped (permanent), once retried
    assert ledger.steps("compensation") == []


@pytest.mark.parametrize("graph", [False, True], ids=["linear", "graph"])
async def test_cancel_lets_a_stopped_run_compensate(
    orchestrator: OrchestratorFactory, graph: bool
) -> None:
    """The operator decides not to retry: cancel() on the stopped run compensates what
    completed, and the run ends compensated with the step's error."""
    ledger = Ledger()
    after = {"pay": ["reserve"], "notify": []} if graph else None
    steps = ["reserve", "pay", "notify"] if graph else ["reserve", "pay"]
    s = small_saga(
        "payout", steps, compensate={"reserve"}, ledger=ledger,
        fail={"pay": permanent("bank down")}, retry={"pay": LOOK_FIRST}, after=after,
    )  # fmt: skip
    orch = await orchestrator(s)
    run = await orch.start(s, Job())
    with pytest.raises(saga.RunStoppedError):
        await run.result(timeout=10)
    await run.cancel()
    with pytest.raises(saga.RunCompensatedError, match="bank down"):
        await run.result(timeout=10)
    assert ledger.steps("compensation") == ["reserve"]


_STOP = saga.Retry(max_attempts=1, on_give_up="stop")


@pytest.mark.parametrize("why", ["on_give_up", "pivot"])
async def test_no_new_step_starts_once_a_branch_stopped_the_run(
    orchestrator: OrchestratorFactory, why: str
) -> None:
    """a, then x and y at once; with one slot, a's worker leases x to itself and leaves
    y ready, not started. x gives up and stops the run (its policy says so, or the run is
    past its pivot a): y never starts, and the run is stopped at x. y used to be claimed
    and run after x gave up. The operator's retry() runs x again and then y: the run
    completes."""
    ledger = Ledger()
    first_call = iter([True])
    s = small_saga(
        "halt",
        ["a", "x", "y"],
        after={"x": ["a"], "y": ["a"]},
        ledger=ledger,
        fail={"x": permanent("x broke", when=lambda ctx: next(first_call, False))},
        retry={"x": _STOP} if why == "on_give_up" else None,
    )
    if why == "pivot":
        s.get_step("a").pivot = True
    orch = await orchestrator(s, concurrency=1)
    run = await orch.start(s, Job())
    with pytest.raises(saga.RunStoppedError):
        await run.result(timeout=10)
    info = await run.info()
    assert (info.step, info.error and info.error.step) == ("x", "x")
    assert "y" not in ledger.steps("step")
    await run.retry()
    await run.result(timeout=10)
    assert ledger.steps("step").count("y") == 1


async def test_a_graph_run_is_stopped_at_the_step_that_gave_up(
    orchestrator: OrchestratorFactory,
) -> None:
    """a, then x and y at once: x gives up (on_give_up="stop") while y, slower, still
    runs. The run stops once y ended, at x: RunInfo.step and the run_stopped event name
    x, whose error the run carries. They used to name y, the branch that ended last,
    pointing an operator at a step that completed."""
    s = small_saga(
        "halt2",
        ["a", "x", "y"],
        after={"x": ["a"], "y": ["a"]},
        fail={"x": permanent("x broke")},
        retry={"x": _STOP},
        delay={"y": 0.3},
    )
    orch = await orchestrator(s)
    run = await orch.start(s, Job())
    with pytest.raises(saga.RunStoppedError):
        await run.result(timeout=10)
    info = await run.info()
    stopped = [e for e in await run.history() if e.kind == "run_stopped"]
    assert info.error is not None
    assert (info.error.step, info.step, [e.step for e in stopped]) == ("x", "x", ["x"])


async def test_a_cancel_accepted_during_the_last_attempt_of_a_stopping_step_rolls_back(
    orchestrator: OrchestratorFactory,
) -> None:
    """README (Runtime, cancel()): "the step running now finishes its attempt, then
    every completed step is compensated ... A cancel accepted before the run ended always
    wins over its completion." A cancel accepted while the last attempt of a step whose
    policy stops the run (on_give_up="stop") runs and fails: the failure is recorded,
    the completed step is undone and the run ends compensated with the step's error (as
    when the cancel is seen before the step gives up, and as cancelling the stopped run
    does), not stopped."""
    gate, ledger = Gate("pay"), Ledger()
    s = small_saga(
        "stopping", ["reserve", "pay"], compensate={"reserve"}, ledger=ledger, gate=gate,
        fail={"pay": permanent("bank down")},
        retry={"pay": saga.Retry(max_attempts=1, on_give_up="stop")},
    )  # fmt: skip
    orch = await orchestrator(s)
    run = await orch.start(s, Job())
    with anyio.fail_after(10):
        await gate.entered.wait()
    await run.cancel(by="ana", note="customer asked")
    gate.release.set()
    with pytest.raises(saga.RunCompensatedError) as raised:
        await run.result(timeout=15)
    assert raised.value.error is not None
    assert "bank down" in raised.value.error.message
    assert ledger.steps("compensation") == ["reserve"]
    kinds = [(e.kind, e.step) for e in await run.history()]
    assert ("step_failed", "pay") in kinds
    assert ("run_stopped", "pay") not in kinds

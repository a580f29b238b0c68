"""A step whose retry policy stops the run for an operator when it gives up (people who
move money want a human to look first): the operator retries the step, or lets the run
compensate."""

from __future__ import annotations

import pytest

import saga
from tests._sagas import Job, Ledger, permanent, small_saga
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
    assert history[-1].data == {"on_give_up": "stop"}
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

"""Log lines name what an operator filters and alerts on.

README, "Logging": event names "with `run_id`, `saga`, `step` and `attempt` bound", and
"Logs carry error *types*". DESIGN: a run whose compensation gives up "is `failed` and
waits for an operator, with the error recorded"; its line is the error an operator
alerts on, so it names the step and the error type that stopped the run.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import anyio
import pytest
from pydantic import BaseModel
from structlog.testing import capture_logs

import saga
from saga.testing import Faults, advance
from tests._sagas import Job, permanent, small_saga, until_status
from tests.conftest import OrchestratorFactory

pytestmark = pytest.mark.timeout(60)


class Approval(BaseModel):
    ok: bool


async def test_every_log_line_naming_a_run_names_its_saga(
    orchestrator: OrchestratorFactory,
) -> None:
    """Every line that names a run by its id names its saga too, so filtering the logs
    by saga keeps it: a signal received by a waiting run, a schedule starting a run,
    and the run's own steps."""
    s = saga.Saga("logged_wait", input=Job)

    @s.step()
    async def ask(ctx: saga.Context[Job]) -> str:
        return "asked"

    decision = s.wait_for("decision", Approval)

    @s.step()
    async def act(ctx: saga.Context[Job]) -> str:
        return "acted"

    ticked = small_saga("logged_tick", ["tick"])
    every = saga.Scheduled("ticks", ticked, saga.Schedule.every(timedelta(seconds=1)), Job())
    with capture_logs() as logs:
        orch = await orchestrator(s, ticked, schedules=[every])
        run = await s.start(Job())
        await until_status(run, saga.RunStatus.WAITING)
        assert await run.signal(decision, Approval(ok=True))
        assert await run.result(timeout=20) == "acted"
        with anyio.fail_after(15):
            while not any(line["event"] == "schedule_fired" for line in logs):  # noqa: ASYNC110
                await anyio.sleep(0.05)
        await orch.aclose()
    events = {str(line["event"]) for line in logs}
    assert {"signal_received", "schedule_fired"} <= events, events
    nameless = sorted(
        {str(line["event"]) for line in logs if "run_id" in line and "saga" not in line}
    )
    assert nameless == [], f"log lines naming a run but not its saga: {nameless}"


async def test_the_run_failed_line_names_the_compensation_and_error_that_gave_up(
    orchestrator: OrchestratorFactory,
) -> None:
    """``run_failed``, an error, names the compensation that gave up (``step``,
    ``attempt``) and its error type, as the ``compensation_failed`` warning before it
    does."""
    s = small_saga(
        "failed_line",
        ["reserve", "charge"],
        compensate={"reserve"},
        fail={"charge": permanent("declined")},
        undo_retry=saga.Retry(max_attempts=1),
    )
    faults = Faults()
    faults.fail_compensation("reserve", permanent=True)
    with capture_logs() as logs:
        orch = await orchestrator(s)
        faults.attach(orch)
        run = await s.start(Job())
        with pytest.raises(saga.RunFailedError):
            await run.result(timeout=20)
        await orch.aclose()  # the worker logs after its commit, which woke result()
    [gave_up] = [line for line in logs if line["event"] == "compensation_failed"]
    assert gave_up["step"] == "reserve"
    assert gave_up["error_type"] == "saga.testing.InjectedFault"
    [failed] = [line for line in logs if line["event"] == "run_failed"]
    assert failed["log_level"] == "error"
    assert (failed["step"], failed["attempt"], failed["error_type"]) == (
        "reserve",
        1,
        "saga.testing.InjectedFault",
    )


async def test_a_run_stopped_for_an_operator_at_a_wait_logs_an_error_naming_the_wait(
    orchestrator: OrchestratorFactory,
) -> None:
    """A wait whose timeout passes with ``on_timeout="stop"`` leaves the run ``stopped``,
    waiting for an operator as a ``failed`` run does: ``run_stopped`` is an error line
    (printed by default, where info lines are not) naming the wait and the error type."""
    s = saga.Saga("stopped_line", input=Job)

    @s.step()
    async def ask(ctx: saga.Context[Job]) -> str:
        return "asked"

    s.wait_for("decision", Approval, timeout=timedelta(hours=1), on_timeout="stop")

    @s.step()
    async def act(ctx: saga.Context[Job]) -> str:
        return "acted"

    with capture_logs() as logs:
        orch = await orchestrator(s)
        run = await s.start(Job())
        await until_status(run, saga.RunStatus.WAITING)
        await advance(orch, run, timedelta(hours=2))
        with pytest.raises(saga.RunStoppedError):
            await run.result(timeout=20)
        await orch.aclose()
    [stopped] = [line for line in logs if line["event"] == "run_stopped"]
    assert stopped["log_level"] == "error"
    assert stopped["step"] == "decision"
    assert stopped["error_type"] == "saga.WaitTimedOut"


async def test_the_lease_expired_line_names_both_workers(
    orchestrator: OrchestratorFactory,
) -> None:
    """``lease_expired``, the warning of a takeover, names the worker whose lease expired
    (``previous_worker``) and the one taking the run over (``worker``)."""
    s = small_saga("expired_line", ["a", "b"])
    faults = Faults()
    faults.expire_lease("a")
    with capture_logs() as logs:
        orch = await orchestrator(s, lease_seconds=1)
        faults.attach(orch)
        run = await s.start(Job())
        assert await run.result(timeout=20) == "b"
        await orch.aclose()
    [expired] = [line for line in logs if line["event"] == "lease_expired"]
    assert expired["worker"] == orch.worker_id
    assert expired["previous_worker"] == orch.worker_id  # (it expired its own, here)
    assert (expired["saga"], expired["step"], expired["attempt"]) == ("expired_line", "a", 1)


def _named(line: dict[str, Any]) -> tuple[Any, Any, Any]:
    return line.get("step"), line.get("attempt"), line.get("error_type")


async def test_graph_run_failed_line_names_the_compensation_that_gave_up(
    orchestrator: OrchestratorFactory,
) -> None:
    """README ("Logging"): "A run that waits for an operator logs an error, `run_failed`
    or `run_stopped`, naming the step (or wait), attempt and error type that stopped
    it."

    A run whose steps run in parallel: `a`'s compensation gives up at once while `b`'s
    is still running; the run ends `failed` in `b`'s later write. Its `run_failed` line
    names the compensation that gave up (`a`, attempt 1) and its error type, recorded
    by that earlier write."""
    s = saga.Saga("graph_failed_line", input=Job)

    @s.step(after=[])
    async def a(ctx: saga.Context[Job]) -> str:
        return "a"

    @a.compensate(retry=saga.Retry(max_attempts=1))
    async def undo_a(ctx: saga.Context[Job], result: str) -> None:
        raise saga.PermanentError("cannot undo a")

    @s.step(after=[])
    async def b(ctx: saga.Context[Job]) -> str:
        return "b"

    @b.compensate
    async def undo_b(ctx: saga.Context[Job], result: str) -> None:
        await anyio.sleep(1.0)  # the branch that ends last

    @s.step(after=[a, b], retry=saga.Retry(max_attempts=1))
    async def c(ctx: saga.Context[Job]) -> str:
        raise saga.PermanentError("declined")

    with capture_logs() as logs:
        orch = await orchestrator(s)
        run = await s.start(Job())
        with pytest.raises(saga.RunFailedError):
            await run.result(timeout=20)
        await orch.aclose()
    [gave_up] = [line for line in logs if line["event"] == "compensation_failed"]
    [failed] = [line for line in logs if line["event"] == "run_failed"]
    assert failed["log_level"] == "error"
    assert _named(failed) == _named(gave_up) == ("a", 1, "saga.PermanentError"), (
        f"run_failed names {_named(failed)}; the compensation that gave up was {_named(gave_up)}"
    )


async def test_graph_run_stopped_line_names_the_attempt_and_error_that_stopped_it(
    orchestrator: OrchestratorFactory,
) -> None:
    """README ("Logging"): "A run that waits for an operator logs an error, `run_failed`
    or `run_stopped`, naming the step (or wait), attempt and error type that stopped
    it."; ("Retries") `on_give_up="stop"`: "The run ends `stopped` at that step".

    A run whose steps run in parallel: `a` gives up at once with `on_give_up="stop"`
    while `b` still runs; the run stops once `b` ends, in `b`'s write. Its
    `run_stopped` line names `a`, its attempt and its error type."""
    s = saga.Saga("graph_stopped_line", input=Job)

    @s.step(after=[], retry=saga.Retry(max_attempts=1, on_give_up="stop"))
    async def a(ctx: saga.Context[Job]) -> str:
        raise saga.PermanentError("declined")

    @s.step(after=[])
    async def b(ctx: saga.Context[Job]) -> str:
        await anyio.sleep(1.0)  # the branch that ends last
        return "b"

    with capture_logs() as logs:
        orch = await orchestrator(s)
        run = await s.start(Job())
        with pytest.raises(saga.RunStoppedError):
            await run.result(timeout=20)
        await orch.aclose()
    [gave_up] = [line for line in logs if line["event"] == "step_failed"]
    [stopped] = [line for line in logs if line["event"] == "run_stopped"]
    assert stopped["log_level"] == "error"
    assert _named(stopped) == _named(gave_up) == ("a", 1, "saga.PermanentError"), (
        f"run_stopped names {_named(stopped)}; the step that gave up was {_named(gave_up)}"
    )

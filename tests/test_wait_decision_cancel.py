"""A cancel of a waiting run whose timeout passed and whose ``on_timeout`` function is
running: README ("Waits", Cancel) says it is cancelled as a running step is.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from pydantic import BaseModel

import saga
from saga.testing import advance
from tests._sagas import FAST, Job, Ledger, until_status
from tests.conftest import OrchestratorFactory

pytestmark = pytest.mark.timeout(60)


class Decision(BaseModel):
    approved: bool


def approval(ledger: Ledger, on_timeout: Any) -> saga.Saga[Job]:
    s = saga.Saga("decided_late", input=Job)

    @s.step(retry=FAST)
    async def reserve(ctx: saga.Context[Job]) -> int:
        ledger.record(ctx)
        return ctx.input.n

    @reserve.compensate
    async def release(ctx: saga.Context[Job], n: int) -> None:
        ledger.record(ctx, n)

    s.wait_for("decision", Decision, timeout=60, on_timeout=on_timeout)

    @s.step(retry=FAST)
    async def finish(ctx: saga.Context[Job]) -> str:
        ledger.record(ctx)
        return "done"

    return s


async def test_a_cancel_while_on_timeout_runs_wins_once_the_function_returns(
    orchestrator: OrchestratorFactory,
) -> None:
    """The wait's timeout passes (advance) and its ``on_timeout`` function runs; the run
    is still ``waiting``. A cancel from another orchestrator does not interrupt the
    function: once it returns (1.5 s later), the cancel wins: the run ends ``cancelled``,
    its completed step compensated once, and the step after the wait never runs."""
    ledger = Ledger()
    entered, release = anyio.Event(), anyio.Event()

    async def decide(ctx: saga.Context[Job]) -> Decision:
        entered.set()
        await release.wait()
        return Decision(approved=True)

    s = approval(ledger, decide)
    a = await orchestrator(s, lease_seconds=2)
    b = await orchestrator(s, lease_seconds=2)
    run = await a.start(s, Job(n=6))
    await until_status(run, saga.RunStatus.WAITING)
    await advance(a, run, 120)
    with anyio.fail_after(10):
        await entered.wait()
    assert (await run.info()).status is saga.RunStatus.WAITING
    await b.get_run(run.id).cancel()
    await anyio.sleep(1.5)
    assert (await run.info()).status is saga.RunStatus.WAITING  # the function still runs
    release.set()
    with pytest.raises(saga.RunCancelledError):
        await run.result(timeout=20)
    assert [c.value for c in ledger.of("compensation")] == [6]
    assert [c.step for c in ledger.of("step")] == ["reserve"]

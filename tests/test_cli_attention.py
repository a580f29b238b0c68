"""`saga attention` paging from a run that does not exist."""

from __future__ import annotations

import uuid

import anyio
import pytest

import saga
from tests._sagas import Job
from tests._wait_sagas import trip
from tests.conftest import Cli, OrchestratorFactory


@pytest.mark.timeout(60)
async def test_attention_after_an_unknown_run_exits_3_not_no_run_needs_attention(
    cli: Cli, orchestrator: OrchestratorFactory
) -> None:
    """`saga attention --after RUN` naming no run (mistyped, or pruned between two
    pages) exits 3, run not found, as `saga runs --before` does: never "no run needs
    attention" while a failed run does."""
    orch = await orchestrator(trip)
    run = await orch.start(trip, Job(n=1))
    with anyio.fail_after(10), pytest.raises(saga.RunFailedError):
        await run.result(timeout=10)
    stray = str(uuid.uuid4())
    code, _, err = await cli("runs", "--before", stray)
    assert code == 3, err  # the same cursor on `saga runs`, for comparison
    code, out, err = await cli("attention", "--after", stray)
    assert "no run needs attention" not in err, "a failed run needs attention"
    assert code == 3, (code, out, err)

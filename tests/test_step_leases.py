"""A step's own ``lease_seconds`` holds from the start of its attempt.

README: ``@saga.step(...)`` takes ``lease_seconds``, "overriding the orchestrator's lease
for that step and its compensation", and "crash and lease faults recover through lease
expiry, so use a short ``lease_seconds`` in such tests". A claim leases with the
orchestrator's length; an attempt whose worker dies before its first heartbeat must
still be taken over after the step's shorter lease.
"""

from __future__ import annotations

import anyio
import pytest

import saga
from saga.testing import Faults
from tests._sagas import ONCE, Job, fast
from tests.conftest import OrchestratorFactory

# The orchestrators keep the default 30 s lease: a run stuck on it fails the test.
WITHIN = 8.0


def _saga(shape: str) -> tuple[saga.Saga[Job], list[tuple[str, int]]]:
    calls: list[tuple[str, int]] = []
    s = saga.Saga(f"short_lease_{shape}", input=Job)

    @s.step(lease_seconds=1, retry=fast(3))
    async def quick(ctx: saga.Context[Job]) -> int:
        calls.append(("quick", ctx.attempt))
        return ctx.attempt

    @quick.compensate(retry=fast(3))
    async def undo_quick(ctx: saga.Context[Job], attempt: int) -> None:
        calls.append(("undo_quick", ctx.attempt))

    @s.step(retry=ONCE, after=[quick] if shape == "graph" else None)
    async def last(ctx: saga.Context[Job]) -> int:
        if ctx.input.fail:
            raise saga.PermanentError("declined")
        return ctx.result(quick)

    return s, calls


@pytest.mark.parametrize("shape", ["linear", "graph"])
@pytest.mark.parametrize("phase", ["step", "compensation"])
async def test_a_worker_dying_in_a_short_lease_step_is_noticed_after_that_lease(
    orchestrator: OrchestratorFactory, shape: str, phase: str
) -> None:
    """A step (or its compensation) declared with lease_seconds=1, in an orchestrator
    whose lease is 30 s, crashes its worker right after its side effect, before any
    heartbeat: the attempt is taken over about a second later (well within 8 s), not
    after the claim's 30 s, and the run ends as it would have."""
    s, calls = _saga(shape)
    faults = Faults()
    faults.crash_after("quick", compensation=phase == "compensation")
    faults.attach(await orchestrator(s))
    run = await s.start(Job(n=1, fail="yes" if phase == "compensation" else ""))
    began = anyio.current_time()
    with anyio.fail_after(WITHIN):
        if phase == "step":
            assert await run.result() == 2
        else:
            with pytest.raises(saga.RunCompensatedError):
                await run.result()
    assert anyio.current_time() - began < WITHIN
    assert faults.fired["crash_after"] == 1
    name = "quick" if phase == "step" else "undo_quick"
    assert [c for c in calls if c[0] == name] == [(name, 1), (name, 2)]

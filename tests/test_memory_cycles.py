"""A finished run leaves nothing behind for the garbage collector to find.

Every object a run's steps used is freed by reference counting when the run's task
ends: a reference cycle (a run holding its step's context holding the run) would leave
each finished run to Python's cycle collector, whose passes then cost CPU on every step
of a busy worker.
"""

from __future__ import annotations

import gc

import anyio

import saga
from saga._active import ActiveRun, Reads
from tests._sagas import Job, small_saga
from tests.conftest import OrchestratorFactory


def _alive(kind: type) -> int:
    return sum(1 for o in gc.get_objects() if type(o) is kind)


async def test_finished_runs_are_freed_without_the_cycle_collector(
    orchestrator: OrchestratorFactory,
) -> None:
    """With the cycle collector off, 40 runs of a three-step saga (each step reading the
    run's input) complete, and at most one ActiveRun, Context and Reads stays alive (the
    last run's, which its worker's last lease may still name): reference counting freed
    the others."""
    s = small_saga("freed", ["a", "b", "c"], result=lambda ctx: ctx.input.n)
    orch = await orchestrator(s)
    gc.collect()
    gc.disable()
    try:
        runs = [await orch.start(s, Job(n=n)) for n in range(40)]
        with anyio.fail_after(20):
            for run in runs:
                await run.result()
        await anyio.sleep(0.2)  # the runs' tasks end after their last write
        left = {kind.__name__: _alive(kind) for kind in (ActiveRun, saga.Context, Reads)}
    finally:
        gc.enable()
    assert all(count <= 1 for count in left.values()), left

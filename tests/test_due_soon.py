"""A worker learns from the database when the next work it can run comes due, not only
from the timers of the writes it made itself.

README: "the poll is only the fallback". A retry's backoff (or a sleep) written by a
worker that then shut down (a deploy) is due at a time no other worker was told. A
worker started next looks at the database once idle: work coming due before its next
poll is claimed when due, by the database's clock (the one that made it due).
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import anyio
import pytest

import saga
from tests._sagas import Gate, Job, small_saga, transient, until_status
from tests.conftest import OrchestratorFactory

pytestmark = pytest.mark.timeout(60)

BACKOFF = 2.0  # the retry's delay, no jitter
POLL = 30.0  # the workers' poll: the fallback this test must not wait for


async def _failed_once(run: saga.RunHandle, step: str) -> float:
    """When the run's first attempt of ``step`` failed (monotonic, seen from here)."""
    with anyio.fail_after(10):
        while not any(  # noqa: ASYNC110
            e.kind == "step_failed" and e.step == step for e in await run.history()
        ):
            await anyio.sleep(0.02)
    return time.monotonic()


@pytest.mark.parametrize("shape", ["linear", "graph"])
async def test_a_retry_left_by_a_stopped_worker_is_claimed_when_due_by_the_next_worker(
    orchestrator: OrchestratorFactory, shape: str
) -> None:
    """Worker A runs a step that fails once; its retry is due 2 s later. A shuts down
    before then, and worker B (poll 30 s) starts: B claims the retry when it comes due,
    and the run completes within a few seconds of its failure. Before, B slept until
    its first poll and the run completed 30 s after B started. The same for a step of a
    graph run (its item's retry)."""
    retry = saga.Retry(max_attempts=3, initial_delay=BACKOFF, max_delay=BACKOFF, jitter=0)
    after = {"a": [], "b": [], "join": ["a", "b"]} if shape == "graph" else None
    steps = ["a", "b", "join"] if shape == "graph" else ["a", "b"]
    s = small_saga(f"due_soon_{shape}", steps, after=after, fail={"a": transient(1)}, retry=retry)
    first = await orchestrator(s, poll_interval=POLL)
    run = await s.start(Job(n=1))
    failed_at = await _failed_once(run, "a")
    await first.aclose()
    second = await orchestrator(s, poll_interval=POLL)
    run = second.get_run(run.id)
    await run.result(timeout=40)
    took = time.monotonic() - failed_at
    assert BACKOFF - 0.5 < took < BACKOFF + 6, f"completed {took:.1f} s after the failure"
    kinds = [(e.kind, e.step, e.attempt) for e in await run.history()]
    assert ("step_completed", "a", 2) in kinds


async def test_a_sleep_left_by_a_worker_that_shut_down_is_claimed_when_due_by_a_running_worker(
    orchestrator: OrchestratorFactory,
) -> None:
    """README (claim loop): "A worker whose claim finds no more work also asks the database
    when the next work it can run, leased by no one, comes due before its next poll (a
    retry's backoff or a sleep that a worker since shut down wrote), and claims it then,
    by the database's clock." CHANGELOG: a sleep "written by a worker that then shut down
    (a deploy) was claimed by the next worker only at its poll (30 s late with a 30 s
    poll)".

    A rolling deploy: new worker B (poll 30 s) is already up and idle while old worker A
    runs a run's first step; A parks the run in a 2 s sleep, then shuts down. A knew of
    work coming due (its timer), so its shutdown wakes the other workers: B asks the
    database, and claims the run when its sleep ends. Before, nothing woke B (A's park
    and its shutdown, holding no lease, sent no NOTIFY) and the run woke at B's poll."""
    gate = Gate("a", times=1)
    s_old = sleeper_gated("deploy_sleep", 2.0, gate)
    a = await orchestrator(s_old, poll_interval=30)
    run = await a.start(s_old, Job())
    with anyio.fail_after(10):
        await gate.entered.wait()  # A holds the run
    b = await orchestrator(sleeper_gated("deploy_sleep", 2.0, None), poll_interval=30)
    await anyio.sleep(0.5)  # B is idle: its claim found nothing, nothing unleased is due
    gate.release.set()
    await until_status(run, saga.RunStatus.SLEEPING)
    parked = time.monotonic()
    await a.aclose()  # the old worker goes (it holds no lease)
    run = b.get_run(run.id)
    with anyio.move_on_after(10):
        await run.result(timeout=10)
    took = time.monotonic() - parked
    status = (await run.info()).status
    assert status is saga.RunStatus.COMPLETED, (
        f"run still {status} {took:.1f} s after it parked in a 2 s sleep (worker B polls at 30 s)"
    )


def sleeper_gated(name: str, seconds: float, gate: Gate | None) -> saga.Saga[Any]:
    s = saga.Saga(name, input=Job)

    @s.step()
    async def a(ctx: saga.Context[Job]) -> str:
        if gate is not None:
            await gate.pass_through(ctx)
        return "a"

    s.sleep(timedelta(seconds=seconds))

    @s.step()
    async def b(ctx: saga.Context[Job]) -> str:
        return "b"

    return s

"""Due work that a claim passed, because another transaction held its row, is claimed
once that transaction ends, not at the next poll.

README: workers are woken, and the poll is only the fallback ("a lost notification only
costs latency"). Claims lease with ``FOR UPDATE SKIP LOCKED``: a due row that another
transaction holds (a caller's transaction that sent the run a signal, a write of one of
the run's other parallel steps) is passed over, and its release is announced by no one.
The claim loop then looks again soon, not after ``poll_interval`` (30 s in these tests).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import asyncpg
import pytest

import saga
from tests._sagas import Job, small_saga, transient
from tests.conftest import OrchestratorFactory

pytestmark = pytest.mark.timeout(60)

BACKOFF = 0.5  # the retry's delay: the row comes due while it is held
HOLD = 2.0  # how long the row stays held past that


@asynccontextmanager
async def held(dsn: str, sql: str, *args: Any) -> AsyncIterator[None]:
    """Hold the rows ``sql`` selects (FOR UPDATE) in another transaction for the block."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            assert await conn.fetch(sql, *args)
            yield
    finally:
        await conn.close()


async def _first_attempt_failed(run: saga.RunHandle, step: str) -> None:
    with anyio.fail_after(10):
        while not any(  # noqa: ASYNC110
            e.kind == "step_failed" and e.step == step for e in await run.history()
        ):
            await anyio.sleep(0.02)


async def _finishes_soon_after_release(run: saga.RunHandle, released_at: float) -> None:
    await run.result(timeout=20)
    late = time.monotonic() - released_at
    if late >= 5:  # (the history, with its times, says which claim took it and when)
        lines = "\n".join(e.describe() for e in await run.history())
        pytest.fail(f"claimed {late:.1f} s after the row was released (poll is 30 s):\n{lines}")


async def test_a_retry_due_while_a_caller_holds_its_run_row_runs_once_released(
    orchestrator: OrchestratorFactory, dsn: str
) -> None:
    """A run's retry comes due while another transaction holds the run's row: the claim
    that the retry's timer triggers passes it. Once the transaction ends, the run is
    claimed within moments (before this fix it waited for the 30 s poll)."""
    retry = saga.Retry(max_attempts=3, initial_delay=BACKOFF, max_delay=BACKOFF)
    s = small_saga("passed_run", ["a", "b"], fail={"a": transient(1)}, retry=retry)
    await orchestrator(s, poll_interval=30.0)
    run = await s.start(Job(n=1))
    await _first_attempt_failed(run, "a")
    async with held(dsn, "SELECT 1 FROM saga.runs WHERE id = $1 FOR UPDATE", run.id):
        await anyio.sleep(BACKOFF + HOLD)
        assert (await run.info()).status is not saga.RunStatus.COMPLETED
    await _finishes_soon_after_release(run, time.monotonic())


async def test_a_row_held_for_long_is_claimed_within_moments_of_its_release(
    orchestrator: OrchestratorFactory, dsn: str
) -> None:
    """A caller's transaction holds a run's row for 11 s past its retry's due time.
    The worker looks at the passed row less often as the hold goes on, but at least
    once a second: it is claimed within moments of its release. Before, the looks
    doubled up to the poll (20 ms ... 5.1 s, 10.2 s), and this run was claimed about
    9 s after its release."""
    retry = saga.Retry(max_attempts=3, initial_delay=BACKOFF, max_delay=BACKOFF)
    s = small_saga("passed_long", ["a", "b"], fail={"a": transient(1)}, retry=retry)
    await orchestrator(s, poll_interval=30.0)
    run = await s.start(Job(n=1))
    await _first_attempt_failed(run, "a")
    async with held(dsn, "SELECT 1 FROM saga.runs WHERE id = $1 FOR UPDATE", run.id):
        await anyio.sleep(BACKOFF + 11.0)
    await _finishes_soon_after_release(run, time.monotonic())


async def test_a_parallel_steps_retry_due_while_its_item_is_held_runs_once_released(
    orchestrator: OrchestratorFactory, dsn: str
) -> None:
    """The same for a step of a graph run: its retry comes due while another
    transaction holds its row (as a write of one of the run's other steps does, for a
    moment). The claim passes it; once released, it is claimed within moments."""
    retry = saga.Retry(max_attempts=3, initial_delay=BACKOFF, max_delay=BACKOFF)
    s = small_saga(
        "passed_item",
        ["left", "right", "join"],
        after={"left": [], "right": [], "join": ["left", "right"]},
        fail={"left": transient(1)},
        retry=retry,
    )
    await orchestrator(s, poll_interval=30.0)
    run = await s.start(Job(n=1))
    await _first_attempt_failed(run, "left")
    sql = "SELECT 1 FROM saga.items WHERE run_id = $1 AND step = 'left' FOR UPDATE"
    async with held(dsn, sql, run.id):
        await anyio.sleep(BACKOFF + HOLD)
        assert (await run.info()).status is not saga.RunStatus.COMPLETED
    await _finishes_soon_after_release(run, time.monotonic())

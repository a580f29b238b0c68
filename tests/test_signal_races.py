"""Races between a signal and the other writers of a run's wait, forced into the
interleavings that matter on one orchestrator: the operator's retry of a run stopped at
its timed-out wait, arriving while the signal that resumes it is being written. Every
writer of a signal row locks the run row first; a writer that did not would re-park the
run for a fresh timeout with its payload in hand, or deadlock with the sender."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio
import asyncpg
import pytest
from pydantic import BaseModel

import saga
from saga.testing import advance
from tests._sagas import Job
from tests.conftest import OrchestratorFactory

pytestmark = pytest.mark.timeout(60)


class Verdict(BaseModel):
    by: str


def stopping_saga() -> saga.Saga[Job]:
    """hold -> wait "verdict" (an hour; on timeout: stop for an operator) -> decide."""
    s = saga.Saga("stopping", input=Job)

    @s.step()
    async def hold(ctx: saga.Context[Job]) -> int:
        return ctx.input.n

    verdict = s.wait_for("verdict", Verdict, timeout=3600, on_timeout="stop")

    @s.step()
    async def decide(ctx: saga.Context[Job]) -> str:
        return ctx.result(verdict).by

    return s


async def blocked_on_a_lock(db: asyncpg.Connection) -> int:
    return int(
        await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock'"
        )
    )


async def stopped_run(orch: saga.Orchestrator, s: saga.Saga[Job]) -> saga.RunHandle:
    """A run of ``s`` stopped at its timed-out wait."""
    run = await orch.start(s, Job(n=1))
    with anyio.fail_after(15):
        while (await run.info()).status is not saga.RunStatus.WAITING:  # noqa: ASYNC110
            await anyio.sleep(0.02)
    await advance(orch, run, 3600)
    with pytest.raises(saga.RunStoppedError):
        await run.result(timeout=10)
    return run


async def assert_resumes_at_once(
    run: saga.RunHandle, db: asyncpg.Connection, outcome: list[str]
) -> None:
    """The run is not parked for its fresh timeout with its signal in hand: it ends,
    with the signal's payload."""
    info = await run.info()
    signal = await db.fetchrow("SELECT payload, closed FROM saga.signals")
    parked = info.status is saga.RunStatus.WAITING and info.due_at is not None
    assert not (parked and info.due_at > datetime.now(UTC) + timedelta(seconds=60)), (
        f"retry {outcome}: the run waits until {info.due_at} with its signal {dict(signal)}"
    )
    assert await run.result(timeout=10) == "ops"


async def operator_retry(run: saga.RunHandle, outcome: list[str]) -> None:
    """The operator's retry, noting how it went: "refused" means it saw the run already
    resumed by the signal, which is fine."""
    try:
        await run.retry()
    except saga.InvalidRunStateError:
        outcome.append("refused")
    else:
        outcome.append("retried")


async def test_an_operators_retry_racing_a_signal_to_a_stopped_run_does_not_delay_it(
    orchestrator: OrchestratorFactory, pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    """A run stopped at its timed-out wait: the operator's retry (wait again) arrives
    while the signal that resumes it is being committed. Whichever goes first, the
    signal is not lost nor held back: the run resumes at once with its payload (it does
    not sit on it for the fresh hour-long timeout)."""
    s = stopping_saga()
    orch = await orchestrator(s)
    run = await stopped_run(orch, s)
    outcome: list[str] = []

    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            assert await orch.signal(run.id, "verdict", Verdict(by="ops"), conn=conn) is True
            async with anyio.create_task_group() as tg:
                tg.start_soon(operator_retry, run, outcome)
                with anyio.fail_after(10):  # the premise: the retry waits for the signal
                    while await blocked_on_a_lock(db) == 0:  # noqa: ASYNC110
                        await anyio.sleep(0.02)
                await tx.commit()
        except BaseException:
            await tx.rollback()
            raise
    await assert_resumes_at_once(run, db, outcome)


async def test_an_operators_retry_and_a_signal_holding_the_run_row_do_not_deadlock(
    orchestrator: OrchestratorFactory, pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    """The other interleaving: a signal to a stopped run has locked the run's row (its
    first statement; it validates the payload next) when the operator's retry comes.
    The retry waits behind the run row, the order every writer of a signal row takes,
    so neither fails on a deadlock, and the run resumes at once with the payload."""
    s = stopping_saga()
    orch = await orchestrator(s)
    run = await stopped_run(orch, s)
    outcome: list[str] = []

    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            # What signal() does first, in the caller's transaction it is about to use.
            await conn.execute("SELECT 1 FROM saga.runs WHERE id = $1 FOR UPDATE", run.id)
            async with anyio.create_task_group() as tg:
                tg.start_soon(operator_retry, run, outcome)
                with anyio.fail_after(10):
                    while await blocked_on_a_lock(db) == 0:  # noqa: ASYNC110
                        await anyio.sleep(0.02)
                assert await orch.signal(run.id, "verdict", Verdict(by="ops"), conn=conn)
                await tx.commit()
        except BaseException:
            await tx.rollback()
            raise
    await assert_resumes_at_once(run, db, outcome)

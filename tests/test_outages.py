"""Dropped connections and a PostgreSQL restart in the middle of work lose nothing."""

from __future__ import annotations

import anyio
import asyncpg
import pytest

import saga
from tests._harness import Server
from tests._sagas import Job, small_saga
from tests.conftest import OrchestratorFactory


def steady_saga() -> saga.Saga[Job]:
    """Three steps of 30 ms, each retried up to 5 times."""
    retry = saga.Retry(max_attempts=5, initial_delay=0.05)
    return small_saga("steady", ["a", "b", "c"], delay=0.03, retry=retry)


async def assert_each_step_completed_once(dsn: str, runs: list[saga.RunHandle]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT run_id, step, count(*) AS n FROM saga.events"
            " WHERE kind = 'step_completed' GROUP BY run_id, step"
        )
    finally:
        await conn.close()
    assert len(rows) == 3 * len(runs)
    assert {r["n"] for r in rows} == {1}


async def wait_for_completed(dsn: str, at_least: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        with anyio.fail_after(30):
            while (  # noqa: ASYNC110 - polling the database
                await conn.fetchval("SELECT count(*) FROM saga.runs WHERE status = 'completed'")
                < at_least
            ):
                await anyio.sleep(0.02)
    finally:
        await conn.close()


@pytest.mark.timeout(120)
async def test_killed_backend_connections_are_survived(
    orchestrator: OrchestratorFactory, dsn: str
) -> None:
    """Terminating every backend of the database (pool and LISTEN connections) several
    times mid-work: the orchestrator reconnects and every run completes, each step
    recorded once."""
    s = steady_saga()
    await orchestrator(s, concurrency=8)
    runs = [await s.start(Job(n=i)) for i in range(60)]
    killer = await asyncpg.connect(dsn)
    killed = 0
    try:
        for round_ in range(3):
            await wait_for_completed(dsn, 10 * round_ + 1)
            killed += await killer.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
    finally:
        await killer.close()
    assert killed >= 3  # the premise: connections in use really were killed
    for run in runs:
        assert await run.result(timeout=60) == "c"
    await assert_each_step_completed_once(dsn, runs)


@pytest.mark.timeout(120)
async def test_postgres_restart_mid_work_loses_nothing(
    orchestrator: OrchestratorFactory, dsn: str, pg_server: Server
) -> None:
    """`pg_ctl restart -m immediate` (a crash) while runs are in flight: the orchestrator
    rides through the outage, and every run started before it completes exactly once."""
    await pg_server.make_durable(dsn)  # acknowledged commits must survive the crash
    s = steady_saga()
    await orchestrator(s, concurrency=8)
    runs = [await s.start(Job(n=i)) for i in range(30)]
    await wait_for_completed(dsn, 3)
    await pg_server.crash_restart()
    for run in runs:
        assert await run.result(timeout=90) == "c"
    await assert_each_step_completed_once(dsn, runs)


@pytest.mark.parametrize(
    "raised",
    [
        asyncpg.exceptions.ConnectionDoesNotExistError("gone"),
        asyncpg.exceptions.UniqueViolationError("duplicate"),
        asyncpg.InterfaceError("closed"),
        ConnectionResetError("reset"),
    ],
)
async def test_driver_errors_become_database_errors_with_their_cause(raised: Exception) -> None:
    """Whether entered with ``with`` or ``async with``, a driver or connection error
    inside ``translate_errors`` becomes a ``saga.DatabaseError`` naming what failed, with
    the driver's error as its cause; anything else (a bug, a cancellation) goes through
    as it is. (Private: the store's error translation.)"""
    from saga._db import translate_errors

    failed = pytest.raises(saga.DatabaseError, match="recording a transition failed")
    with failed as caught, translate_errors("recording a transition"):
        raise raised
    assert caught.value.__cause__ is raised
    with pytest.raises(saga.DatabaseError, match="claiming work failed") as caught:
        async with translate_errors("claiming work"):
            raise raised
    assert caught.value.__cause__ is raised
    with pytest.raises(KeyError), translate_errors("anything"):
        raise KeyError("a bug")
    with anyio.CancelScope() as scope:
        async with translate_errors("anything"):
            scope.cancel()
            await anyio.sleep(1)
    assert scope.cancelled_caught

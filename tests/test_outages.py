"""Dropped connections and a PostgreSQL restart in the middle of work lose nothing."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

import anyio
import asyncpg
import pytest
from pydantic import BaseModel

import saga
from tests.conftest import OrchestratorFactory


class Job(BaseModel):
    n: int


def steady_saga(executions: list[tuple[str, str]]) -> saga.Saga[Job]:
    s = saga.Saga("steady", input=Job)
    for name in ("a", "b", "c"):

        async def step(ctx: saga.Context[Job]) -> str:
            executions.append((str(ctx.run_id), ctx.step))
            await anyio.sleep(0.03)
            return ctx.step

        s.step(name=name, retry=saga.Retry(max_attempts=5, initial_delay=0.05))(step)
    return s


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
    executions: list[tuple[str, str]] = []
    s = steady_saga(executions)
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
    orchestrator: OrchestratorFactory, dsn: str
) -> None:
    """`pg_ctl restart -m immediate` (a crash) while runs are in flight: the orchestrator
    rides through the outage, and every run started before it completes exactly once."""
    pg_ctl, pgdata = os.environ.get("SAGA_TEST_PGCTL"), os.environ.get("SAGA_TEST_PGDATA")
    if not (pg_ctl and pgdata):
        pytest.skip("needs the server control of scripts/test.sh (SAGA_TEST_PGCTL/PGDATA)")
    database = urlsplit(dsn).path.lstrip("/")
    conn = await asyncpg.connect(dsn)
    try:  # acknowledged commits must survive the crash (the test cluster defaults to off)
        await conn.execute(f"ALTER DATABASE {database} SET synchronous_commit = on")
    finally:
        await conn.close()
    executions: list[tuple[str, str]] = []
    s = steady_saga(executions)
    await orchestrator(s, concurrency=8)
    runs = [await s.start(Job(n=i)) for i in range(30)]
    await wait_for_completed(dsn, 3)
    # -l: without a log file the new postmaster would hold our pipes open forever.
    log = os.path.join(os.path.dirname(pgdata), "restart.log")
    result = await anyio.run_process(
        [pg_ctl, "-D", pgdata, "-m", "immediate", "-w", "-t", "60", "-l", log, "restart"],
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    for run in runs:
        assert await run.result(timeout=90) == "c"
    await assert_each_step_completed_once(dsn, runs)

"""The history's ``rate_limited`` event is written like every write of an attempt: only
by the worker that still holds the attempt's lease (the run's, or a parallel step's)."""

from __future__ import annotations

import anyio
import asyncpg
import pytest

import saga
from tests._sagas import Job
from tests.conftest import OrchestratorFactory


def _paced(graph: bool) -> saga.Saga[Job]:
    gate = saga.RateLimit("gate", per_second=0.5, burst=1)
    s = saga.Saga("fenced_gate", input=Job)

    @s.step()
    async def book(ctx: saga.Context[Job]) -> int:
        return 1

    @s.step(rate_limit=gate, after=[book] if graph else None)
    async def call(ctx: saga.Context[Job]) -> int:
        return 2

    if graph:  # a fork after book: the steps run as items of a graph run

        @s.step(after=[book])
        async def side(ctx: saga.Context[Job]) -> int:
            return 3

    return s


@pytest.mark.timeout(60)
@pytest.mark.parametrize("graph", [False, True], ids=["linear", "parallel steps"])
async def test_a_worker_that_lost_its_lease_records_no_rate_limit_delay(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection, dsn: str, graph: bool
) -> None:
    """README: a delay is "in its run's history (rate_limited)", and DESIGN: every write
    of an attempt is fenced by its lease. A worker whose attempt waits on the bucket's
    row while its lease passes to another worker (here the lease is moved by hand, as a
    claim after an expiry would) writes no ``rate_limited`` event once it gets its
    token. Before, the event was written unfenced, for an attempt of a worker that no
    longer held the run."""
    s = _paced(graph)
    # The bucket is empty: the next token is 2 s away, so the attempt records a delay.
    await db.execute(
        "INSERT INTO saga.rate_limits (name, tokens, updated_at, per_second, burst)"
        " VALUES ('gate', 0, clock_timestamp(), 0.5, 1)"
    )
    holder = await asyncpg.connect(dsn)
    try:
        lock = holder.transaction()
        await lock.start()
        await holder.execute("SELECT FROM saga.rate_limits WHERE name = 'gate' FOR UPDATE")
        orch = await orchestrator(s, lease_seconds=30)
        run = await orch.start(s, Job(n=1))
        # The attempt of `call` is leased and blocked on the bucket's row.
        with anyio.fail_after(10):
            while not await db.fetchval(  # noqa: ASYNC110
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
                " WHERE NOT l.granted AND a.query LIKE '%rate_limits%'"
            ):
                await anyio.sleep(0.02)
        where = "items WHERE run_id = $1 AND step = 'call'" if graph else "runs WHERE id = $1"
        table, rows = where.split(" WHERE ")
        moved = await db.execute(
            f"UPDATE saga.{table} SET lease_token = lease_token + 1,"
            f" lease_owner = 'another-worker' WHERE {rows}",
            run.id,
        )
        assert moved.endswith(" 1")
        await lock.rollback()  # the worker takes its token, 2 s away
        with anyio.fail_after(10):
            while await db.fetchval(  # noqa: ASYNC110
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
                " AND (query LIKE '%rate_take%' OR query LIKE '%rate_limited%'"
                " OR query LIKE '%INSERT INTO saga.rate_limits AS b%')"
                " AND pid <> pg_backend_pid()"
            ):
                await anyio.sleep(0.02)
        await anyio.sleep(0.5)  # (the unfenced write came within milliseconds)
        taken = await db.fetchval("SELECT tokens FROM saga.rate_limits WHERE name = 'gate'")
        assert taken < 0  # the worker did take its token, in debt
        limited = await db.fetchval(
            "SELECT count(*) FROM saga.events WHERE run_id = $1 AND kind = 'rate_limited'",
            run.id,
        )
        assert limited == 0
    finally:
        await holder.close()

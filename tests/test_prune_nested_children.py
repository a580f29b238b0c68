"""A whole-days prune takes a chain of nested child runs of one old day however deep it
goes: every run of it goes with its parent, in the same day's transaction."""

from __future__ import annotations

import itertools
import uuid
from datetime import date, timedelta

import anyio
import asyncpg
import pytest

import saga
from tests._sagas import Job, small_saga
from tests.conftest import OrchestratorFactory
from tests.test_partitions import _backdate, _past_day, _tables_of

pytestmark = pytest.mark.timeout(120)


async def _old_chain(
    orch: saga.Orchestrator,
    quick: saga.Saga[Job],
    db: asyncpg.Connection,
    dsn: str,
    depth: int,
    days: int = 40,
) -> tuple[date, list[uuid.UUID]]:
    """``depth`` finished runs of one old day, each the child run of the one before."""
    runs = [await orch.start(quick, Job(n=i)) for i in range(depth)]
    for run in runs:
        await run.result(timeout=20)
    day = await _past_day(dsn, days)
    ids = [await _backdate(db, run.id, days) for run in runs]
    for parent, child in itertools.pairwise(ids):
        await db.execute(
            "UPDATE saga.runs SET parent_id = $2, parent_step = 's1' WHERE id = $1", child, parent
        )
    return day, ids


@pytest.mark.parametrize("depth", [2, 5, 6])
async def test_a_whole_day_of_nested_children_all_finished_long_ago_is_dropped(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection, dsn: str, depth: int
) -> None:
    """README, Retention: "`saga prune` (and `saga.prune`) drops a day when all its runs
    finished more than `--older-than` ago in a pruned status ... four `DROP TABLE`s in
    one short transaction", and runs stay only when they must ("still active, failed and
    waiting for an operator, finished too recently, a child saga's run whose parent
    stays"); "A child saga's run goes only with its parent (in the same day's
    transaction)".

    One old day holding a chain of nested child sagas (top -> c1 -> c2 -> ...), every run
    completed 40 days ago: the dry run counts every run, the prune drops the day. Before,
    a run was taken with its parent only three generations down: from 5 deep, the runs
    below stayed, and the day was copied rather than dropped."""
    quick = small_saga("nested", 1)
    orch = await orchestrator(quick)
    day, ids = await _old_chain(orch, quick, db, dsn, depth)

    with anyio.fail_after(60):
        dry = await saga.prune(orch, older_than=timedelta(days=30), whole_days=True, dry_run=True)
        done = await saga.prune(orch, older_than=timedelta(days=30), whole_days=True)

    left = await db.fetchval("SELECT count(*) FROM saga.runs WHERE id = ANY($1)", ids)
    assert (dry.runs, done.runs, done.days, left) == (depth, depth, 1, 0)
    assert await _tables_of(db, day) == set()  # dropped, not compacted


async def test_whole_days_prunes_never_take_a_day_of_deeply_nested_finished_children(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection, dsn: str
) -> None:
    """README, Retention: "A prune on a daily schedule shortly after midnight UTC with
    `--whole-days` keeps a window of `older-than` plus at most a day, for the days where
    at least half of the runs can go"; "A child saga's run goes only with its parent (in
    the same day's transaction) or once its parent is gone".

    One old day holding a chain of 9 nested child sagas, all completed 40 days ago: every
    run of the day can go, and three daily prunes remove them all. Before, a prune
    counted only the top four as going (it looked three generations up), found fewer
    than half, and left the day, every day: it was never removed."""
    quick = small_saga("nested", 1)
    orch = await orchestrator(quick)
    day, ids = await _old_chain(orch, quick, db, dsn, 9)

    removed = 0
    with anyio.fail_after(60):
        for _ in range(3):  # three daily prunes
            removed += (await saga.prune(orch, older_than=timedelta(days=30), whole_days=True)).runs

    left = await db.fetchval("SELECT count(*) FROM saga.runs WHERE id = ANY($1)", ids)
    assert (removed, left) == (9, 0)
    assert await _tables_of(db, day) == set()


async def _deep_old_chain(
    orch: saga.Orchestrator, quick: saga.Saga[Job], db: asyncpg.Connection, dsn: str, depth: int
) -> date:
    """``depth`` completed runs of one day 40 days back, each the child run of the one
    before (cloned in SQL from one real run: same day, ids with that day's time bits)."""
    run = await orch.start(quick, Job(n=0))
    await run.result(timeout=20)
    day = await _past_day(dsn, 40)
    top = await _backdate(db, run.id, 40)
    await db.execute(
        """
        WITH a AS (SELECT array_agg((substr($1::uuid::text, 1, 14)
                                     || substr(gen_random_uuid()::text, 15))::uuid) AS ids
                   FROM generate_series(1, $2::int))
        INSERT INTO saga.runs
        SELECT (jsonb_populate_record(r, jsonb_build_object(
                   'id', a.ids[i], 'idempotency_key', null,
                   'parent_id', CASE WHEN i = 1 THEN $1::uuid ELSE a.ids[i - 1] END,
                   'parent_step', 's1'))).*
        FROM saga.runs r, a, generate_series(1, $2::int) i WHERE r.id = $1::uuid
        """,
        top,
        depth - 1,
    )
    return day


@pytest.mark.parametrize("depth", [2000])
async def test_a_chain_thousands_deep_goes_in_one_whole_days_prune(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection, dsn: str, depth: int
) -> None:
    """README (Retention): a whole-days prune drops a day whatever it held. A day 40
    days back holding a chain of 2,000 completed runs, each the child of the one before
    (a saga continuing itself as a child, say): the dry run counts them all and the
    prune drops the day, well within the test's minute. Before, each run walked its
    ancestry (from inside a per-row EXISTS): at 1,000 deep the dry run had not ended
    after 120 s, so the day was never pruned."""
    quick = small_saga("deep", 1)
    orch = await orchestrator(quick)
    day = await _deep_old_chain(orch, quick, db, dsn, depth)
    with anyio.fail_after(60):
        dry = await saga.prune(orch, older_than=timedelta(days=30), whole_days=True, dry_run=True)
        done = await saga.prune(orch, older_than=timedelta(days=30), whole_days=True)
    assert (dry.runs, dry.days) == (depth, 1)
    assert (done.runs, done.days) == (depth, 1)
    assert await _tables_of(db, day) == set()

"""Retention and paging under a live system: a cursor pruned while its page is read, and
whole days dropped while workers run (README "Operator API", "Retention")."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import anyio
import asyncpg
import pytest

import saga
from saga._client import store_of
from tests._sagas import Job, small_saga
from tests.conftest import ClientFactory, OrchestratorFactory
from tests.test_partitions import _past_day

# Finished runs of saga "checkout", one every 0.01 s back from now (UUIDv7 ids of their
# start, as saga makes them, so each lands in its day's partition); $1 how many.
_FILL = """
INSERT INTO saga.runs (id, saga_name, saga_version, status, input,
                       created_at, updated_at, finished_at)
SELECT (lpad(to_hex((extract(epoch FROM now() - g * interval '0.01 s') * 1000)::bigint),
             12, '0') || '7' || substr(md5(g::text), 1, 3) || '8'
        || substr(md5(g::text), 4, 15))::uuid,
       'checkout', 1, __status__, '{}', now() - g * interval '0.01 s',
       now() - g * interval '0.01 s', now() - g * interval '0.01 s'
FROM generate_series(1, $1::integer) AS g
"""


def _fill(status_sql: str = "'completed'", days_back: int = 0) -> str:
    sql = _FILL.replace("__status__", status_sql)
    if days_back:
        sql = sql.replace("now() -", f"now() - interval '{days_back} days' -")
    return sql


def _today() -> date:
    return datetime.now(UTC).date()


@pytest.mark.timeout(60)
async def test_count_matching_keeps_paging_when_its_cursor_is_pruned_during_the_page(
    open_client: ClientFactory, db: asyncpg.Connection
) -> None:
    """README (Operator API, cancel_runs/retry_runs, count_matching): "A run pruned
    between two of its pages is left out; the paging goes on."

    1,500 finished runs: count_matching reads them in pages of 1,000. The run the second
    page starts from is pruned just before the page's statement runs (a prune batch
    committing at that moment: simulated by deleting its row then): the count goes on
    past it, to the 1,499 runs left."""
    await db.execute(_fill(), 1500)
    client = await open_client()
    store = store_of(client)
    real = store.list_runs

    pruned: list[uuid.UUID] = []

    async def pruned_then_listed(**kwargs: Any) -> list[saga.RunInfo]:
        before = kwargs["before"]
        if before is not None and not pruned:  # the first cursor goes, as its page is read
            pruned.append(before.id)
            await db.execute("DELETE FROM saga.runs WHERE id = $1", before.id)
        return await real(**kwargs)

    store.list_runs = pruned_then_listed  # type: ignore[method-assign]
    with anyio.fail_after(30):
        count = await saga.count_matching(client)
    assert pruned
    assert count == 1499


@pytest.mark.timeout(120)
async def test_whole_days_are_dropped_while_workers_run(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection, dsn: str
) -> None:
    """README (Retention): "`saga prune` (and `saga.prune`) drops a day when all its runs
    finished more than `--older-than` ago in a pruned status: four `DROP TABLE`s in one
    short transaction ... in seconds whatever the day held" and "A prune on a daily
    schedule shortly after midnight UTC with `--whole-days` keeps a window of
    `older-than` plus at most a day".

    Two days 40 and 41 days back hold 3,000 completed runs each (nothing to keep). One
    orchestrator executes a steady trickle of short runs (a start every few ms,
    concurrency 32); three successive ``prune(older_than=30d, whole_days=True)`` under
    that load drop both days, and every run of the trickle completes."""
    quick = small_saga("quick", 3)
    for back in (40, 41):
        await _past_day(dsn, back)
        await db.execute(_fill(days_back=back), 3000)
    orch = await orchestrator(quick, concurrency=32)
    runs: list[saga.RunHandle] = []
    stop = anyio.Event()
    results: list[saga.PruneResult] = []

    async def load() -> None:
        while not stop.is_set():
            runs.append(await orch.start(quick, Job(n=len(runs))))
            await anyio.sleep(0.002)

    with anyio.fail_after(90):
        async with anyio.create_task_group() as tg:
            tg.start_soon(load)
            await anyio.sleep(0.5)
            for _ in range(3):  # "left for the next prune": three prunes in a row
                results.append(
                    await saga.prune(orch, older_than=timedelta(days=30), whole_days=True)
                )
            stop.set()
        for run in runs:
            await run.result(timeout=30)
    dropped = sum(r.days for r in results)
    left = await db.fetchval(
        "SELECT count(*) FROM saga.runs WHERE created_at < now() - interval '30 days'"
    )
    assert dropped == 2, results
    assert left == 0

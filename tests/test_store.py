"""Schema migrations and schema isolation on a real PostgreSQL."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

import anyio
import asyncpg
import pytest

import saga
from saga import _partitions as partitions
from saga._partitions import partition, uuid7
from saga._store import Store
from saga._store_batch import batch_args
from tests._sagas import Job, small_saga

# The due index of a day's partition of runs (or of the DEFAULT partition's).
_DUE_INDEX = re.compile(r"Index Scan using runs_(p\d{8}_due_at_idx|default_due) on runs_")


async def test_concurrent_migrations_apply_each_version_once(dsn: str) -> None:
    """Four processes' worth of migrators racing on a new schema all succeed, and every
    migration is recorded exactly once."""
    pools = [await asyncpg.create_pool(dsn, min_size=1, max_size=1) for _ in range(4)]
    applied: list[list[int]] = []
    try:
        expected = await saga.migrate(pools[0], schema="reference")  # every migration, alone
        assert expected == list(range(1, len(expected) + 1))

        async def migrate(pool: asyncpg.Pool) -> None:
            applied.append(await saga.migrate(pool, schema="racing"))

        async with anyio.create_task_group() as tg:
            for pool in pools:
                tg.start_soon(migrate, pool)
        assert sorted(v for versions in applied for v in versions) == expected
        recorded = await pools[0].fetch("SELECT version FROM racing.migrations ORDER BY 1")
        assert [r["version"] for r in recorded] == expected
        assert await saga.migrate(pools[0], schema="racing") == []
    finally:
        for pool in pools:
            await pool.close()


async def test_schemas_isolate_orchestrators(dsn: str) -> None:
    """Runs started in one schema are invisible to an orchestrator on another."""
    iso = small_saga("iso")
    async with saga.Orchestrator(dsn, sagas=[iso], schema="tenant_a", concurrency=0) as a:
        run = await a.start(iso, Job(n=1))
    other = small_saga("iso")
    async with saga.Orchestrator(dsn, sagas=[other], schema="tenant_b", concurrency=0) as b:
        with pytest.raises(saga.RunNotFoundError):
            await b.get_run(run.id).status()
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM tenant_a.runs") == 1
        assert await conn.fetchval("SELECT count(*) FROM tenant_b.runs") == 0
    finally:
        await conn.close()


async def test_claim_query_uses_the_due_index(pool: asyncpg.Pool, store: Store) -> None:
    """The real claim statement reads the partial index on due_at, so finished runs (not
    in that index) cost the claim path nothing. (Private: the store's claim statement and
    its plan are what this checks.)"""
    async with pool.acquire() as conn:
        await conn.execute("SET enable_seqscan = off")
        rows = await conn.fetch(
            "EXPLAIN " + store._q["claim"],
            "w",
            10,
            30.0,
            ["s"],
            [1],
            ["-"],
            *store._claim_table,
        )
    plan = "\n".join(r[0] for r in rows)
    assert _DUE_INDEX.search(plan), plan
    assert "Seq Scan on runs" not in plan, plan


async def test_a_burst_of_starts_gets_the_claim_fresh_statistics(
    dsn: str, db: asyncpg.Connection
) -> None:
    """After a burst of 2,000 starts into a new runs table, an executing orchestrator
    gathers the table's statistics at once (it does not wait a minute or more for
    autovacuum), so the claim reads the due index instead of sorting every due run.
    Autovacuum is off for the runs' partitions: its analyze, had it come first (it visits
    each database once a minute), would leave saga nothing to gather."""
    burst = small_saga("burst")
    async with saga.Orchestrator(dsn, sagas=[burst], concurrency=0) as starter:
        partitions = await db.fetch(
            "SELECT inhrelid::regclass::text AS name FROM pg_inherits "
            "WHERE inhparent = 'saga.runs'::regclass"
        )
        for p in partitions:
            await db.execute(f"ALTER TABLE {p['name']} SET (autovacuum_enabled = false)")
        await _start_many(starter, burst, 2000)
    stats = (
        "SELECT max(s.last_analyze) FROM pg_stat_user_tables s "
        "JOIN pg_inherits i ON i.inhrelid = s.relid WHERE i.inhparent = 'saga.runs'::regclass"
    )
    assert await db.fetchval(stats) is None
    async with saga.Orchestrator(dsn, sagas=[burst], concurrency=1, census_interval=0.5):
        with anyio.fail_after(15):
            while True:  # polled: the statistics' view is the only witness
                if await db.fetchval(stats) is not None:
                    break
                await anyio.sleep(0.1)


async def _start_many(starter: Any, definition: Any, runs: int) -> None:
    """Start ``runs`` runs of ``definition`` (inputs 0..runs-1), 100 at a time from each
    of runs / 100 concurrent tasks."""
    async with anyio.create_task_group() as tg:
        for first in range(0, runs, 100):

            async def hundred(first: int = first) -> None:
                for n in range(first, first + 100):
                    await starter.start(definition, Job(n=n))

            tg.start_soon(hundred)


async def _due_runs(orchestrator: Any, db: asyncpg.Connection, name: str, **options: Any) -> Any:
    """A new saga ``name`` (``small_saga`` options) with 3,000 runs due that nobody
    executes, and the statistics of the runs and items tables gathered."""
    due = small_saga(name, **options)
    starter = await orchestrator(due, concurrency=0)
    await _start_many(starter, due, 3000)
    await db.execute("ANALYZE saga.runs, saga.items")
    return due


@pytest.mark.parametrize("statement", ["claim", "claim_prioritized"])
async def test_the_claim_reads_the_due_index_with_real_statistics(
    orchestrator: Any, store: Store, db: asyncpg.Connection, statement: str
) -> None:
    """With 3,000 due runs and current statistics, claiming 60 reads the due index in
    due order: the planner is not misled into sorting every due run (it was, when the
    registered-definitions filter was an IN over unnest(), estimated at 1 % of rows).
    (Private: the store's claim statements and their plans.)"""
    due = await _due_runs(orchestrator, db, "due")
    rows = await db.fetch(
        "EXPLAIN " + store._q[statement],
        "w",
        60,
        30.0,
        [due.name],
        [due.version],
        [due.fingerprint],
        *store._claim_table,
    )
    plan = "\n".join(r[0] for r in rows)
    picking = plan[: plan.index("CTE closing")]  # the CTEs that choose the runs
    assert _DUE_INDEX.search(picking), plan
    # (the empty partitions of the coming days may be read whole: they are empty)
    today = partition("runs", datetime.now(UTC).date())
    assert f"Seq Scan on {today}" not in picking, plan
    # Due order comes from a Merge Append of the partitions' index scans, not a sort
    # (the prioritized claim sorts what its urgent index holds: nothing here).
    normal = picking[picking.index("CTE normal") :] if "CTE normal" in picking else picking
    assert "->  Sort" not in normal, plan


def _literal(value: Any) -> str:
    """An SQL literal of a statement argument (an array as an untyped '{...}' literal,
    which EXECUTE coerces to the prepared statement's parameter type)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        items = ("NULL" if v is None else '"' + str(v).replace('"', '\\"') + '"' for v in value)
        return "'{" + ",".join(items).replace("'", "''") + "}'"
    return "'" + str(value).replace("'", "''") + "'"


@pytest.mark.parametrize("statement", ["claim", "claim_prioritized", "transition_claim"])
async def test_the_claim_updates_its_runs_through_the_primary_key_in_a_generic_plan(
    orchestrator: Any, store: Store, db: asyncpg.Connection, statement: str
) -> None:
    """With 3,000 due runs in today's partition and current statistics, the generic plan
    of a claim (the one an orchestrator's leasing pool runs) updates the runs it chose
    through each partition's primary key: it never reads today's partition whole.
    (Generic plans guess a LIMIT parameter at a tenth of the due runs, and a join of
    that many candidates against every partition's primary key then looked dearer than
    reading the day whole: 3 of a drain's 5 ms per claim, growing with the day.)
    (Private: the store's claim statements and their plans.)"""
    due = await _due_runs(orchestrator, db, "generic")
    args: list[Any] = ["w", 60, 30.0, [due.name], [due.version], [due.fingerprint]]
    args += store._claim_table
    if statement == "transition_claim":  # an empty batch of transitions beside it
        args += [[]] * 16 + ["saga_done", None, None, False]
    await db.execute("SET plan_cache_mode = force_generic_plan")
    await db.execute(f"PREPARE generic_claim AS {store._q[statement]}")
    rows = await db.fetch(f"EXPLAIN EXECUTE generic_claim({', '.join(_literal(a) for a in args)})")
    plan = "\n".join(r[0] for r in rows)
    generic = "SELECT generic_plans FROM pg_prepared_statements WHERE name = 'generic_claim'"
    assert await db.fetchval(generic) == 1
    today = partition("runs", datetime.now(UTC).date())
    assert f"Seq Scan on {today}" not in plan, plan
    assert f"{today}_pkey on {today}" in plan, plan


async def test_a_batch_of_transitions_opens_only_its_days_partitions(
    pool: asyncpg.Pool, store: Store, db: asyncpg.Connection
) -> None:
    """With 30 past days kept for retention, the generic plan of a batch of transitions
    (the one an orchestrator's leasing pool runs) drops every day but the batch's own
    before it opens anything: its first and last run id are parameters. (Opening every
    day's partition at every execution made a batch's fixed cost grow with retention:
    0.76 ms at 4 partitions, 1.66 ms at 34.) (Private: the store's statement and its
    plan.)"""
    today = datetime.now(UTC).date()
    for back in range(1, 31):
        assert await partitions._create_day(pool, "saga", today - timedelta(days=back))
    days = await db.fetchval(
        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'saga.runs'::regclass"
    )
    run = uuid7()
    args = batch_args(
        [
            (
                run,
                1,
                "running",
                "s2",
                1,
                "s1",
                "1",
                None,
                None,
                None,
                30.0,
                "w",
                "[]",
                "d",
                "w",
                False,
                None,
            )
        ],
        False,
    )
    await db.execute("SET plan_cache_mode = force_generic_plan")
    await db.execute(f"PREPARE generic_batch AS {store._q['transition_batch']}")
    literals = ", ".join(_literal(a) for a in args)
    async with db.transaction():
        rows = await db.fetch(f"EXPLAIN (ANALYZE, COSTS OFF) EXECUTE generic_batch({literals})")
    plan = "\n".join(r[0] for r in rows)
    generic = "SELECT generic_plans FROM pg_prepared_statements WHERE name = 'generic_batch'"
    assert await db.fetchval(generic) == 1
    assert f"Subplans Removed: {days - 1}" in plan, plan
    assert partition("runs", today) in plan, plan


def _on_one_run() -> list[str]:
    """The statements whose first parameter is one run's id (their header says so)."""
    names, name = [], ""
    for line in (resources.files("saga") / "sql" / "queries.sql").read_text().splitlines():
        if line.startswith("-- name: "):
            name = line.removeprefix("-- name: ").strip()
        elif re.match(r"-- \$1 run id(,|$)", line):
            names.append(name)
    return names


#: A value of each parameter type, as an SQL literal (the plans are not executed).
_DUMMY = {
    "uuid": "'{run}'",
    "text": "'x'",
    "text[]": "'{{}}'",
    "uuid[]": "'{{}}'",
    "integer": "1",
    "bigint": "1",
    "double precision": "1",
    "double precision[]": "'{{}}'",
    "boolean": "false",
    "jsonb": "'{{}}'",
    "timestamp with time zone": "now()",
}
#: A plan's scans of the partitions of runs and of their tables: (index or None, day).
_SCANNED = re.compile(
    r"Scan (?:using (\S+) )?on (?:runs|events|watches|signals)_(p\d{8}|default)\b"
)


@pytest.mark.parametrize("name", _on_one_run())
async def test_a_statement_on_one_run_opens_only_its_days_partitions(
    pool: asyncpg.Pool, store: Store, db: asyncpg.Connection, name: str
) -> None:
    """With 30 past days kept for retention, the generic plan of every statement on one
    given run (a result's reads, its history, a signal, an operator's action, a graph
    item's write...) reads the run's own day alone (a start also looks its key up in
    every day): Postgres drops the other days before it opens anything. Its partitioned
    tables are reached through the run id itself, never only through a join with an
    earlier part of the statement, which Postgres cannot narrow to a day (a signal once
    scanned every day's watches that way). (Private: the store's statements, plans.)"""
    today = datetime.now(UTC).date()
    for back in range(1, 31):
        assert await partitions._create_day(pool, "saga", today - timedelta(days=back))
    await db.execute("SET plan_cache_mode = force_generic_plan")
    await db.execute(f"PREPARE one_run AS {store._q[name]}")
    types = await db.fetchval(
        "SELECT parameter_types::text[] FROM pg_prepared_statements WHERE name = 'one_run'"
    )
    literals = ", ".join(_DUMMY[t].format(run=uuid7()) for t in types)
    plan = "\n".join(r[0] for r in await db.fetch(f"EXPLAIN EXECUTE one_run({literals})"))
    generic = "SELECT generic_plans FROM pg_prepared_statements WHERE name = 'one_run'"
    assert await db.fetchval(generic) == 1
    # (an idempotency key is unique across days: its lookup reads every day's key index)
    days = {day for index, day in _SCANNED.findall(plan) if "idempotency" not in index}
    assert days <= {partition("runs", today).removeprefix("runs_")}, plan


async def test_the_claim_of_graph_items_updates_them_through_the_primary_key(
    orchestrator: Any, store: Store, db: asyncpg.Connection
) -> None:
    """With 3,000 due items of graph runs and current statistics, the generic plan of
    the items' claim (the one an orchestrator's leasing pool runs) updates the items it
    chose through the primary key: it never reads the items table whole. (It hashed
    every item of every run in flight: 0.85 of a drain's 2 ms per claim, growing with
    the runs in flight.) (Private: the store's statement and its plan.)"""
    fan = await _due_runs(
        orchestrator, db, "generic_items", steps=["a", "b", "c"], after={"b": ["a"], "c": ["a"]}
    )
    args: list[Any] = ["w", 60, 30.0, [fan.name], [fan.version], [fan.fingerprint]]
    await db.execute("SET plan_cache_mode = force_generic_plan")
    await db.execute(f"PREPARE generic_items AS {store._q['claim_items']}")
    literals = ", ".join(_literal(a) for a in args)
    rows = await db.fetch(f"EXPLAIN (COSTS OFF) EXECUTE generic_items({literals})")
    plan = "\n".join(r[0] for r in rows)
    generic = "SELECT generic_plans FROM pg_prepared_statements WHERE name = 'generic_items'"
    assert await db.fetchval(generic) == 1
    assert "Seq Scan on items" not in plan, plan
    assert "Index Scan using items_pkey on items" in plan, plan


#: How a statement starts (after blanks): what no string of saga's Python code may be.
_STATEMENT = re.compile(
    r"\s*(SELECT|INSERT|UPDATE|DELETE|WITH|CREATE|ALTER|DROP|LOCK|ANALYZE|SET|LISTEN|"
    r"UNLISTEN|NOTIFY|TRUNCATE|VACUUM|COPY|BEGIN|COMMIT|EXPLAIN)\s"
)


def test_all_sql_lives_in_the_sql_files() -> None:
    """DESIGN: all SQL is in one place, named queries in a .sql file. No string of the
    package's Python code (an f-string's pieces included) starts a statement; the one
    place queries are put together from the file's pieces is saga/_db.py, which splices
    named queries, not statements of its own."""
    import ast
    from pathlib import Path

    package = Path(saga.__file__).parent
    found = []
    for path in sorted(set(package.rglob("*.py")) - {package / "_db.py"}):
        tree = ast.parse(path.read_text("utf-8"))
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
        }
        found += [
            f"{path.relative_to(package)}:{node.lineno}: {node.value[:40]}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
            and _STATEMENT.match(node.value)
        ]
    assert found == []

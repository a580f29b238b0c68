"""Day partitions of runs and their history: run ids are UUIDv7, each UTC day's runs,
events, watches and signals live in that day's partitions, prune drops or compacts whole
days without deleting rows one by one, and migration 0009 moves an existing installation
over without a rewrite, its running sagas going on."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta

import anyio
import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

import saga
import saga._migrate
from saga import _partitions as partitions
from saga._db import migrations
from saga._partitions import day_of, day_start, partition, uuid7
from tests._sagas import Job, parked_saga, small_saga
from tests.conftest import ClientFactory, OrchestratorFactory

TABLES = [t for t, _ in partitions.TABLES]


def _today() -> date:
    return datetime.now(UTC).date()


@given(st.dates(min_value=date(1971, 1, 1), max_value=date(9999, 12, 30)))
def test_a_day_is_one_range_of_ids(day: date) -> None:
    """A day's bounds are the ids of its first millisecond: every id of that day falls
    in [day_start(day), day_start(next day)), and day_of() gives the day back."""
    lo, hi = day_start(day), day_start(day + timedelta(days=1))
    assert lo < hi
    assert day_of(lo) == day
    assert day_of(uuid.UUID(int=hi.int - 1)) == day


def test_run_ids_are_uuid7_and_time_ordered() -> None:
    """New run ids are RFC 9562 version 7 (variant 10), unique, and an id made a
    millisecond later sorts after it (so a range of ids is a range of start times)."""
    ids = [uuid7() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(i.version == 7 and i.variant == uuid.RFC_4122 for i in ids)
    assert day_of(ids[0]) == _today()
    first = uuid7()
    anyio.run(anyio.sleep, 0.002)
    assert uuid7() > first


async def _where(db: asyncpg.Connection, table: str, column: str, run_id: uuid.UUID) -> set[str]:
    rows = await db.fetch(
        f"SELECT DISTINCT tableoid::regclass::text AS t FROM saga.{table} WHERE {column} = $1",
        run_id,
    )
    return {r["t"] for r in rows}


async def test_a_run_and_its_history_live_in_its_days_partitions(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """A run started now is in today's partition of runs, and so are its events and its
    end mark; the coming days' partitions exist already."""
    quick = small_saga("quick", 2)
    orch = await orchestrator(quick)
    run = await orch.start(quick, Job(n=1))
    await run.result(timeout=20)
    today = _today()
    assert await _where(db, "runs", "id", run.id) == {"saga." + partition("runs", today)}
    assert await _where(db, "events", "run_id", run.id) == {"saga." + partition("events", today)}
    assert await _where(db, "watches", "run_id", run.id) == {"saga." + partition("watches", today)}
    have = await partitions.days(db, "saga")
    assert {today + timedelta(days=k) for k in range(partitions.DAYS_AHEAD + 1)} <= have


async def _backdate(db: asyncpg.Connection, run_id: uuid.UUID, days: int) -> uuid.UUID:
    """Move a run (its rows in the four tables) ``days`` back in time: a new id with the
    same random bits, started and finished that many days earlier. Returns the new id."""
    new = uuid.UUID(int=run_id.int - ((days * 86_400_000) << 80))
    async with db.transaction():
        await db.execute(
            "UPDATE saga.runs SET id = $2, created_at = created_at - make_interval(days => $3),"
            " finished_at = finished_at - make_interval(days => $3) WHERE id = $1",
            run_id,
            new,
            days,
        )
        for table in TABLES[1:]:
            await db.execute(f"UPDATE saga.{table} SET run_id = $2 WHERE run_id = $1", run_id, new)
    return new


async def _past_day(pool_dsn: str, days: int) -> date:
    day = _today() - timedelta(days=days)
    pool = await asyncpg.create_pool(pool_dsn, min_size=1, max_size=2)
    try:
        assert await partitions._create_day(pool, "saga", day)
    finally:
        await pool.close()
    return day


async def _tables_of(db: asyncpg.Connection, day: date) -> set[str]:
    names = [partition(t, day) for t in TABLES]
    rows = await db.fetch(
        "SELECT relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'saga' AND relname = ANY($1)",
        names,
    )
    return {r["relname"] for r in rows}


async def test_prune_drops_a_whole_day_without_deleting_rows(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection, dsn: str
) -> None:
    """A day whose runs all finished long ago goes as four dropped partitions: prune
    reports its runs and events and one day, no batch (a dry run with whole_days says
    the same and drops nothing); no row of another day is touched and no dead row is
    left anywhere (nothing for autovacuum to chase)."""
    quick = small_saga("quick", 2)
    orch = await orchestrator(quick)
    runs = [await orch.start(quick, Job(n=i)) for i in range(6)]
    for run in runs:
        await run.result(timeout=20)
    day = await _past_day(dsn, 40)
    old = [await _backdate(db, run.id, 40) for run in runs[:5]]
    kept = runs[5].id
    events = await db.fetchval("SELECT count(*) FROM saga.events WHERE run_id = ANY($1)", old)
    dead_before = await db.fetchval(
        "SELECT sum(n_tup_del) FROM pg_stat_user_tables WHERE schemaname = 'saga'"
    )

    dry = await saga.prune(orch, older_than=timedelta(days=30), whole_days=True, dry_run=True)
    assert (dry.runs, dry.events, dry.days, dry.dry_run) == (5, events, 1, True)
    assert await _tables_of(db, day) == {partition(t, day) for t in TABLES}

    result = await saga.prune(orch, older_than=timedelta(days=30), whole_days=True)

    assert (result.runs, result.events, result.days, result.batches) == (5, events, 1, 0)
    assert await _tables_of(db, day) == set()
    assert await db.fetchval("SELECT count(*) FROM saga.runs WHERE id = ANY($1)", old) == 0
    assert await db.fetchval("SELECT count(*) FROM saga.events WHERE run_id = ANY($1)", old) == 0
    assert (await orch.get_run(kept).info()).status is saga.RunStatus.COMPLETED
    await anyio.sleep(0.6)  # the statistics collector's flush interval (500 ms)
    dead_after = await db.fetchval(
        "SELECT sum(n_tup_del) FROM pg_stat_user_tables WHERE schemaname = 'saga'"
    )
    assert dead_after == dead_before  # not one row deleted


async def test_prune_compacts_a_day_keeping_its_active_and_failed_runs(
    orchestrator: OrchestratorFactory,
    open_client: ClientFactory,
    db: asyncpg.Connection,
    dsn: str,
) -> None:
    """A day where most runs can go but some must stay (a failed run waiting for an
    operator, a run still active) is replaced by a copy holding only those: they keep
    their history, their end marks and their signals, stay readable and usable, and the
    day's partitions (with the idempotency index) are still there for them."""
    quick = small_saga("quick", 2)
    orch = await orchestrator(quick)
    done = [await orch.start(quick, Job(n=i)) for i in range(6)]
    for run in done:
        await run.result(timeout=20)
    parked = parked_saga()
    client = await open_client(parked)
    active = await client.start(parked, Job(n=1), key="still-active")
    day = await _past_day(dsn, 40)
    gone = [await _backdate(db, r.id, 40) for r in done[:5]]
    failed = await _backdate(db, done[5].id, 40)
    await db.execute("UPDATE saga.runs SET status = 'failed' WHERE id = $1", failed)
    active_id = await _backdate(db, active.id, 40)
    await db.execute(
        "INSERT INTO saga.signals (run_id, name, payload) VALUES ($1, 'approve', '1')", active_id
    )
    kept_history = {
        run_id: [e.kind for e in await orch.get_run(run_id).history()]
        for run_id in (failed, active_id)
    }

    gone_events = await db.fetchval("SELECT count(*) FROM saga.events WHERE run_id = ANY($1)", gone)
    dry = await saga.prune(orch, older_than=timedelta(days=30), whole_days=True, dry_run=True)
    assert (dry.runs, dry.events, dry.days) == (5, gone_events, 1)

    result = await saga.prune(orch, older_than=timedelta(days=30), whole_days=True)

    assert (result.runs, result.events, result.days) == (5, gone_events, 1)
    assert await _tables_of(db, day) == {partition(t, day) for t in TABLES}
    left = {r["id"] for r in await db.fetch(f"SELECT id FROM saga.{partition('runs', day)}")}
    assert left == {failed, active_id}
    for run_id, kinds in kept_history.items():
        assert [e.kind for e in await orch.get_run(run_id).history()] == kinds
    assert await db.fetchval("SELECT payload FROM saga.signals WHERE run_id = $1", active_id) == "1"
    assert await db.fetchval("SELECT count(*) FROM saga.runs WHERE id = ANY($1)", gone) == 0
    # The kept keyed run still owns its key: starting it again finds it.
    again = await client.start(parked, Job(n=1), key="still-active")
    assert again.id == active_id


async def test_a_day_mostly_kept_is_left_to_the_row_by_row_pass(
    orchestrator: OrchestratorFactory, open_client: ClientFactory, db: asyncpg.Connection, dsn: str
) -> None:
    """When fewer than half of a day's runs can go, copying the rest would cost more than
    deleting: whole_days=True leaves the day alone (and its dry run counts nothing); the
    default prune deletes those runs row by row."""
    quick = small_saga("quick", 1)
    orch = await orchestrator(quick)
    done = await orch.start(quick, Job(n=1))
    await done.result(timeout=20)
    parked = parked_saga()
    client = await open_client(parked)
    actives = [await client.start(parked, Job(n=i)) for i in range(3)]
    await _past_day(dsn, 40)
    gone = await _backdate(db, done.id, 40)
    for run in actives:
        await _backdate(db, run.id, 40)

    counted = await saga.prune(orch, older_than=timedelta(days=30), whole_days=True, dry_run=True)
    assert (counted.runs, counted.events, counted.days) == (0, 0, 0)
    alone = await saga.prune(orch, older_than=timedelta(days=30), whole_days=True)
    assert (alone.runs, alone.days) == (0, 0)
    rows = await saga.prune(orch, older_than=timedelta(days=30))
    assert (rows.runs, rows.days, rows.batches) == (1, 0, 1)
    assert await db.fetchval("SELECT count(*) FROM saga.runs WHERE id = $1", gone) == 0
    assert await db.fetchval("SELECT count(*) FROM saga.runs") == 3


async def test_an_idempotency_key_holds_across_days(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection, dsn: str
) -> None:
    """A key used by a run of an earlier day (another partition, which no unique index
    spans) still returns that run; concurrent starts with one new key make one run."""
    quick = small_saga("quick", 1)
    orch = await orchestrator(quick)
    first = await orch.start(quick, Job(n=1), key="order-1")
    await first.result(timeout=20)
    await _past_day(dsn, 3)
    old = await _backdate(db, first.id, 3)

    again = await orch.start(quick, Job(n=1), key="order-1")
    assert again.id == old
    with pytest.raises(saga.IdempotencyConflictError):
        await orch.start(quick, Job(n=2), key="order-1")

    ids: list[uuid.UUID] = []

    async def start() -> None:
        ids.append((await orch.start(quick, Job(n=9), key="order-2")).id)

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(start)
    assert len(set(ids)) == 1
    assert (
        await db.fetchval("SELECT count(*) FROM saga.runs WHERE idempotency_key = 'order-2'") == 1
    )


async def test_creating_a_day_moves_its_rows_out_of_the_default_partition(
    db: asyncpg.Connection, dsn: str, orchestrator: OrchestratorFactory
) -> None:
    """Runs whose day had no partition yet land in the DEFAULT partition; creating that
    day's partitions moves them (and their history) over, and they still run."""
    parked = parked_saga()
    orch = await orchestrator(parked, concurrency=0)
    run = await orch.start(parked, Job(n=1))
    far = _today() + timedelta(days=30)
    moved = uuid.UUID(int=run.id.int + (((far - _today()).days * 86_400_000) << 80))
    async with db.transaction():
        await db.execute("UPDATE saga.runs SET id = $2 WHERE id = $1", run.id, moved)
        for table in TABLES[1:]:
            await db.execute(
                f"UPDATE saga.{table} SET run_id = $2 WHERE run_id = $1", run.id, moved
            )
    assert await _where(db, "runs", "id", moved) == {"saga.runs_default"}

    await _past_day(dsn, -30)

    assert await _where(db, "runs", "id", moved) == {"saga." + partition("runs", far)}
    assert await _where(db, "events", "run_id", moved) == {"saga." + partition("events", far)}
    assert await db.fetchval("SELECT count(*) FROM saga.runs_default") == 0
    assert (await orch.get_run(moved).info()).status is saga.RunStatus.PENDING


async def test_migration_0009_keeps_an_installation_running(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An installation at migration 0008 with a run in flight (random id) migrates
    without a rewrite (its rows become the DEFAULT partitions): the run completes after
    the migration, its history goes on in order, and a new run lands in today's
    partition."""
    with monkeypatch.context() as patch:
        patch.setattr(saga._migrate, "migrations", lambda: migrations()[:8])
        assert await saga.migrate(dsn, schema="legacy") == list(range(1, 9))
    conn = await asyncpg.connect(dsn)
    try:
        quick = small_saga("quick", 3)
        old_id = uuid.uuid4()
        await conn.execute(
            "INSERT INTO legacy.runs (id, saga_name, saga_version, input, step_name, due_at,"
            " fingerprint) VALUES ($1, 'quick', 1, '{\"n\": 1}', 's1', now(), $2)",
            old_id,
            quick.fingerprint,
        )
        await conn.execute(
            "INSERT INTO legacy.events (run_id, kind) VALUES ($1, 'run_started')", old_id
        )
        assert (await saga.migrate(dsn, schema="legacy"))[0] == 9  # (and any later ones)
        async with saga.Orchestrator(dsn, sagas=[quick], schema="legacy") as orch:
            assert await orch.get_run(old_id).result(timeout=20) == "s3"
            kinds = [e.kind for e in await orch.get_run(old_id).history()]
            assert (kinds[0], kinds[-1]) == ("run_started", "run_completed")
            new = await orch.start(quick, Job(n=2))
            await new.result(timeout=20)
        where = "SELECT tableoid::regclass::text FROM legacy.runs WHERE id = $1"
        assert await conn.fetchval(where, old_id) == "legacy.runs_default"
        assert await conn.fetchval(where, new.id) == "legacy." + partition("runs", _today())
    finally:
        await conn.close()


async def test_statements_on_given_runs_are_planned_once(
    orchestrator: OrchestratorFactory,
) -> None:
    """Besides leasing, an executing orchestrator starts runs, waits for their results
    and writes the items of graph runs (steps in parallel) on its pool of generic plans:
    on the partitioned runs, the general pool planned each of them anew (a graph item's
    write: 0.7 ms of the database's CPU per step, most of a fan-out's; a result's two
    reads: a third of what a start-and-wait cost it)."""
    fan = small_saga("fan", 4, after={"s2": ["s1"], "s3": ["s1"], "s4": ["s2", "s3"]})
    plain = small_saga("plain", 2)
    orch = await orchestrator(fan, plain, concurrency=2)
    for _ in range(3):
        assert await (await orch.start(fan, Job(n=1))).result(timeout=20) == "s4"
        assert await (await orch.start(plain, Job(n=1))).result(timeout=20) == "s2"
    store = orch._store
    assert store.hot is not store.pool
    names = {text: name for name, text in store._q.items()}
    held = [await store.hot.acquire(timeout=10) for _ in range(store.hot.get_max_size())]
    try:
        planned: set[str] = set()
        for conn in held:
            for r in await conn.fetch(
                "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements"
            ):
                assert r["custom_plans"] == 0, r["statement"]
                if r["generic_plans"] and r["statement"] in names:
                    planned.add(names[r["statement"]])
    finally:
        for conn in held:
            await store.hot.release(conn)
    expected = {"claim_items", "graph_lock", "graph_write", "start_run", "get_run", "watch_run"}
    assert expected <= planned, planned


async def test_prune_rejects_a_non_bool_whole_days(open_client: ClientFactory) -> None:
    """whole_days must be a bool: anything else is refused before anything goes."""
    client = await open_client()
    with pytest.raises(saga.ConfigurationError, match="whole_days"):
        await saga.prune(client, older_than=timedelta(days=1), whole_days="yes")  # type: ignore[arg-type]


async def test_an_orchestrator_plans_its_leasing_statements_once(
    orchestrator: OrchestratorFactory, open_client: ClientFactory
) -> None:
    """An executing orchestrator runs its claims, transitions, heartbeats and releases on
    a pool of its own whose sessions use generic plans (planned once per connection: on
    the partitioned runs a custom plan, made at every execution, cost two thirds of a
    claim's database time); the operator queries keep Postgres' default plan choice
    (their plans depend on their filters). A client that executes nothing, or an
    orchestrator at concurrency 0, has such a pool too, of 2 connections, for its starts,
    results and signals (a result's reads were planned at every execution)."""
    quick = small_saga("quick", 2)
    orch = await orchestrator(quick)
    store = orch._store
    assert store.hot is not store.pool
    assert await store.hot.fetchval("SHOW plan_cache_mode") == "force_generic_plan"
    assert await store.pool.fetchval("SHOW plan_cache_mode") == "auto"
    run = await orch.start(quick, Job(n=1))
    assert await run.result(timeout=20) == "s2"
    idle = await orchestrator(quick, concurrency=0)
    client = await open_client(quick)
    for store in (idle._store, client._store):
        assert store.hot is not store.pool
        assert store.hot.get_max_size() == 2
        assert await store.hot.fetchval("SHOW plan_cache_mode") == "force_generic_plan"
        assert await store.pool.fetchval("SHOW plan_cache_mode") == "auto"
    started = await client.start(quick, Job(n=2))
    assert await started.result(timeout=20) == "s2"


@pytest.mark.parametrize("schema", ["__runs__", "__part__", "x__schema__y"])
async def test_a_schema_named_like_a_placeholder_is_partitioned_and_pruned(
    orchestrator: OrchestratorFactory, dsn: str, schema: str
) -> None:
    """The SQL files mark the tables of a day with placeholders (``__runs__``, ...); a
    schema may be named like one. Migrating it creates its coming days' partitions in
    it, and prune drops a past day of it (its runs and history), touching nothing of
    the schema ``saga``."""
    quick = small_saga("quick", 1)
    orch = await orchestrator(quick, schema=schema)
    runs = [await orch.start(quick, Job(n=i)) for i in range(3)]
    for run in runs:
        await run.result(timeout=20)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        have = await partitions.days(pool, schema)
        assert {_today() + timedelta(days=k) for k in range(partitions.DAYS_AHEAD + 1)} <= have
        day = _today() - timedelta(days=40)
        assert await partitions._create_day(pool, schema, day)
        table = f'"{schema}".runs'
        async with pool.acquire() as db, db.transaction():
            for run in runs:
                new = uuid.UUID(int=run.id.int - ((40 * 86_400_000) << 80))
                await db.execute(
                    f"UPDATE {table} SET id = $2, finished_at = finished_at - interval '40 days'"
                    " WHERE id = $1",
                    run.id,
                    new,
                )
                for other in TABLES[1:]:
                    await db.execute(
                        f'UPDATE "{schema}".{other} SET run_id = $2 WHERE run_id = $1', run.id, new
                    )
        result = await saga.prune(orch, older_than=timedelta(days=30), whole_days=True)
        assert (result.runs, result.days) == (3, 1)
        assert day not in await partitions.days(pool, schema)
        assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 0
        assert _today() in await partitions.days(pool, "saga")
    finally:
        await pool.close()


async def test_saga_pools_run_without_jit(orchestrator: OrchestratorFactory) -> None:
    """Both pools an orchestrator opens run with ``jit = off``: a prune's statements read
    a whole day and are costed high enough for Postgres to JIT-compile them, which cost
    a second per statement (more than the statement)."""
    quick = small_saga("quick", 1)
    orch = await orchestrator(quick)
    assert orch._pool is not None
    assert await orch._pool.fetchval("SHOW jit") == "off"
    assert orch._hot is not None
    assert await orch._hot.fetchval("SHOW jit") == "off"

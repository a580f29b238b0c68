"""Scale: throughput with 1,000,000 finished runs in the tables versus empty tables, and
the plans of the claim statement at that size."""

from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
from asyncpg.pool import PoolConnectionProxy

import saga
from benchmarks import _internals
from benchmarks._base import say
from benchmarks._harness import Harness
from benchmarks._measure import SagaRow, measure_saga
from benchmarks._sagas import Input, build
from benchmarks._stat import Stat
from benchmarks._throughput import HEADLINE, TP_HEAD, tp_row
from benchmarks._window import Measured


@dataclasses.dataclass
class Load:
    runs: int
    events: int
    runs_size: str
    events_size: str
    per_run: int  # events per loaded run
    real_events: int  # events of a real run
    seconds: float
    timings: dict[str, float]


@dataclasses.dataclass
class Scale:
    empty: list[Measured]
    big: list[Measured]
    load: Load
    custom_plan: str
    generic_plan: str

    @property
    def uses_due_index(self) -> bool:
        return (
            _internals.DUE_INDEX in self.custom_plan and _internals.DUE_INDEX in self.generic_plan
        )

    @property
    def ratio(self) -> float:
        """Throughput on the loaded tables ÷ on empty tables (medians)."""
        big = Stat.of([m.runs_per_s for m in self.big]).med
        return big / Stat.of([m.runs_per_s for m in self.empty]).med


async def measure(h: Harness) -> Scale:
    c, p = HEADLINE
    big_db, big_dsn = await h.saga_database("scale_1m")
    load = await load_finished_runs(h, big_dsn)
    custom, generic = await explain_claim(big_dsn)
    empty: list[Measured] = []
    big: list[Measured] = []
    row = SagaRow(concurrency=c, processes=p)
    for repeat in range(h.opts.repeats):
        empty.append(await measure_saga(h, row, f"scale_empty_r{repeat}"))
        big.append(await measure_saga(h, row, f"scale_1m_r{repeat}", database=(big_db, big_dsn)))
    await h.drop(big_db)
    return Scale(empty, big, load, custom, generic)


async def _template_run(dsn: str) -> uuid.UUID:
    """One real finished run of the no-op saga: every clone is a copy of it."""
    definition = build("noop")
    async with saga.Orchestrator(dsn, sagas=[definition], concurrency=1, migrate=False) as o:
        run = await o.start(definition, Input(i=0))
        await o.get_run(run.id).result(timeout=30)
    return run.id


async def load_finished_runs(h: Harness, dsn: str) -> Load:
    """Bulk-insert finished runs and their events with INSERT ... SELECT generate_series,
    cloned from one real run of the no-op saga (so every column is what saga writes),
    indexes dropped during the load and rebuilt after it; then VACUUM ANALYZE."""
    template = await _template_run(dsn)
    conn = await asyncpg.connect(dsn)
    timings: dict[str, float] = {}
    try:
        real_events = await conn.fetchval(_internals.EVENTS_OF, template)
        per_run = min(h.opts.scale_events or real_events, real_events)
        began = time.monotonic()
        await conn.execute("SET maintenance_work_mem = '256MB'")
        async with conn.transaction(), _indexes_dropped(conn, timings):
            columns = [r["column_name"] for r in await conn.fetch(_internals.RUN_COLUMNS)]
            t = time.monotonic()
            await conn.execute(_internals.clone_runs_sql(columns), template, h.opts.scale_runs)
            timings["runs insert"] = time.monotonic() - t
            t = time.monotonic()
            await conn.execute(_internals.CLONE_EVENTS, template, per_run)
            timings["events insert"] = time.monotonic() - t
        t = time.monotonic()
        for table in _internals.TABLES:
            await conn.execute(f"VACUUM ANALYZE {table}")
        timings["VACUUM ANALYZE"] = time.monotonic() - t
        t = time.monotonic()
        await h.checkpoint()
        timings["CHECKPOINT"] = time.monotonic() - t
        sizes = await conn.fetchrow(
            """
            SELECT (SELECT count(*) FROM saga.runs) AS runs,
                   (SELECT count(*) FROM saga.events) AS events,
                   pg_size_pretty(pg_total_relation_size('saga.runs')) AS runs_size,
                   pg_size_pretty(pg_total_relation_size('saga.events')) AS events_size
            """
        )
        assert sizes is not None
    finally:
        await conn.close()
    load = Load(
        runs=sizes["runs"],
        events=sizes["events"],
        runs_size=sizes["runs_size"],
        events_size=sizes["events_size"],
        per_run=per_run,
        real_events=real_events,
        seconds=time.monotonic() - began,
        timings=timings,
    )
    say(
        f"loaded {load.runs:,} finished runs ({load.runs_size}) and {load.events:,} events "
        f"({load.events_size}) in {load.seconds:.0f} s: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
    )
    return load


@contextlib.asynccontextmanager
async def _indexes_dropped(
    conn: asyncpg.Connection, timings: dict[str, float]
) -> AsyncIterator[None]:
    """Drop the tables' indexes (and primary keys) for the load, rebuild them after with
    the same definitions (not after an error: the transaction rolls back)."""
    indexes = await conn.fetch(
        """
        SELECT i.indexrelid::regclass::text AS name, i.indrelid::regclass::text AS tbl,
               pg_get_indexdef(i.indexrelid) AS def, c.conname
        FROM pg_index i
        LEFT JOIN pg_constraint c ON c.conindid = i.indexrelid AND c.contype = 'p'
        WHERE i.indrelid = ANY($1::regclass[])
        """,
        list(_internals.TABLES),
    )
    for ix in indexes:
        if ix["conname"]:
            await conn.execute(f'ALTER TABLE {ix["tbl"]} DROP CONSTRAINT "{ix["conname"]}"')
        else:
            await conn.execute(f"DROP INDEX {ix['name']}")
    yield
    t = time.monotonic()
    for ix in indexes:
        await conn.execute(ix["def"])
        if ix["conname"]:
            await conn.execute(
                f'ALTER TABLE {ix["tbl"]} ADD CONSTRAINT "{ix["conname"]}" '
                f"PRIMARY KEY USING INDEX {ix['name'].split('.')[-1]}"
            )
    timings["index rebuild"] = time.monotonic() - t


async def explain_claim(dsn: str) -> tuple[str, str]:
    """EXPLAIN of saga's claim statement on the loaded tables: the custom plan with
    ANALYZE (1,000 due runs inserted first; everything rolled back), and the generic
    plan a prepared statement may switch to."""
    definition = build("noop")
    args = _internals.claim_args(definition, 64)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    try:
        claim, types = _internals.claim_statement(pool)
        async with pool.acquire() as conn:
            tr = conn.transaction()
            await tr.start()
            try:
                due = (definition.name, definition.version, definition.fingerprint)
                await conn.execute(_internals.INSERT_DUE_RUNS, *due)
                rows = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + claim, *args)
                custom = "\n".join(r[0] for r in rows)
            finally:
                await tr.rollback()
            generic = await _generic_plan(conn, claim, types, args)
    finally:
        await pool.close()
    return custom, generic


async def _generic_plan(
    conn: PoolConnectionProxy[asyncpg.Record],
    claim: str,
    types: tuple[str, ...],
    args: tuple[object, ...],
) -> str:
    await conn.execute("SET plan_cache_mode = force_generic_plan")
    await conn.execute(f"PREPARE bench_claim({', '.join(types)}) AS {claim}")
    # EXECUTE takes no bind parameters: let the server quote them as literals.
    quote = ", ".join(f"${i + 1}::{t}" for i, t in enumerate(types))
    execute = await conn.fetchval(
        f"SELECT format('EXECUTE bench_claim({', '.join('%L' for _ in types)})', {quote})",
        *args,
    )
    rows = await conn.fetch(f"EXPLAIN (COSTS OFF) {execute}")
    await conn.execute("DEALLOCATE bench_claim")
    await conn.execute("RESET plan_cache_mode")
    return "\n".join(r[0] for r in rows)


def render(s: Scale, scale_runs: int, repeats: int, ceiling: float) -> list[str]:
    load = s.load
    c, p = HEADLINE
    return [
        f"## Scale: {scale_runs:,} finished runs",
        "",
        f"{load.runs:,} finished runs ({load.runs_size} with indexes) and "
        f"{load.events:,} events ({load.events_size}) were bulk-inserted with "
        "`INSERT ... SELECT generate_series`, cloned from one real run of the no-op saga "
        "(status completed, due_at NULL, finished_at set, every column as saga writes it), "
        f"{load.per_run} events per run (a real run has {load.real_events}), indexes "
        "dropped during the load and rebuilt after, then `VACUUM ANALYZE` and `CHECKPOINT`: "
        f"{load.seconds:.0f} s ("
        + ", ".join(f"{k} {v:.1f} s" for k, v in load.timings.items())
        + f"). Then the same measurement ({p} process x {c}) alternately on a fresh empty "
        f"database and on the loaded one, {repeats} times each.",
        "",
        *TP_HEAD,
        tp_row("empty tables", s.empty, ceiling),
        tp_row(f"{load.runs:,} finished runs", s.big, ceiling),
        "",
        'Claim statement (`Store._q["claim"]`) on the loaded tables, custom plan with '
        "`EXPLAIN (ANALYZE, BUFFERS)` (1,000 due runs inserted first in the same, "
        "rolled-back transaction; limit 64):",
        "",
        "```",
        s.custom_plan,
        "```",
        "",
        "Generic plan (`plan_cache_mode = force_generic_plan`, as a prepared statement may "
        "use after five executions):",
        "",
        "```",
        s.generic_plan,
        "```",
        "",
    ]

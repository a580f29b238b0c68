"""Finished runs in bulk, as saga would have left them (the scale and retention sections).

Every loaded run is a clone of one real finished run of the no-op saga (so every column,
event and end mark is what saga writes), with a UUIDv7 id of its creation time: runs
spread over whole past UTC days land in those days' partitions (created first), or in
the DEFAULT partitions when the days have none (how runs started before partitioning,
or on a day nobody created a partition for, are stored).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, date, datetime, timedelta

import asyncpg

import saga
from benchmarks import _internals
from benchmarks._base import BenchmarkError, say
from benchmarks._harness import Harness
from benchmarks._sagas import Input, build

RUNS_PER_DAY = 1_000_000


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
    days: list[date] = dataclasses.field(default_factory=list)  # the days loaded
    partitioned: bool = True  # into the days' partitions (else the DEFAULT partitions)
    saga_bytes: int = 0  # every saga table with indexes, after the load


def past_days(runs: int, last_ago: int) -> list[date]:
    """``max(1, ceil(runs / RUNS_PER_DAY))`` consecutive UTC days, the last one
    ``last_ago`` days before today."""
    n = max(1, -(-runs // RUNS_PER_DAY))
    last = datetime.now(UTC).date() - timedelta(days=last_ago)
    return [last - timedelta(days=n - 1 - k) for k in range(n)]


async def _template_run(dsn: str) -> uuid.UUID:
    """One real finished run of the no-op saga: every clone is a copy of it."""
    definition = build("noop")
    async with saga.Orchestrator(dsn, sagas=[definition], concurrency=1, migrate=False) as o:
        run = await o.start(definition, Input(i=0))
        await o.get_run(run.id).result(timeout=30)
    return run.id


async def load_finished_runs(
    h: Harness,
    dsn: str,
    runs: int,
    days: Sequence[date],
    *,
    partitioned: bool = True,
    autovacuum: bool = True,
) -> Load:
    """Bulk-insert ``runs`` finished runs created evenly over ``days`` (consecutive), their
    events and end marks with INSERT ... SELECT generate_series, into the days' partitions
    (created first) or, not ``partitioned``, the DEFAULT partitions; the parents' indexes
    dropped during the load and rebuilt after it; then VACUUM ANALYZE and CHECKPOINT.
    Without ``autovacuum``, it is turned off on every saga table first."""
    template = await _template_run(dsn)
    timings: dict[str, float] = {}
    began = time.monotonic()
    if partitioned:
        await _internals.create_day_partitions(dsn, days)
        timings["partitions"] = time.monotonic() - began
    first = datetime.combine(days[0], datetime.min.time(), UTC)
    span = len(days) * 86_400.0
    conn = await asyncpg.connect(dsn)
    try:
        if not autovacuum:
            await _internals.autovacuum_off(conn)
        real_events = await conn.fetchval(_internals.EVENTS_OF, template)
        per_run = min(h.opts.scale_events or real_events, real_events)
        await conn.execute("SET maintenance_work_mem = '256MB'")
        async with conn.transaction(), _indexes_dropped(conn, timings):
            columns = [r[0] for r in await conn.fetch(_internals.COLUMNS, "runs")]
            t = time.monotonic()
            clone = _internals.clone_runs_sql(columns)
            await conn.execute(clone, template, runs, first, span)
            timings["runs insert"] = time.monotonic() - t
            t = time.monotonic()
            await conn.execute(_internals.CLONE_EVENTS, template, per_run)
            timings["events insert"] = time.monotonic() - t
            t = time.monotonic()
            columns = [r[0] for r in await conn.fetch(_internals.COLUMNS, "watches")]
            await conn.execute(_internals.clone_watches_sql(columns), template)
            timings["end marks insert"] = time.monotonic() - t
        t = time.monotonic()
        await conn.execute("VACUUM ANALYZE")  # the whole (fresh) database: partitions too
        timings["VACUUM ANALYZE"] = time.monotonic() - t
        t = time.monotonic()
        await h.checkpoint()
        timings["CHECKPOINT"] = time.monotonic() - t
        sizes = await conn.fetchrow(
            f"""
            SELECT (SELECT count(*) FROM saga.runs) AS runs,
                   (SELECT count(*) FROM saga.events) AS events,
                   (SELECT count(*) FROM saga.watches) AS watches,
                   pg_size_pretty((SELECT sum(pg_total_relation_size(inhrelid))
                                   FROM pg_inherits WHERE inhparent = 'saga.runs'::regclass))
                                   AS runs_size,
                   pg_size_pretty((SELECT sum(pg_total_relation_size(inhrelid))
                                   FROM pg_inherits WHERE inhparent = 'saga.events'::regclass))
                                   AS events_size,
                   ({_internals.SAGA_BYTES}) AS saga_bytes,
                   ({_internals.IN_DEFAULT}) AS in_default
            """
        )
        assert sizes is not None
    finally:
        await conn.close()
    if sizes["runs"] != runs + 1 or sizes["watches"] != runs + 1:
        raise BenchmarkError(
            f"loaded {sizes['runs']:,} runs and {sizes['watches']:,} end marks, expected "
            f"{runs + 1:,} each (the clones and their template)"
        )
    if sizes["in_default"] != (0 if partitioned else runs):
        where = "their days' partitions" if partitioned else "the DEFAULT partition"
        raise BenchmarkError(f"{sizes['in_default']:,} loaded runs in runs_default, not {where}")
    load = Load(
        runs=sizes["runs"],
        events=sizes["events"],
        runs_size=sizes["runs_size"],
        events_size=sizes["events_size"],
        per_run=per_run,
        real_events=real_events,
        seconds=time.monotonic() - began,
        timings=timings,
        days=list(days),
        partitioned=partitioned,
        saga_bytes=sizes["saga_bytes"],
    )
    where = "their days' partitions" if partitioned else "the DEFAULT partitions"
    say(
        f"loaded {load.runs:,} finished runs ({load.runs_size}) and {load.events:,} events "
        f"({load.events_size}) over {len(days)} day(s) into {where} in {load.seconds:.0f} s: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
    )
    return load


@contextlib.asynccontextmanager
async def _indexes_dropped(
    conn: asyncpg.Connection, timings: dict[str, float]
) -> AsyncIterator[None]:
    """Drop the tables' indexes (and primary keys), with the partitions' indexes attached
    to them; rebuild them after with the same definitions and names, as pg_dump restores
    them: the parent's ``ON ONLY``, each partition's, attached to it (not after an error:
    the transaction rolls back). Partition indexes of their own (the day partitions'
    idempotency keys, partial: no loaded run has a key) stay during the load."""
    parents = await conn.fetch(_internals.PARENT_INDEXES, list(_internals.TABLES))
    children = await conn.fetch(_internals.PARTITION_INDEXES, [ix["name"] for ix in parents])
    for ix in parents:
        if ix["conname"]:
            await conn.execute(f'ALTER TABLE {ix["tbl"]} DROP CONSTRAINT "{ix["conname"]}"')
        else:
            await conn.execute(f"DROP INDEX {ix['name']}")
    yield
    t = time.monotonic()
    for ix in [*parents, *children]:
        if ix["conname"]:
            await conn.execute(
                f'ALTER TABLE ONLY {ix["tbl"]} ADD CONSTRAINT "{ix["conname"]}" {ix["con"]}'
            )
        else:
            await conn.execute(ix["def"])
    for ix in children:
        await conn.execute(f"ALTER INDEX {ix['parent']} ATTACH PARTITION {ix['name']}")
    invalid = await conn.fetchval(
        "SELECT count(*) FROM pg_index WHERE NOT indisvalid AND indrelid = ANY($1::regclass[])",
        list(_internals.TABLES),
    )
    if invalid:
        raise BenchmarkError(f"{invalid} index(es) of {_internals.TABLES} left invalid")
    timings["index rebuild"] = time.monotonic() - t

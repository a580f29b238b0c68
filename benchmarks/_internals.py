"""Everything in ``benchmarks/`` that depends on saga beyond its public API.

This module touches **private API** (``saga._store.Store``, ``saga._partitions``) and
**saga's table layout** (schema ``saga``: ``runs``, ``events``, ``watches``, partitioned
by day of run id). The benchmarks need both on purpose:

- the scale section EXPLAINs the claim statement exactly as saga sends it, which only the
  store knows (``Store._q["claim"]``, its ``$n`` parameters in order), and checks that
  every partition's partial due index is used;
- the profile section counts ``Store`` calls per run in the worker process, by wrapping
  the store's methods (a benchmark-only monkeypatch);
- the harness times and checks runs from the server's own clock and state (``created_at``,
  ``finished_at``, ``step_started`` events), and the scale and retention sections clone
  finished runs column by column, with UUIDv7 ids of their creation time, into past days'
  partitions they create first (``saga._partitions._create_day``) or into the DEFAULT
  partitions, and read the saga tables' sizes and dead rows;
- the waits section sees when every run is parked (``status = 'waiting'``), times from the
  first signal received (``signals.received_at``), and sorts the write transactions by
  the events they inserted (``events.xmin``).

Every other module uses the public ``saga`` API only, so when the core is reshaped,
this is the one file that must follow (the smoke test, ``tests/test_benchmarks_smoke.py``,
runs the parts that use it)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable
from datetime import date
from typing import Any

import asyncpg

import saga
from benchmarks._base import BenchmarkError

# -- private API: the store ------------------------------------------------------------

# Store calls counted while a window runs with "count_calls" (the profile rows): how many
# claims, transitions, heartbeats, ... a run costs, and how many items the claims returned.
COUNTED = (
    "start_run",
    "claim",
    "transition",
    "heartbeat",
    "release",
    "census",
    "count_unclaimable",
    "watch_run",
    "get_run",
    "notify_work",
)
_calls: dict[str, int] = {}


def count_store_calls() -> None:
    """Wrap saga's ``Store`` methods (once per process) to count calls."""
    from saga._store import Store

    if getattr(Store, "_bench_counted", False):
        return
    for name in COUNTED:
        original = getattr(Store, name, None)
        if original is None:
            raise BenchmarkError(f"saga's Store has no {name}(): update benchmarks/_internals.py")
        setattr(Store, name, _counting(name, original))
    Store._bench_counted = True  # type: ignore[attr-defined]  # a marker on a private class


def _counting(name: str, original: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def counted(self: object, *args: object, **kwargs: object) -> Any:
        result = await original(self, *args, **kwargs)
        _calls[name] = _calls.get(name, 0) + 1
        if name == "claim":
            _calls["claimed items"] = _calls.get("claimed items", 0) + len(result)
            if not result:
                _calls["empty claims"] = _calls.get("empty claims", 0) + 1
        return result

    return counted


def take_calls() -> dict[str, int]:
    """The calls counted since the last take (and reset the counts)."""
    calls = dict(_calls)
    _calls.clear()
    return calls


_CLAIM_TYPES = ("text", "int", "float8", "text[]", "int[]", "text[]")
_TABLE_TYPES = ("text[]", "boolean[]", "boolean[]", "text[]", "text[]", "text[]")


def claim_statement(pool: asyncpg.Pool) -> tuple[str, tuple[str, ...]]:
    """The claim statement as saga sends it, and its parameter types (for PREPARE)."""
    from saga._store import Store

    return Store(pool)._q["claim"], _CLAIM_TYPES + _TABLE_TYPES


def claim_args(definition: saga.Saga[Any], limit: int) -> tuple[object, ...]:
    """The claim's parameters: worker id, max items, lease seconds, the registered
    definitions (names, versions, fingerprints, pairwise), then the claim table's
    columns (status before, cancel requested, signalled, status after, wake-up event,
    start event)."""
    from saga._claims import claim_table_args

    name, version, fp = definition.name, definition.version, definition.fingerprint
    return (
        "bench-explain",
        limit,
        30.0,
        [name, name],
        [version, version],
        [fp, "-"],
        *claim_table_args(),
    )


# -- the schema: saga's tables -----------------------------------------------------------

# The tables the loads fill (partitioned parents: their indexes cascade to partitions).
TABLES = ("saga.runs", "saga.events", "saga.watches")
# The partial index the claim must use: runs_due, as each partition of runs has it (a day
# partition's is named after the table, the DEFAULT partition's is the pre-0009 index).
DUE_INDEX = re.compile(r"\bruns_(p\d{8}_due_at_idx|default_due)\b")


def runs_partition(day: date) -> str:
    """The partition of runs holding ``day``'s runs."""
    from saga import _partitions

    return _partitions.partition("runs", day)


def uses_due_index(plan: str, days: Iterable[date]) -> bool:
    """Whether a claim plan reads the partitions of ``days`` (the loaded finished runs)
    through their due index, never whole. Small partitions (today's, the days ahead, an
    empty DEFAULT) may be read whole: the planner's choice for a few pages."""
    if not DUE_INDEX.search(plan):
        return False
    for day in days:
        part = runs_partition(day)
        if f"{part}_due_at_idx" not in plan or re.search(rf"Seq Scan on {part}\b", plan):
            return False
    return True


async def create_day_partitions(dsn: str, days: Iterable[date]) -> None:
    """Create the partitions of past ``days`` (saga only creates today's and ahead)."""
    from saga import _partitions

    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    try:
        for day in days:
            await _partitions._create_day(pool, "saga", day)
    finally:
        await pool.close()


# The leaf tables of schema saga (partitions and plain tables), for sizes and dead rows.
_LEAVES = """
    SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'saga' AND c.relkind = 'r'
    """
# Bytes of every saga table with its indexes and TOAST; dead rows of all of them.
SAGA_BYTES = f"SELECT sum(pg_total_relation_size(oid))::bigint FROM ({_LEAVES}) t"
DEAD_ROWS = (
    "SELECT coalesce(sum(n_dead_tup), 0)::bigint FROM pg_stat_user_tables WHERE schemaname = 'saga'"
)
AUTOVACUUM_COUNT = (
    "SELECT coalesce(sum(autovacuum_count), 0)::bigint FROM pg_stat_user_tables "
    "WHERE schemaname = 'saga'"
)


async def autovacuum_off(conn: asyncpg.Connection) -> None:
    """Autovacuum off on every saga table (leaves: a partitioned parent has no storage),
    so that the dead rows a prune leaves stay counted until they are read."""
    for (name,) in await conn.fetch(f"SELECT oid::regclass::text FROM ({_LEAVES}) t"):
        await conn.execute(f"ALTER TABLE {name} SET (autovacuum_enabled = off)")


# A partitioned parent's indexes (and primary keys) and the partition indexes attached to
# them: dropping the parent's drops those; rebuilt like pg_dump restores them (the parent's
# ON ONLY, each partition's by its own name, attached). Indexes of a partition alone (the
# day partitions' idempotency keys) stay.
PARENT_INDEXES = """
    SELECT i.indexrelid::regclass::text AS name, i.indrelid::regclass::text AS tbl,
           pg_get_indexdef(i.indexrelid) AS def, c.conname, pg_get_constraintdef(c.oid) AS con
    FROM pg_index i
    LEFT JOIN pg_constraint c ON c.conindid = i.indexrelid AND c.contype = 'p'
    WHERE i.indrelid = ANY($1::regclass[])
    """
PARTITION_INDEXES = """
    SELECT h.inhparent::regclass::text AS parent, i.indexrelid::regclass::text AS name,
           i.indrelid::regclass::text AS tbl, pg_get_indexdef(i.indexrelid) AS def,
           c.conname, pg_get_constraintdef(c.oid) AS con
    FROM pg_inherits h
    JOIN pg_index i ON i.indexrelid = h.inhrelid
    LEFT JOIN pg_constraint c ON c.conindid = i.indexrelid AND c.contype = 'p'
    WHERE h.inhparent = ANY($1::regclass[])
    """

# What a correctly finished run looks like, per benchmark saga.
FINISHED_OK = {
    "noop": "status = 'completed' AND output::text = '1' AND cardinality(completed_steps) = 3",
    "compensate": "status = 'compensated' AND error->>'type' = 'saga.PermanentError'",
    "gate": "status = 'completed' AND output::text = '1'",
    "noop2": "status = 'completed' AND output::text = '1' AND cardinality(completed_steps) = 2",
    "wait": "status = 'completed' AND output::text = '1' "
    "AND completed_steps = '{s1,decision,s2}' AND results->>'decision' = '{\"approved\":true}'",
    "fanout": "status = 'completed' AND output::text = '1' AND cardinality(completed_steps) = 5",
}

# Runs finished since $1. The partial index runs_finished_at keeps this cheap at 1M rows.
DONE_SINCE = "SELECT count(*) FROM saga.runs WHERE due_at IS NULL AND finished_at >= $1"
COMPLETED = "SELECT count(*) FROM saga.runs WHERE status = 'completed'"
LEASED = "SELECT count(*) FROM saga.runs WHERE status = 'running' AND lease_owner IS NOT NULL"
# Runs parked at a wait (their step before it completed, no lease held).
WAITING = "SELECT count(*) FROM saga.runs WHERE status = 'waiting' AND lease_owner IS NULL"


def span_sql(kind: str) -> str:
    """The runs created since $1: first start, last and p99 finish, first claim, first
    signal received, count, correctly finished count, lease expiries."""
    return f"""
        WITH r AS (SELECT * FROM saga.runs WHERE created_at >= $1)
        SELECT min(created_at) AS first_start, max(finished_at) AS last_done,
               percentile_disc(0.99) WITHIN GROUP (ORDER BY finished_at) AS p99_done,
               count(*) AS n, count(*) FILTER (WHERE {FINISHED_OK[kind]}) AS ok,
               (SELECT count(*) FROM saga.events e JOIN r ON e.run_id = r.id
                WHERE e.kind = 'lease_expired') AS expiries,
               (SELECT min(e.at) FROM saga.events e JOIN r ON e.run_id = r.id
                WHERE e.kind = 'step_started') AS first_claim,
               (SELECT min(s.received_at) FROM saga.signals s JOIN r ON s.run_id = r.id)
                AS first_signal
        FROM r
        """


# The write transactions that wrote the runs' history (every run in the database), by
# the kinds of event each wrote (events are never updated: an event's xmin is the id of
# the transaction that inserted it): ``kinds`` (sorted, comma-separated) -> transactions.
WRITES_BY_EVENTS = """
    WITH tx AS (
        SELECT xmin::text AS xid, string_agg(DISTINCT kind, ',' ORDER BY kind) AS kinds
        FROM saga.events
        GROUP BY 1
    )
    SELECT kinds, count(*) AS n FROM tx GROUP BY kinds ORDER BY n DESC, kinds
    """


# A transaction that wrote only events of these kinds is a claim (a transition that
# leases the next step writes step_completed too).
CLAIM_EVENTS = frozenset({"step_started", "woke", "lease_expired"})

# Per run of $1 (ids): created-to-finished and created-to-first-claim, in seconds.
RUN_TIMES = """
    SELECT extract(epoch FROM r.finished_at - r.created_at)::float8 AS s,
           extract(epoch FROM c.at - r.created_at)::float8 AS claim
    FROM saga.runs r
    JOIN LATERAL (SELECT min(at) AS at FROM saga.events e
                  WHERE e.run_id = r.id AND e.kind = 'step_started') c ON true
    WHERE r.id = ANY($1)
    """

# Cloning finished runs: every column of saga.runs as the template run has it (the column
# list is read from the table, so a new column cannot be skipped silently), except these.
# ``at`` is the clone's creation time, ``d`` the template's duration, ``g`` its number,
# ``h`` 32 random hex digits.
# ``h`` is 32 random hex digits: the id is a UUIDv7 of ``at`` (48 bits of Unix ms, version
# 7, 12 random bits, variant 10, 62 random bits), so the clone lands in at's day partition.
UUID7 = (
    "(lpad(to_hex((extract(epoch FROM at) * 1000)::bigint), 12, '0') || '7' || "
    "substr(h, 1, 3) || substr('89ab', 1 + floor(random() * 4)::int, 1) || "
    "substr(h, 4, 15))::uuid"
)
RUN_CLONE_OVERRIDES = {
    "id": UUID7,
    "idempotency_key": "NULL",
    "input": "jsonb_build_object('i', g)::text",
    "due_at": "NULL",
    "lease_owner": "NULL",
    "cancel_requested": "false",
    "released": "false",
    "created_at": "at",
    "updated_at": "at + d",
    "finished_at": "at + d",
}

# 1,000 due runs of one definition ($1 name, $2 version, $3 fingerprint) for EXPLAIN,
# started now (UUIDv7 ids: today's partition, as new runs are).
INSERT_DUE_RUNS = f"""
    INSERT INTO saga.runs (id, saga_name, saga_version, fingerprint, input, step_name, due_at)
    SELECT {UUID7}, $1, $2, $3, jsonb_build_object('i', g)::text, 's1',
           now() - interval '1 s'
    FROM generate_series(1, 1000) g,
         LATERAL (SELECT now() AS at, md5(g::text || random()::text) AS h) x
    """
COLUMNS = """
    SELECT column_name FROM information_schema.columns
    WHERE table_schema = 'saga' AND table_name = $1 ORDER BY ordinal_position
    """


def clone_runs_sql(columns: list[str]) -> str:
    """$2 clones of the run $1, created evenly over the $4 seconds from $3 (timestamptz)."""
    values = ", ".join(RUN_CLONE_OVERRIDES.get(c, f"t.{c}") for c in columns)
    return f"""
        INSERT INTO saga.runs ({", ".join(columns)})
        SELECT {values}
        FROM saga.runs t,
             generate_series(1, $2) AS g,
             LATERAL (SELECT $3::timestamptz + (g - 1) * ($4::float8 / $2) * interval '1 s'
                             AS at,
                             t.finished_at - t.created_at AS d,
                             md5(g::text || random()::text) AS h) x
        WHERE t.id = $1
        """


def clone_watches_sql(columns: list[str]) -> str:
    """The end mark (watches row) of the run $1, for every other run."""
    values = ", ".join("r.id" if c == "run_id" else f"w.{c}" for c in columns)
    return f"""
        INSERT INTO saga.watches ({", ".join(columns)})
        SELECT {values}
        FROM saga.runs r CROSS JOIN (SELECT * FROM saga.watches WHERE run_id = $1) w
        WHERE r.id <> $1
        """


# The first $2 events of the run $1, for every other run, shifted to its creation time.
CLONE_EVENTS = """
    INSERT INTO saga.events (run_id, at, kind, step, attempt, worker, data)
    SELECT r.id, r.created_at + (e.at - t.created_at), e.kind, e.step,
           e.attempt, e.worker, e.data
    FROM saga.runs r
    CROSS JOIN (SELECT * FROM saga.events WHERE run_id = $1 ORDER BY id LIMIT $2) e
    CROSS JOIN (SELECT created_at FROM saga.runs WHERE id = $1) t
    WHERE r.id <> $1
    """
EVENTS_OF = "SELECT count(*) FROM saga.events WHERE run_id = $1"
# Runs in the DEFAULT partition (no day partition for their day).
IN_DEFAULT = "SELECT count(*) FROM saga.runs_default"

"""With 1,000,000 finished runs (and 3,000,000 history events), the queries behind the
operator pages (runs lists with every filter, paging, needs attention, one run and its
history, the dashboard's overview) read through their indexes: no sequential scan of
runs or events, and each reads a bounded number of rows (the overview's windows: the
runs of the window), whatever the history holds.

Checked with EXPLAIN (ANALYZE) on real PostgreSQL, never with timings: rows read, not
milliseconds, are what stays true on a slower or busier machine.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

import saga
from saga import _partitions as partitions
from saga._db import queries
from tests.conftest import _drop, _with_database

RUNS = 1_000_000
SCHEMA = "saga"
#: The most rows any scan of one page's query may produce or filter away.
BOUND = 2_000
#: A day of the fixture's history: a run finishes every 2.6 s, with three events.
DAY = int(86_400 / 2.6 * 3 * 1.2)
FIXTURE_SPAN = timedelta(seconds=RUNS * 2.6)  # from the fixture's first run to now

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
async def big(base_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A database holding RUNS finished runs of three sagas over 30 days (1 in 1000
    failed, others completed, compensated or cancelled), three events each, and a few
    active runs, each in its day's partition; analyzed, as autovacuum would have it."""
    name = f"scale_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(base_dsn)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    dsn = _with_database(base_dsn, name)
    await saga.migrate(dsn, schema=SCHEMA)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    try:  # the runs' days have their partitions, as orchestrators keep them
        today = datetime.now(UTC).date()
        for back in range(1, 33):
            await partitions._create_day(pool, SCHEMA, today - timedelta(days=back))
    finally:
        await pool.close()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(_FILL_RUNS, RUNS)
        await conn.execute(_FILL_REST)
        await conn.execute("ANALYZE")
        yield conn
    finally:
        await conn.close()
        await _drop(base_dsn, name)


_FILL_RUNS = """
INSERT INTO saga.runs (id, saga_name, saga_version, idempotency_key, status, input,
                       created_at, updated_at, finished_at, error)
SELECT -- a UUIDv7 of the run's start, as saga makes them
       (lpad(to_hex((extract(epoch FROM now() - g * interval '2.6 seconds') * 1000)::bigint),
             12, '0') || '7' || substr(md5(g::text), 1, 3) || '8'
        || substr(md5(g::text), 4, 15))::uuid,
       (ARRAY['checkout', 'refund', 'payout'])[1 + g % 3], 1,
       'order-' || g,
       CASE WHEN g % 1000 = 0 THEN 'failed' WHEN g % 7 = 0 THEN 'compensated'
            WHEN g % 11 = 0 THEN 'cancelled' ELSE 'completed' END,
       '{}', now() - g * interval '2.6 seconds',
       now() - g * interval '2.6 seconds' + interval '1 second',
       now() - g * interval '2.6 seconds' + interval '1 second',
       CASE WHEN g % 7 = 0 OR g % 1000 = 0
            THEN jsonb_build_object('type', 'CardDeclined', 'message', 'declined',
                                    'step', 'charge') END
FROM generate_series(1, $1::integer) AS g
"""
_FILL_REST = """
INSERT INTO saga.events (run_id, at, kind, step, attempt)
SELECT r.id, r.created_at + k * interval '0.3 seconds',
       (ARRAY['run_started', 'step_completed', 'run_completed'])[k + 1], 'charge', 1
FROM saga.runs r, generate_series(0, 2) AS k;
INSERT INTO saga.runs (id, saga_name, saga_version, status, input, step_name, due_at)
SELECT (lpad(to_hex((extract(epoch FROM now()) * 1000)::bigint), 12, '0') || '7'
        || substr(md5(g::text), 1, 3) || '9' || substr(md5(g::text), 4, 15))::uuid,
       'checkout', 1, 'running', '{}', 'charge', now() + interval '30 s'
FROM generate_series(1, 20) AS g;
"""


def _scans(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    stack = [plan["Plan"]]
    while stack:
        node = stack.pop()
        stack += node.get("Plans", [])
        relation = node.get("Relation Name") or ""
        if "Scan" in node["Node Type"] and relation.split("_")[0] in ("runs", "events"):
            found.append(node)
    return found


async def _read(
    conn: asyncpg.Connection, sql: str, *args: Any, window: timedelta = timedelta(0)
) -> int:
    """The most rows one scan of runs or events (or of one of their partitions) read;
    fails on a sequential scan that read anything, but of a partition the query's
    time ``window`` (back from now) reaches into: reading that whole may be the best
    plan (a day's window just after midnight covers most of yesterday's partition)."""
    text = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args)
    most = 0
    now = datetime.now(UTC)
    # The fixture's partial days: today's, and its first (its runs reach back RUNS x 2.6 s,
    # so how much of that day they fill depends on the time of day the test runs), and
    # the day the window starts on.
    partial = tuple(
        "_p" + day.strftime("%Y%m%d") for day in (now, now - FIXTURE_SPAN, now - window)
    )
    for scan in _scans(json.loads(text)[0]):
        where = f"{scan['Node Type']} on {scan['Relation Name']} ({scan.get('Index Name')})"
        read = scan["Actual Rows"] * scan["Actual Loops"] + scan.get("Rows Removed by Filter", 0)
        if scan["Node Type"] == "Seq Scan" and scan["Relation Name"].endswith(partial):
            # The planner may read a partial day's partition whole while it is small
            # (some 30,000 events): a day at most, never the history.
            assert read <= DAY, f"{where}: read {read} rows\n{text}"
            continue
        # (an empty partition, the coming days' or the DEFAULT one, may be read whole)
        assert scan["Node Type"] != "Seq Scan" or read == 0, f"{where}: a sequential scan\n{text}"
        most = max(most, read)
    return most


async def _check(conn: asyncpg.Connection, sql: str, *args: Any) -> None:
    read = await _read(conn, sql, *args)
    assert read <= BOUND, f"read {read} rows: {sql}"


async def test_operator_queries_read_a_page_not_the_history(big: asyncpg.Connection) -> None:
    """Every filter and page of the runs list, a lookup by business key, the runs that
    need attention, one run and its history: index scans reading at most BOUND rows."""
    q = queries(SCHEMA)
    mid, at = await big.fetchrow(
        "SELECT id, created_at FROM saga.runs WHERE idempotency_key = 'order-500000'"
    )
    day = 86_400.0
    cases: list[tuple[str, tuple[Any, ...]]] = [
        ("list_runs", (None, None, None, None, None, 51, None, None, None, None)),
        ("list_runs", ("refund", None, None, None, None, 51, None, None, None, None)),
        ("list_runs", ("nobody", None, None, None, None, 51, None, None, None, None)),
        ("list_runs", (None, ["failed"], None, None, None, 51, None, None, None, None)),
        ("list_runs", ("refund", ["failed"], None, None, None, 51, None, None, None, None)),
        ("list_runs", ("refund", ["compensated"], None, None, None, 51, None, None, None, None)),
        (
            "list_runs",
            (None, ["completed", "cancelled"], 10 * day, None, None, 51, None, None, None, None),
        ),
        ("list_runs", (None, None, 10 * day, 11 * day, None, 51, None, None, None, None)),
        ("list_runs", (None, None, None, None, None, 51, None, None, at, at - timedelta(days=1))),
        ("list_runs", ("refund", None, None, None, None, 51, None, None, at, None)),
        ("list_runs", (None, None, None, None, mid, 51, None, at, None, None)),
        ("list_runs", ("checkout", None, None, None, mid, 51, None, at, None, None)),
        ("list_runs", ("nobody", None, None, None, mid, 51, None, at, None, None)),
        ("list_runs", ("checkout", None, None, None, None, 51, "order-500001", None, None, None)),
        ("find_runs_by_key", ("order-500000", None)),
        ("needs_attention", (51, None)),
        ("needs_attention", (51, mid)),
        ("get_run", (mid,)),
        ("get_events", (mid,)),
        ("census_parked", ()),
    ]
    for name, args in cases:
        await _check(big, q[name], *args)


async def test_dashboard_queries_use_their_indexes(big: asyncpg.Connection) -> None:
    """The dashboard's own queries: index scans only on runs and events; the per-run
    reads and the overdue work stay within BOUND rows; an hour's window reads about an
    hour of runs (or of their events) and a day's about a day's (the fixture finishes one
    run every 2.6 s: about 1,400 an hour), never the history."""
    q = queries(SCHEMA)
    mid = await big.fetchval("SELECT id FROM saga.runs WHERE idempotency_key = 'order-500000'")
    for name, args in [
        ("dash_payloads", (mid,)),
        ("dash_signals", (mid,)),
        ("dash_overdue", (60.0,)),
        ("dash_events_sequence", ()),
        ("dash_outcomes", (3600.0,)),
        ("dash_finished_per_hour", (1,)),
    ]:
        await _check(big, q[name], *args)
    # The last hour's failures: the planner may read the hour's events by time (BRIN on
    # today's partition) rather than each recent run's by key; an hour either way.
    hour = await _read(big, q["dash_failures"], 3600.0, 100)
    assert hour <= DAY / 24
    day = await _read(big, q["dash_finished_per_hour"], 24, window=timedelta(hours=24))
    assert day <= 24 * 1400 * 1.2  # a day of runs, not the history

"""The dashboard's own queries over 1,000,000 finished runs (the database of
tests/test_scale_plans.py): index scans only, never a sequential scan of runs or events.
The per-run reads and the overdue work read a bounded number of rows; the windowed
counts (finished runs per hour, outcomes and failures of the last hour) read the runs of
their window only, whatever the history holds."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import pytest

from saga._db import queries
from tests.test_scale_plans import BOUND, SCHEMA, _scans, big

pytestmark = pytest.mark.timeout(300)

__all__ = ["big"]  # the module-scoped fixture, shared with the scale tests


async def _read(conn: asyncpg.Connection, sql: str, *args: Any) -> int:
    """The most rows one scan of runs or events read; fails on a sequential scan."""
    text = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args)
    most = 0
    for scan in _scans(json.loads(text)[0]):
        where = f"{scan['Node Type']} on {scan['Relation Name']}"
        assert scan["Node Type"] != "Seq Scan", f"{where}: a sequential scan\n{text}"
        read = scan["Actual Rows"] * scan["Actual Loops"] + scan.get("Rows Removed by Filter", 0)
        most = max(most, read)
    return most


async def test_dashboard_queries_use_their_indexes(big: asyncpg.Connection) -> None:
    """Each dashboard query is index-only on runs and events; the per-run reads and the
    overdue work stay within BOUND rows; an hour's window reads about an hour of runs
    (the fixture finishes one run every 2.6 s: about 1,400 an hour)."""
    q = queries(SCHEMA)
    mid = await big.fetchval("SELECT id FROM saga.runs WHERE idempotency_key = 'order-500000'")
    for name, args in [
        ("dash_payloads", (mid,)),
        ("dash_signals", (mid,)),
        ("dash_overdue", (60.0,)),
        ("dash_events_sequence", ()),
    ]:
        assert await _read(big, q[name], *args) <= BOUND, name
    assert await _read(big, q["dash_outcomes"], 3600.0) <= BOUND
    assert await _read(big, q["dash_failures"], 3600.0, 100) <= BOUND
    assert await _read(big, q["dash_finished_per_hour"], 1) <= BOUND
    day = await _read(big, q["dash_finished_per_hour"], 24)
    assert day <= 24 * 1400 * 1.2  # a day of runs, not the history

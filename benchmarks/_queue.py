"""The "no framework" reference: a hand-written asyncpg ``SKIP LOCKED`` jobs table.

A chain is 3 jobs, one row per step. A task claims one pending job (``SKIP LOCKED``),
runs it (a no-op), then completes it and inserts the chain's next step in one statement:
one claim commit and one completion commit per step.
"""

from __future__ import annotations

import asyncio
import json

import asyncpg

DDL = """
CREATE TABLE jobs (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    chain       bigint NOT NULL,
    step        integer NOT NULL,
    status      text NOT NULL DEFAULT 'pending',
    payload     jsonb NOT NULL,
    result      jsonb,
    worker      text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
CREATE INDEX jobs_pending ON jobs (id) WHERE status = 'pending';
"""
START = "INSERT INTO jobs (chain, step, payload) VALUES ($1, 1, $2::jsonb)"
CLAIM = """
UPDATE jobs SET status = 'running', worker = $1
WHERE id = (SELECT id FROM jobs WHERE status = 'pending'
            ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING id, chain, step, payload::text AS payload
"""
COMPLETE = """
WITH done AS (
    UPDATE jobs SET status = 'done', result = $2::jsonb, finished_at = now() WHERE id = $1
)
INSERT INTO jobs (chain, step, payload) SELECT $3, $4 + 1, $5::jsonb WHERE $4 < 3
"""
IDLE_SLEEP = (0.005, 0.05)  # an idle task polls again after 5 ms, doubling to 50 ms

DONE = "SELECT count(*) FROM jobs WHERE step = 3 AND status = 'done'"
# Chains started since $1, in the columns of _internals.span_sql.
SPAN = """
    SELECT min(created_at) FILTER (WHERE step = 1) AS first_start,
           max(finished_at) FILTER (WHERE step = 3) AS last_done,
           percentile_disc(0.99) WITHIN GROUP (ORDER BY finished_at)
               FILTER (WHERE step = 3) AS p99_done,
           count(*) FILTER (WHERE step = 1) AS n,
           count(*) FILTER (WHERE step = 3 AND status = 'done' AND result = '1') AS ok,
           0 AS expiries, NULL::timestamptz AS first_claim
    FROM jobs WHERE created_at >= $1
    """


async def no_reset(_conn: asyncpg.Connection) -> None:
    """Pool reset: nothing (as saga's own pool; asyncpg's default reset is a round trip)."""


def pool_size(concurrency: int) -> int:
    """The pool saga's orchestrator opens for itself at this concurrency; the queue's too."""
    return max(4, min(concurrency + 2, 20))


async def create_tables(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(DDL)
    finally:
        await conn.close()


async def start(pool: asyncpg.Pool, i: int) -> None:
    """Start chain ``i``."""
    await pool.execute(START, i, json.dumps({"i": i}))


async def task(pool: asyncpg.Pool, worker: str, stop: asyncio.Event) -> None:
    """One worker task: claim, run, complete, until ``stop``."""
    idle = IDLE_SLEEP[0]
    while not stop.is_set():
        job = await pool.fetchrow(CLAIM, worker)
        if job is None:
            await asyncio.sleep(idle)
            idle = min(idle * 2, IDLE_SLEEP[1])
            continue
        idle = IDLE_SLEEP[0]
        result = "1"  # the no-op step
        await pool.execute(COMPLETE, job["id"], result, job["chain"], job["step"], job["payload"])

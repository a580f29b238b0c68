"""The "no framework" references: hand-written asyncpg ``SKIP LOCKED`` queues on one jobs
table.

A chain is 3 jobs, one row per step.

- unbatched (``task``): a task claims one pending job (``SKIP LOCKED``), runs it (a
  no-op), then completes it and inserts the chain's next step in one statement: one claim
  commit and one completion commit per step.
- batched (``batch_task``): a task claims up to ``batch`` pending jobs in one statement,
  runs them (no-ops), then completes all of them and inserts their next steps in one
  statement (arrays, ``unnest``): two commits per batch.
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
    claimed_at  timestamptz,
    finished_at timestamptz
);
CREATE INDEX jobs_pending ON jobs (id) WHERE status = 'pending';
"""
START = "INSERT INTO jobs (chain, step, payload) VALUES ($1, 1, $2::jsonb)"
CLAIM = """
UPDATE jobs SET status = 'running', worker = $1, claimed_at = now()
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
# Batched: up to $2 pending jobs in one statement (the CTE runs once: MATERIALIZED).
CLAIM_BATCH = """
WITH picked AS MATERIALIZED (
    SELECT id FROM jobs WHERE status = 'pending'
    ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED
)
UPDATE jobs SET status = 'running', worker = $1, claimed_at = now()
FROM picked WHERE jobs.id = picked.id
RETURNING jobs.id, jobs.chain, jobs.step, jobs.payload::text AS payload
"""
# Batched: every claimed job done with its result, and the next steps of their chains, in
# one statement: $1 ids, $2 results; $3 chains, $4 steps, $5 payloads of the same jobs.
COMPLETE_BATCH = """
WITH done AS (
    UPDATE jobs SET status = 'done', result = r.result::jsonb, finished_at = now()
    FROM unnest($1::bigint[], $2::text[]) AS r(id, result)
    WHERE jobs.id = r.id
)
INSERT INTO jobs (chain, step, payload)
SELECT n.chain, n.step + 1, n.payload::jsonb
FROM unnest($3::bigint[], $4::int[], $5::text[]) AS n(chain, step, payload)
WHERE n.step < 3
"""
BATCH = 16  # jobs per claim of the batched queue
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
           0 AS expiries, min(claimed_at) AS first_claim
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


async def batch_task(pool: asyncpg.Pool, worker: str, stop: asyncio.Event, batch: int) -> None:
    """One worker task of the batched queue: claim up to ``batch``, run them, complete
    them together, until ``stop``."""
    idle = IDLE_SLEEP[0]
    while not stop.is_set():
        jobs = await pool.fetch(CLAIM_BATCH, worker, batch)
        if not jobs:
            await asyncio.sleep(idle)
            idle = min(idle * 2, IDLE_SLEEP[1])
            continue
        idle = IDLE_SLEEP[0]
        results = ["1" for _ in jobs]  # the no-op steps
        await pool.execute(
            COMPLETE_BATCH,
            [job["id"] for job in jobs],
            results,
            [job["chain"] for job in jobs],
            [job["step"] for job in jobs],
            [job["payload"] for job in jobs],
        )

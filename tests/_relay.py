"""The relay saga of the multi-process tests, for real worker processes:
``saga worker tests._relay:relay`` (tests._harness sets SAGA_DSN for it).

Each of its three steps records in the test's ``effects`` table (``EFFECTS``) when it
ran, by the database's clock, and in which process, through a connection of its own.
"""

from __future__ import annotations

import os

import anyio
import asyncpg

import saga
from tests._sagas import Job

EFFECTS = (
    "CREATE TABLE effects (run_id uuid, step text, worker text,"
    " started timestamptz, finished timestamptz)"
)

relay = saga.Saga("relay", input=Job)


async def _record(ctx: saga.Context[Job]) -> int:
    conn = await asyncpg.connect(os.environ["SAGA_DSN"])
    try:
        started = await conn.fetchval("SELECT clock_timestamp()")
        await anyio.sleep(0.02)
        await conn.execute(
            "INSERT INTO effects VALUES ($1, $2, $3, $4, clock_timestamp())",
            ctx.run_id,
            ctx.step,
            str(os.getpid()),
            started,
        )
    finally:
        await conn.close()
    return int(ctx.step[1:])


for _name in ("s1", "s2", "s3"):
    relay.step(name=_name)(_record)

"""The waiting saga of the wake-up tests, for real worker processes:
``saga worker tests._wakeup_saga:wakeup`` (tests._harness sets SAGA_DSN for it).

``prepare`` takes the time its input says (so that a signal sent at a random moment
lands before, around or after the run reaches its wait), then the run waits up to 60 s
for the signal ``go``, whose payload carries a per-run nonce; ``finish`` returns that
nonce and records every execution of itself, with the nonce it saw, in the test's
``wakeup_effects`` table (``EFFECTS``), through a pool of its own: an external witness
that no execution ever saw a second signal.
"""

from __future__ import annotations

import asyncio
import os

import anyio
import asyncpg
from pydantic import BaseModel

import saga

EFFECTS = (
    "CREATE TABLE wakeup_effects (run_id uuid NOT NULL, nonce text NOT NULL,"
    " pid integer NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())"
)
#: The wait's timeout: far longer than any wake-up may take, so a lost one shows.
TIMEOUT_SECONDS = 60.0


class Wake(BaseModel):
    """A run's input: how long its first step takes."""

    n: int
    prepare_ms: int


class Go(BaseModel):
    """The signal's payload: a nonce only the test and this run's signal know."""

    nonce: str


wakeup = saga.Saga("wakeup", input=Wake)

_pool: asyncpg.Pool | None = None
_pool_lock = asyncio.Lock()


async def _effects() -> asyncpg.Pool:
    global _pool
    async with _pool_lock:
        if _pool is None:
            _pool = await asyncpg.create_pool(os.environ["SAGA_DSN"], min_size=1, max_size=4)
    return _pool


@wakeup.step(retry=saga.Retry(max_attempts=5, initial_delay=0.05))
async def prepare(ctx: saga.Context[Wake]) -> int:
    await anyio.sleep(ctx.input.prepare_ms / 1000)
    return ctx.input.n


@prepare.compensate
async def unprepare(ctx: saga.Context[Wake], n: int) -> None:
    """A timed-out wait rolls back here: the run ends compensated."""


go = wakeup.wait_for("go", Go, timeout=TIMEOUT_SECONDS, on_timeout="compensate")


@wakeup.step(retry=saga.Retry(max_attempts=5, initial_delay=0.05))
async def finish(ctx: saga.Context[Wake]) -> str:
    nonce = ctx.result(go).nonce
    pool = await _effects()
    await pool.execute(
        "INSERT INTO wakeup_effects (run_id, nonce, pid) VALUES ($1, $2, $3)",
        ctx.run_id,
        nonce,
        os.getpid(),
    )
    return nonce

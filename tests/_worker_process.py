"""A worker process for multi-process tests: ``python -m tests._worker_process DSN NAME``.

Runs an orchestrator for the ``relay`` saga until SIGTERM, then shuts down cleanly (exit
code 0). Each step records when it ran, and where, in the ``effects`` table.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import asyncpg
from pydantic import BaseModel

import saga


class Payload(BaseModel):
    n: int


def build_saga(pool: asyncpg.Pool | None = None, worker: str = "") -> saga.Saga[Payload]:
    relay = saga.Saga("relay", input=Payload)

    def make_step(index: int) -> None:
        async def step(ctx: saga.Context[Payload]) -> int:
            assert pool is not None, "client-only definition: steps never run here"
            started = await pool.fetchval("SELECT clock_timestamp()")
            await asyncio.sleep(0.02)
            await pool.execute(
                "INSERT INTO effects VALUES ($1, $2, $3, $4, clock_timestamp())",
                ctx.run_id,
                ctx.step,
                worker,
                started,
            )
            return index

        relay.step(name=f"s{index}")(step)

    for i in range(1, 4):
        make_step(i)
    return relay


async def main(dsn: str, name: str) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with asyncpg.create_pool(dsn, min_size=1, max_size=4) as pool:
        relay = build_saga(pool, name)
        async with saga.Orchestrator(
            dsn, sagas=[relay], concurrency=4, poll_interval=0.2, worker_id=name
        ):
            await stop.wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))

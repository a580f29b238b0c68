"""A shutdown gives back every lease of its worker, even those a write cancelled in flight
committed without its runner learning of them (the next step leased along, a due run
claimed along): none stays leased to a closed worker, and no run fails for it."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import asyncpg
import pytest

import saga
from tests._sagas import ONCE, Job, small_saga

# -- shutdown: leases given back, interrupted attempts not counted ------------------------


async def _close_mid_flight(dsn: str, s: saga.Saga[Any], lease_seconds: float) -> str:
    """Open an executing orchestrator on a backlog of ``s``'s runs, let it work for a
    moment, close it with shutdown_timeout=0 (a shutdown that does not wait: documented
    as accepted); return its worker id."""
    orch = saga.Orchestrator(
        dsn,
        sagas=[s],
        concurrency=8,
        shutdown_timeout=0,
        lease_seconds=lease_seconds,
        poll_interval=0.2,
    )
    await orch.__aenter__()
    await anyio.sleep(0.2)
    await orch.aclose()
    return orch.worker_id


@pytest.mark.timeout(60)
async def test_shutdown_gives_back_every_lease_even_when_cancelling_a_write(
    dsn: str, db: asyncpg.Connection
) -> None:
    """README, Runtime: "Leaving stops claiming, lets running steps finish for up to
    `shutdown_timeout`, then cancels the rest and releases their leases so another
    process takes them at once."

    A cancellation landing while a runner's write is in flight (the group-committed
    write that records a step and leases the run's next step to the same worker, or
    claims the next due run along with it) lets the write commit, but the runner never
    learns its new lease. Releasing the leases known to the runners then missed it: after
    ``aclose()`` returned, runs stayed leased to the closed worker for the whole
    ``lease_seconds`` (60 s here), on most closes with shutdown_timeout=0. The shutdown
    now releases whatever is leased to its worker.
    """
    s = small_saga("backlog", 3, delay=0.002)
    async with saga.Client(dsn, sagas=[s]) as client:
        await asyncio.gather(*[client.start(s, Job(n=i)) for i in range(300)])
    stuck: list[Any] = []
    for _ in range(3):  # each close reproduces it about 5 times in 6
        worker = await _close_mid_flight(dsn, s, lease_seconds=60)
        stuck = await db.fetch(
            "SELECT id, step_name, lease_token, due_at - now() AS left FROM saga.runs "
            "WHERE lease_owner = $1",
            worker,
        )
        if stuck:
            break
    assert stuck == [], f"{len(stuck)} run(s) still leased to the closed worker: {stuck[:2]}"


@pytest.mark.timeout(60)
async def test_a_graceful_shutdown_never_fails_a_run(dsn: str, db: asyncpg.Connection) -> None:
    """README, Retries: "A worker shutting down gives its leases back without counting
    the interrupted attempts, once". DESIGN: "A crash, a deploy ... loses nothing".

    Leases a close failed to give back (see the previous test) expired, and the next
    claim counted the interrupted attempt as lost: with `Retry(max_attempts=1)` one
    graceful shutdown turned 8-12 of 300 runs whose steps never failed into
    `compensated` runs (`saga.AttemptLost`). Each trial uses its own saga, so every run
    goes through exactly one shutdown; all 900 complete.
    """
    sagas = [small_saga(f"deploy{k}", 3, delay=0.002, retry=ONCE) for k in range(3)]
    async with saga.Client(dsn, sagas=sagas) as client:
        for s in sagas:
            await asyncio.gather(*[client.start(s, Job(n=i)) for i in range(300)])
    for s in sagas:
        worker = await _close_mid_flight(dsn, s, lease_seconds=1)
        if await db.fetchval("SELECT count(*) FROM saga.runs WHERE lease_owner = $1", worker):
            break
    async with saga.Orchestrator(dsn, sagas=sagas, lease_seconds=1, poll_interval=0.2):
        with anyio.fail_after(40):
            while await db.fetchval(NOT_ENDED):  # noqa: ASYNC110 - polling the database
                await anyio.sleep(0.1)
    rows = await db.fetch("SELECT status, count(*) FROM saga.runs GROUP BY 1")
    ended = {r["status"]: r["count"] for r in rows}
    error = await db.fetchval("SELECT error::text FROM saga.runs WHERE status <> 'completed'")
    assert ended == {"completed": 900}, (ended, error)


NOT_ENDED = "SELECT count(*) FROM saga.runs WHERE due_at IS NOT NULL"

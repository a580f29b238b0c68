"""A Client (or Orchestrator) held by a web app, when its pool is busy or it closes
while requests are under way, and after it went: README's Client and errors sections.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections import Counter
from typing import Any

import asyncpg
import pytest

import saga
from tests._sagas import Job, parked_saga, small_saga
from tests.conftest import OrchestratorFactory

pytestmark = pytest.mark.timeout(120)


async def _runs(db: asyncpg.Connection, key: str) -> int:
    return await db.fetchval("SELECT count(*) FROM saga.runs WHERE idempotency_key = $1", key)


async def test_a_result_times_out_on_time_while_the_pool_is_busy(dsn: str) -> None:
    """README: ``RunTimeoutError`` is raised "when ``timeout`` seconds pass first", and a
    user pool of 2 connections is supported. The app holds the pool's second connection
    for 6 s: ``result(timeout=0.5)`` raises RunTimeoutError within moments of 0.5 s, not
    when the app gives its connection back (before: after 6 s; for ever if it never
    did). Once the pool is free, a timeout of 0 still reads the run once."""
    s = parked_saga("starved_result")
    pool = await asyncpg.create_pool(dsn, min_size=0, max_size=2)
    try:
        async with saga.Client(pool, sagas=[s], poll_interval=0.2) as client:
            run = await client.start(s, Job())
            held = await pool.acquire()  # the app's own use of its pool

            async def app_releases_later() -> None:
                await asyncio.sleep(6)
                await pool.release(held)

            releaser = asyncio.ensure_future(app_releases_later())
            began = time.monotonic()
            with pytest.raises(saga.RunTimeoutError, match="did not answer"):
                await run.result(timeout=0.5)
            elapsed = time.monotonic() - began
            await releaser
            assert elapsed < 2.5, f"result(timeout=0.5) returned after {elapsed:.2f} s"
            with pytest.raises(saga.RunTimeoutError, match="still pending"):
                await run.result(timeout=0)
    finally:
        await pool.close()


async def test_a_client_closed_while_starts_are_in_flight_lets_them_finish(
    dsn: str, db: asyncpg.Connection
) -> None:
    """README: a Client's ``aclose()`` behaves as an orchestrator's, which lets writes in
    flight finish first. A web app shuts down while 20 keyed starts are under way: each
    either returns its handle (its run written once) or raises LifecycleError (nothing
    written). Before, the close closed the pools under them: DatabaseError "pool is
    closing", or asyncpg protocol errors, for a database that was fine."""
    s = parked_saga("closing_starts")
    seen: Counter[str] = Counter()
    for attempt in range(3):
        client = saga.Client(dsn, sagas=[s], poll_interval=0.2)
        await client.__aenter__()
        await client.start(s, Job())  # connections are open
        starts = [
            asyncio.ensure_future(client.start(s, Job(n=i), key=f"{attempt}-{i}"))
            for i in range(20)
        ]
        await asyncio.sleep(0)  # the starts are under way
        await asyncio.wait_for(client.aclose(), 20)
        outcomes = await asyncio.wait_for(asyncio.gather(*starts, return_exceptions=True), 20)
        for i, outcome in enumerate(outcomes):
            written = await _runs(db, f"{attempt}-{i}")
            if isinstance(outcome, saga.RunHandle):
                assert written == 1
                seen["handle"] += 1
            else:
                assert written == 0, f"{outcome!r} raised, yet its run was written"
                seen[f"{type(outcome).__name__}: {str(outcome)[:70]}"] += 1
    wrong = {k: n for k, n in seen.items() if k != "handle" and not k.startswith("Lifecycle")}
    assert not wrong, f"starts in flight at close: {dict(seen)}"
    assert seen["handle"] > 0


async def test_a_saga_whose_client_closed_and_went_says_lifecycle_error(dsn: str) -> None:
    """README: ``checkout.start(...)``: "when the one that registered it has closed or
    its loops died, ``LifecycleError``". After ``async with saga.Client(...):`` without
    ``as`` and a garbage collection, the closed client is gone: ``s.start()`` still
    raises LifecycleError (a 503 in the examples), naming the kind of client. Before,
    DefinitionError "not registered" (a 500)."""
    s = parked_saga("dropped_client")
    async with saga.Client(dsn, sagas=[s]):
        await s.start(Job())
    gc.collect()
    with pytest.raises(saga.LifecycleError, match="the Client that registered saga"):
        await s.start(Job())


async def test_a_start_that_finishes_during_close_wakes_the_workers(
    orchestrator: OrchestratorFactory, dsn: str, db: Any
) -> None:
    """README (Client): "A close lets the starts in flight finish first (10 s at most)";
    README (path of one step): "a NOTIFY wakes the workers (under load one per 5 ms per
    saga and process, and a trailing one after the others committed)".

    Two starts in one 5 ms window: A notifies in its statement, B (keyed, held up by
    the key's lock, which a caller's open transaction holds) relies on the trailing
    NOTIFY. The client closes while B is in flight; B then commits and returns its
    handle, and its trailing NOTIFY is sent by the close: a worker (poll 30 s, idle)
    runs B's run within moments. Before, the NOTIFY was never sent (the close had
    stopped the task group that sends it) and the run waited for the poll."""
    s = small_saga("close_notify", ["a"])
    await orchestrator(s, poll_interval=30)
    client = saga.Client(dsn, sagas=[s], poll_interval=0.2)
    await client.__aenter__()
    try:
        warm = await client.start(s, Job(n=0))
        await warm.result(timeout=10)
        tr = db.transaction()
        await tr.start()
        await client.start(s, Job(n=9), key="k", conn=db)  # holds the key's lock
        a = asyncio.ensure_future(client.start(s, Job(n=1)))
        b = asyncio.ensure_future(client.start(s, Job(n=2), key="k"))
        run_a = await a
        await run_a.result(timeout=10)  # the worker ran A and is idle again
        closing = asyncio.ensure_future(client.aclose())
        await asyncio.sleep(0.3)
        assert not b.done()  # in flight: the close waits for it
        await tr.rollback()  # B goes on and commits
        run_b = await b
        assert run_b.created
        await closing
    finally:
        await client.aclose()
    committed = time.monotonic()
    while True:
        status = await db.fetchval("SELECT status FROM saga.runs WHERE id = $1", run_b.id)
        if status == "completed" or time.monotonic() - committed > 8:
            break
        await asyncio.sleep(0.05)
    took = time.monotonic() - committed
    assert status == "completed", (
        f"run B started during the close is still {status} {took:.1f} s after it committed "
        "(no NOTIFY: the worker claims it only at its 30 s poll)"
    )

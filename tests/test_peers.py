"""Executing orchestrators of one schema know how many share it, and pace their writes.

Alone, an orchestrator keeps two group-commit writes in flight (two Postgres backends
busy while it runs the next steps); with peers, whose writes fill those gaps, one, of up
to all its runs (see ``Store.pace``). Presence is a shared advisory lock held by each
executing orchestrator's LISTEN session: it ends with the session, so a killed process
drops out by itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import asyncpg
import pytest

import saga
from saga._db import channel, queries
from tests._sagas import Job, small_saga

pytestmark = pytest.mark.timeout(60)


def writes_in_flight(orch: saga.Orchestrator) -> tuple[int, int]:
    """The limits of an orchestrator's plain and graph writes in flight."""
    store = orch._store
    assert store is not None
    return store._group._max_leaders, store._graphs._max_leaders


async def until(condition: Callable[[], bool], seconds: float) -> None:
    with anyio.fail_after(seconds):
        while not condition():  # noqa: ASYNC110 - the limits change in the listener task
            await anyio.sleep(0.02)


async def test_executing_orchestrators_count_each_other_and_pace_their_writes(
    orchestrator: Any, open_client: Any, dsn: str
) -> None:
    """One executing orchestrator alone keeps two writes in flight; a second one on the
    schema makes both keep one (at once: each tells the others when it comes); a client,
    an orchestrator of concurrency 0 and one of another schema do not count; when the
    second closes, the first goes back to two."""
    chain = small_saga("paced", ["a", "b"])
    first = await orchestrator(chain, concurrency=8)
    assert writes_in_flight(first) == (2, 2)
    await open_client(chain)
    await orchestrator(chain, concurrency=0)
    await orchestrator(chain, concurrency=8, schema="elsewhere")
    await anyio.sleep(0.3)
    assert writes_in_flight(first) == (2, 2)

    second = saga.Orchestrator(dsn, sagas=[chain], concurrency=8, poll_interval=0.2)
    async with second:
        assert writes_in_flight(second) == (1, 1)
        await until(lambda: writes_in_flight(first) == (1, 1), 2)
        # Both still execute runs, whatever their pace.
        runs = [await first.start(chain, Job(n=i)) for i in range(20)]
        for run in runs:
            await run.result(timeout=20)  # raises unless the run completed
    await until(lambda: writes_in_flight(first) == (2, 2), 2)


async def test_a_peer_whose_session_ends_without_leaving_is_forgotten(
    orchestrator: Any, dsn: str
) -> None:
    """A peer marked present (as an orchestrator's LISTEN session marks itself) makes
    an orchestrator keep one write in flight; when that session is terminated (its
    process killed: no goodbye), the orchestrator counts again within its 5 s recount
    and goes back to two."""
    chain = small_saga("paced", ["a", "b"])
    orch = await orchestrator(chain, concurrency=8)
    assert writes_in_flight(orch) == (2, 2)
    peer = await asyncpg.connect(dsn)
    try:
        assert await peer.fetchval(queries("saga")["presence_enter"], channel("saga", "peers"))
        await until(lambda: writes_in_flight(orch) == (1, 1), 2)
        admin = await asyncpg.connect(dsn)
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", peer.get_server_pid())
        finally:
            await admin.close()
        await until(lambda: writes_in_flight(orch) == (2, 2), 8)
    finally:
        peer.terminate()

"""Cancellation safety: a request cancelled while it awaits start() or result() (the
client went away) never cancels, loses, duplicates or half-writes a run."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import asyncpg
import httpx
import pytest

import saga
from examples.checkout import Order, checkout
from examples.fastapi_app import create_app
from tests.conftest import OrchestratorFactory

HAPPY_PATH = [
    ("run_started", None),
    ("step_started", "reserve_stock"),
    ("step_completed", "reserve_stock"),
    ("step_started", "charge_card"),
    ("step_completed", "charge_card"),
    ("step_started", "ship"),
    ("step_completed", "ship"),
    ("run_completed", None),
]

# Cancel points from "before the first await" to "well into the run".
DELAYS = [0.0, 0.0002, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.05, 0.1]


async def assert_runs_consistent(
    db: asyncpg.Connection, orch: saga.Orchestrator, keys: list[str]
) -> dict[str, uuid.UUID]:
    """Every run that exists for these keys is the only one for its key, completes, and
    has exactly the happy path's history; no event belongs to a missing run."""
    rows = await db.fetch(
        "SELECT idempotency_key, id FROM saga.runs WHERE idempotency_key = ANY($1)", keys
    )
    by_key: dict[str, list[uuid.UUID]] = {}
    for r in rows:
        by_key.setdefault(r["idempotency_key"], []).append(r["id"])
    assert all(len(ids) == 1 for ids in by_key.values()), by_key
    for ids in by_key.values():
        run = orch.get_run(ids[0])
        output = await run.result(timeout=20)
        assert output.order_id  # typed Shipment: the run completed, not cancelled
        assert [(e.kind, e.step) for e in await run.history()] == HAPPY_PATH
    orphans = await db.fetchval(
        "SELECT count(*) FROM saga.events e WHERE NOT EXISTS"
        " (SELECT 1 FROM saga.runs r WHERE r.id = e.run_id)"
    )
    assert orphans == 0
    return {key: ids[0] for key, ids in by_key.items()}


async def test_cancelling_start_at_any_point_keeps_the_run_whole(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """start() cancelled at a range of points (already due when called, while the INSERT
    is in flight, after it) still commits exactly one run per call and returns its
    handle; every run completes with a whole history."""
    orch = await orchestrator(checkout, concurrency=8)
    keys: list[str] = []
    returned: dict[str, uuid.UUID] = {}
    for i, delay in enumerate(DELAYS * 2):
        key = f"start-{i}"
        keys.append(key)
        with anyio.move_on_after(delay):
            handle = await orch.start(checkout, Order(order_id=key, amount_cents=1), key=key)
            returned[key] = handle.id
    committed = await assert_runs_consistent(db, orch, keys)
    # start() reaches its shielded INSERT without yielding, so even a cancel that was
    # already due when it was called cannot stop it: exactly one run per call, and the
    # caller got its handle.
    assert committed == returned


async def test_cancel_while_the_insert_reply_is_in_flight_still_returns_the_run(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """A cancel that arrives after the INSERT committed but before its reply is read
    does not interrupt start(): the caller gets the committed run's handle, and the run
    completes (nothing is left for a retry to duplicate). (Private: the store's start_run
    is wrapped to hold its reply after the commit; nothing public can delay a reply.)"""
    orch = await orchestrator(checkout, concurrency=2)
    assert orch._store is not None
    real = orch._store.start_run
    in_flight = anyio.Event()

    async def slow_reply(*args: Any, **kwargs: Any) -> tuple[uuid.UUID, bool]:
        result: tuple[uuid.UUID, bool] = await real(*args, **kwargs)
        in_flight.set()
        await anyio.sleep(0.3)  # committed; the reply is still on its way
        return result

    orch._store.start_run = slow_reply
    got: list[saga.RunHandle] = []

    async def request(scope: anyio.CancelScope) -> None:
        with scope:
            got.append(await orch.start(checkout, Order(order_id="x", amount_cents=1), key="x"))
            await anyio.sleep(10)  # cancelled here, at the first checkpoint after start()

    scope = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(request, scope)
        await in_flight.wait()
        scope.cancel()
    assert len(got) == 1
    committed = await assert_runs_consistent(db, orch, ["x"])
    assert committed == {"x": got[0].id}


async def test_cancelling_result_only_stops_the_waiting(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """result() cancelled at a range of points (before its first read, while it waits
    for the notification) leaves the run untouched: it completes, its history is whole,
    and no waiter is left registered with the orchestrator (private: the listener's
    waiter table is what that checks)."""
    orch = await orchestrator(checkout, concurrency=8, poll_interval=0.05)
    keys = []
    for i, delay in enumerate(DELAYS):
        key = f"result-{i}"
        keys.append(key)
        run = await orch.start(
            checkout, Order(order_id=key, amount_cents=1, step_delay=0.02), key=key
        )
        with anyio.move_on_after(delay) as scope:
            await run.result(timeout=20)
        assert scope.cancelled_caught or delay >= 0.05
    await assert_runs_consistent(db, orch, keys)
    assert orch._listener is not None
    assert not orch._listener.waiters


@pytest.fixture
async def app_client(dsn: str) -> AsyncIterator[tuple[httpx.AsyncClient, saga.Orchestrator]]:
    """The FastAPI example over ASGI (the request runs in the caller's task, so
    cancelling the call is what a client disconnect does to the handler)."""
    app = create_app(dsn, concurrency=8, poll_interval=0.05, shutdown_timeout=2)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
            yield client, app.state.orchestrator


async def test_http_requests_cancelled_mid_start_or_mid_wait_leave_runs_whole(
    app_client: tuple[httpx.AsyncClient, saga.Orchestrator], db: asyncpg.Connection
) -> None:
    """POST /orders (and POST /orders?wait=10) cancelled at a range of points, as when
    the client disconnects: at most one run per order, every committed run completes
    with a whole history, no waiter leaks (private: the listener's waiter table is what
    that checks), and a retried POST finds the same run."""
    client, orch = app_client
    keys = []
    for i, delay in enumerate(DELAYS):
        for wait in (None, 10):
            key = f"http-{i}-{wait}"
            keys.append(key)
            params = {} if wait is None else {"wait": wait}
            body = {"order_id": key, "amount_cents": 1, "step_delay": 0.01}
            with anyio.move_on_after(delay):
                await client.post("/orders", params=params, json=body)
    committed = await assert_runs_consistent(db, orch, keys)
    assert committed, "no request got as far as committing a run"
    assert orch._listener is not None
    assert not orch._listener.waiters
    # The client retries every order (the same request): committed ones come back
    # unchanged, others start.
    for key in keys:
        body = {"order_id": key, "amount_cents": 1, "step_delay": 0.01}
        response = await client.post("/orders", params={"wait": 20}, json=body)
        assert response.status_code == 200
        assert response.json()["status"] == "completed"
        if key in committed:
            assert response.json()["run_id"] == str(committed[key])
            assert response.json()["created"] is False
    assert len(await assert_runs_consistent(db, orch, keys)) == len(keys)

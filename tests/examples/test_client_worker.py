"""examples/client_worker: a web process in client mode, a real `saga worker` process."""

from __future__ import annotations

import os
import signal

import asyncpg
import httpx
import pytest

import saga
from examples.client_worker.web import create_client_app
from tests._harness import Child, Children


@pytest.fixture
async def worker(dsn: str, children: Children) -> Child:
    """`python -m saga worker examples.checkout:SAGAS` on the test database, ready."""
    worker = children.saga_worker(
        dsn,
        "examples.checkout:SAGAS",
        "--worker-id",
        "worker-1",
        "--concurrency",
        "4",
        "--poll-interval",
        "0.2",
        "--shutdown-timeout",
        "5",
    )
    await worker.wait_ready()
    return worker


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_client_mode_web_process_executes_no_step(
    dsn: str, db: asyncpg.Connection, worker: Child
) -> None:
    """The web app in client mode (a saga.Client) starts runs and waits for their typed
    results, while every step and compensation attempt is executed by the worker
    process: the history names only the worker, the output names its pid, and the
    client's own id appears nowhere. SIGTERM then stops the worker with exit code 0."""
    app = create_client_app(dsn, poll_interval=0.2)
    async with app.router.lifespan_context(app):
        client_orch: saga.Client = app.state.orchestrator
        assert not isinstance(client_orch, saga.Orchestrator)  # no worker loop at all
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://web") as client:
            ok = await client.post(
                "/orders", params={"wait": 20}, json={"order_id": "cw-1", "amount_cents": 100}
            )
            failed = await client.post(
                "/orders",
                params={"wait": 20},
                json={"order_id": "cw-2", "amount_cents": 100, "card": "declined"},
            )
    assert ok.status_code == 200, ok.text
    body = ok.json()
    assert body["status"] == "completed"
    shipped_by = body["output"]["shipped_by"]
    assert shipped_by.endswith(f":{worker.pid}")
    assert not shipped_by.endswith(f":{os.getpid()}")
    assert failed.json()["status"] == "compensated"

    workers = await db.fetch(
        "SELECT DISTINCT worker FROM saga.events WHERE kind LIKE ANY($1)",
        ["step_%", "compensation_%"],
    )
    assert {r["worker"] for r in workers} == {"worker-1"}
    client_events = await db.fetchval(
        "SELECT count(*) FROM saga.events WHERE worker = $1", client_orch.worker_id
    )
    assert client_events == 0
    assert await worker.stop(signal.SIGTERM) == 0, worker.output
    assert "SIGTERM received, shutting down" in worker.output
